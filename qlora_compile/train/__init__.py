"""`qlora-compile train`: QLoRA fine-tuning on your own model folder and data files.

- `config`: `TrainConfig`, from YAML and `--key value` overrides.
- `encode`: one record -> (input_ids, labels), for chat, instruction, completion and text records.
- `data`: files -> tokenized memory-mapped datasets -> length-grouped padded batches.
- `loop`: the step (gradient accumulation), schedule, evaluation, metrics, signals.
- `checkpoints`: atomic, resumable checkpoints.
- `ranks`: under torchrun, each rank's rows, sums over ranks, rank 0's outputs.
- `run`: `train(cfg)`, the whole job.
"""

from .config import TrainConfig, load_config
from .run import Result, train

__all__ = ["TrainConfig", "load_config", "train", "Result"]
