"""QLoRA across processes on PyTorch's own engine: FSDP2 sharding (`shard`), DCP checkpoints.

torch.distributed.init_process_group()                         # torchrun sets the rank and world
model = qlora_compile.compile(model, distributed=True, ...)    # 4-bit + LoRA, not compiled yet
qlora_compile.distributed.shard(model)                         # fully_shard, then torch.compile
for batch in this_ranks_batches:
    model(**batch).loss.backward(); model.qlora.step()
model.qlora.save_checkpoint("ckpt")                            # every rank
model.qlora.save_adapter("adapter")                            # every rank; rank 0 writes
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .shard import gathered_lora, replicate, shard, storage_bytes, storage_to_parameters

__all__ = [
    "gathered_lora",
    "load_checkpoint",
    "replicate",
    "save_checkpoint",
    "shard",
    "storage_bytes",
    "storage_to_parameters",
]
