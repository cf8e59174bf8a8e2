"""The suite's one factory of small random models: a config per family, every field overridable.

Tests that need a model of their own shape pass overrides (`tiny_model("llama", hidden_size=128)`)
instead of writing another config; a test module with a table of families (tests/test_families.py,
tests/test_experts.py, tests/tools/test_inspect.py) keeps its table of configs and builds with
`build`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

from qlora_compile import pipeline

SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip

CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "llama": (transformers.LlamaConfig, SMALL),
    "mistral": (transformers.MistralConfig, SMALL),
    "qwen2": (transformers.Qwen2Config, SMALL),
    "gemma2": (transformers.Gemma2Config, {**SMALL, "head_dim": 16}),
    "phi": (transformers.PhiConfig, {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}),
    "opt": (transformers.OPTConfig, {"vocab_size": 128, "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "word_embed_proj_dim": 64, "max_position_embeddings": 64}),
    "gpt2": (transformers.GPT2Config, {"vocab_size": 128, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}),
    "t5": (transformers.T5Config, {"vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1,
                                   "num_heads": 4, "decoder_start_token_id": 0}),
    "roberta": (transformers.RobertaConfig, {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
                                             "num_attention_heads": 4, "intermediate_size": 128,
                                             "max_position_embeddings": 66, "num_labels": 3,
                                             "problem_type": "single_label_classification"}),
}  # fmt: skip

MODEL_CLASSES = {
    "t5": transformers.T5ForConditionalGeneration,
    "roberta": transformers.RobertaForSequenceClassification,
}


def tiny_config(family: str = "llama", **overrides: Any) -> transformers.PretrainedConfig:
    """`family`'s small config, with `overrides` on top."""
    config_cls, defaults = CONFIGS[family]
    return config_cls(**{**defaults, **overrides})


def build(
    config: transformers.PretrainedConfig,
    model_cls: type | None = None,
    *,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A random model of `config`: `model_cls(config)`, or the causal LM transformers maps it to;
    seeded first unless `seed` is None; in `dtype`."""
    if seed is not None:
        torch.manual_seed(seed)
    model = model_cls(config) if model_cls else transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def tiny_model(
    family: str = "llama", *, seed: int | None = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> torch.nn.Module:
    """A random `family` model (its causal-LM class, or MODEL_CLASSES'), seeded, in `dtype`."""
    return build(tiny_config(family, **overrides), MODEL_CLASSES.get(family), seed=seed, dtype=dtype)


def save_tiny(
    path: Path,
    family: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """`tiny_model(...)` saved as an HF folder at `path` (in shards of `max_shard_size`, if given)."""
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    tiny_model(family, seed=seed, dtype=dtype, **overrides).save_pretrained(path, **shards)
    return Path(path)


def train_steps(model: torch.nn.Module, batches) -> list[float]:
    """One `model.qlora.step()` per batch (a dict of forward arguments) in train mode; the losses."""
    model.train()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        model.qlora.step()
        losses.append(loss.item())
    return losses


def graphs_without_us(plain: torch.nn.Module, ours: torch.nn.Module, run) -> int:
    """How many graphs Dynamo makes of `plain` (the same model without us) during `run(plain)`,
    compiled as `qlora_compile.compile` compiled `ours`: its repeated blocks (the same paths), or
    whole. Our graph count equal to this one means we added no graph break.

    Counted by a backend, not `torch._dynamo.explain`: that resets Dynamo, which would make the
    compiled models a test module shares compile again."""
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    if ours.qlora.report().compiled_blocks:
        names = {id(m): n for n, m in ours.named_modules()}
        pipeline.compile_blocks(
            [plain.get_submodule(names[id(b)]) for b in pipeline.repeated_blocks(ours)], count
        )
        pipeline.no_cache_by_default(plain)
        run(plain)
    else:
        run(torch.compile(plain, backend=count))
    return len(graphs)
