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
from ..checkpoint.safetensors_file import SafetensorsWriter
from ._base import (
    BaseModel,
    QuantOptions,
    check_fits,
    copy_side_files,
    dense_tensor,
    output_folder,
    parse_dtype,
    progress,
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


def write_merged_experts(writer, base: BaseModel, adapter, name: str, dtype: torch.dtype | None) -> None:
    """Merged experts under the 16-bit keys (`BaseModel.save_layout`): per expert, or one 3-D tensor."""
    layout = base.save_layout(name)
    stack = []
    for e, w, _, _ in merged_experts(base, adapter, name, dtype):
        if layout.fused:
            stack.append(w.t() if layout.transposed else w)
            continue
        for key, part in zip(layout.parts[e], layout.split(w), strict=True):
            writer.add(key, part)
    if layout.fused:
        writer.add(layout.fused, torch.stack(stack))


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
) -> Path:
    """Merge `adapter` into `base` and write a plain Hugging Face folder to `out`.

    Args:
        base: a 16-bit HF folder (its target linears are quantized with quant_type / blocksize /
            double_quant, as `qlora_compile.compile` does) or a bitsandbytes 4-bit folder.
        adapter: a PEFT-format LoRA folder (`save_adapter` or PEFT), or None (dequantize only). The
            modules it trains in full (`modules_to_save`) are written with its tensors; expert LoRA
            (`target_parameters`) is merged into each expert's weight.
        out: output folder, replaced atomically (written as `<out>.partial`, then renamed).
        dtype: "auto"/None (merged weights in the base weight's dtype, other tensors as stored),
            or "float32" / "float16" / "bfloat16" for every floating tensor.

    Raises:
        FileNotFoundError: a folder or a file in it is missing.
        ValueError: the adapter does not fit the base (missing module, shape mismatch), or bad options.
    """
    dtype = parse_dtype(dtype)
    base_model, lora = open_inputs(base, adapter, quant_type, blocksize, double_quant)
    items = list(base_model.items())
    with output_folder(out) as tmp:
        writer = SafetensorsWriter(tmp / "model.safetensors")
        done = 0
        for kind, name in items:
            if kind == "dense":
                writer.add(name, cast(dense_tensor(base_model, lora, name), dtype))
                continue
            if kind == "experts":
                write_merged_experts(writer, base_model, lora, name, dtype)
                continue
            w, _, _ = merged_weight(base_model, lora, name, dtype)
            writer.add(f"{name}.weight", w.t() if name in base_model.conv1d else w)
            done += 1
            if done % 20 == 0 or done == len(base_model.quantized):
                progress(f"merged {done}/{len(base_model.quantized)} linear layers")
        writer.close()
        write_config(base_model, tmp, dtype)
        copy_side_files(base_model, tmp)
    return Path(out)
