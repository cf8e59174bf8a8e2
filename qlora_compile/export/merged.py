"""`export_merged`: base + LoRA adapter -> a plain 16-bit Hugging Face folder.

The adapter is merged onto the *dequantized 4-bit* base weight, which is what it was trained
against (`W = dequant(Q(W0)) + scaling * B @ A`, computed in fp32), not onto the original 16-bit
weight. Tensors are read, merged and written one at a time.

MoE expert weights are merged expert by expert (`W_e = dequant(Q(W_e)) + scaling * B_e @ A_e` with
the expert LoRA of PEFT's `target_parameters`, when the adapter has one) and written under the keys
transformers' `save_pretrained` uses (per expert for Mixtral, Qwen-MoE...; a 3-D tensor where the
model has no conversion mapping), so `from_pretrained` loads the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapters import AdapterFolder
from ..checkpoint.output_folder import DEFAULT_MAX_SHARD_SIZE, Entry
from ..checkpoint.safetensors_file import TensorSpec
from .base import (
    BaseModel,
    QuantOptions,
    check_fits,
    dense_entry,
    estimated_bytes,
    out_in,
    parse_dtype,
    write_export,
)


def open_inputs(base, adapter, quant_type: str, blocksize: int, double_quant: bool):
    """(BaseModel, AdapterFolder or None), the adapter checked against the base. The modules the
    adapter trains in full stay dense (with an adapter that has none, every target is 4-bit as
    `compile(modules_to_save=())` makes it; without an adapter, compile's default)."""
    options = QuantOptions(quant_type, blocksize, double_quant)
    base_model = BaseModel(base, options)
    if adapter is None:
        return base_model, None
    lora = AdapterFolder(adapter, base_model.expert_lora_prefixes())
    base_model = BaseModel(base, options, modules_to_save=sorted(lora.saved))  # headers only: cheap
    check_fits(lora, base_model)
    return base_model, lora


def merged_weight(base: BaseModel, adapter: AdapterFolder | None, module: str, dtype: torch.dtype | None):
    """(merged weight in (out, in) layout and the output dtype, fp32 delta or None, the 4-bit weight)."""
    qw = base.quantized_weight(module)
    w = qw.dequantize(torch.float32)
    delta = None
    if adapter is not None and module in adapter.pairs:
        delta = adapter.delta(module)
        w = w + delta
    return w.to(dtype or qw.dtype), delta, qw


def merged_experts(base: BaseModel, adapter: AdapterFolder | None, name: str, dtype: torch.dtype | None):
    """Yields (expert, merged (out, in) weight in the output dtype, fp32 delta or None, its 4-bit
    weight) for each expert of the expert weight `name`, one at a time."""
    weight = base.experts[name]
    prefix = None if adapter is None else adapter.expert_prefixes(base.skeleton, [name]).get(name)
    for e in range(weight.num_experts):
        qw = base.expert_weight(name, e)
        w = qw.dequantize(torch.float32)
        delta = None if prefix is None else adapter.expert_delta(prefix, e, weight.num_experts)
        if delta is not None:
            w = w + delta
        yield e, w.to(dtype or qw.dtype), delta, qw


def merged_expert_entries(base: BaseModel, adapter, name: str, dtype: torch.dtype | None) -> list[Entry]:
    """Merged experts under the 16-bit keys (`BaseModel.save_layout`): per expert, or one 3-D tensor."""
    layout = base.save_layout(name)
    entries, stack = [], []
    for e, w, _, _ in merged_experts(base, adapter, name, dtype):
        if layout.fused:
            stack.append(w.t() if layout.transposed else w)
            continue
        entries += [Entry.of(k, part) for k, part in zip(layout.parts[e], layout.split(w), strict=True)]
    if layout.fused:
        entries.append(Entry.of(layout.fused, torch.stack(stack)))
    return entries


def _merged_entry(base: BaseModel, adapter, name: str, dtype: torch.dtype | None) -> Entry:
    """A merged linear's weight in its stored layout, computed when it is written."""
    shape = out_in(base, name)
    shape = shape[::-1] if name in base.conv1d else shape

    def fill() -> torch.Tensor:
        w = merged_weight(base, adapter, name, dtype)[0]
        return w.t() if name in base.conv1d else w

    return Entry(TensorSpec(f"{name}.weight", dtype or base.weight_dtype(name), tuple(shape)), fill)


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def write_config(base: BaseModel, out: Path, dtype: torch.dtype | None, quantization_config=None) -> None:
    config = dict(base.config_dict)
    config.pop("quantization_config", None)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = name
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_merged(
    base: str | Path,
    adapter: str | Path | None,
    out: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Merge `adapter` into `base` and write a plain Hugging Face folder to `out`.

    Args:
        base: a 16-bit HF folder (its target linears are quantized with quant_type / blocksize /
            double_quant, as `qlora_compile.compile` does) or a bitsandbytes 4-bit folder.
        adapter: a PEFT-format LoRA folder (`save_adapter` or PEFT), or None (dequantize only). The
            modules it trains in full (`modules_to_save`) are written with its tensors; expert LoRA
            (`target_parameters`) is merged into each expert's weight.
        out: output folder, replaced atomically (written as `<out>.partial`, then renamed); a
            killed export run again with the same inputs and options reuses the shards it finished.
        dtype: "auto"/None (merged weights in the base weight's dtype, other tensors as stored),
            or "float32" / "float16" / "bfloat16" for every floating tensor.
        max_shard_size: largest shard ("2GB", "500MB", or bytes), as `save_pretrained` shards:
            `model-0000k-of-0000n.safetensors` and `model.safetensors.index.json`.
        progress: a tqdm bar on stderr.

    Raises:
        FileNotFoundError: a folder or a file in it is missing.
        ValueError: the adapter does not fit the base (missing module, shape mismatch), or bad options.
    """
    dtype = parse_dtype(dtype)
    base_model, lora = open_inputs(base, adapter, quant_type, blocksize, double_quant)

    def entries(item: tuple[str, str]) -> tuple[list[Entry], None]:
        kind, name = item
        if kind == "dense":
            return [dense_entry(base_model, lora, name, dtype)], None
        if kind == "experts":
            return merged_expert_entries(base_model, lora, name, dtype), None
        return [_merged_entry(base_model, lora, name, dtype)], None

    options = {"format": "merged", "dtype": str(dtype), "quant": [quant_type, blocksize, double_quant]}
    write_export(
        base_model, lora, out, entries,
        size=lambda item: estimated_bytes(base_model, *item, (dtype or torch.bfloat16).itemsize),
        finish=lambda path, _: write_config(base_model, path, dtype),
        options=options, max_shard_size=max_shard_size, progress=progress,
    )  # fmt: skip
    return Path(out)
