"""`export_nf4`: base + LoRA adapter, merged as `export_merged` does, then re-quantized to 4 bits.

The folder is what transformers' bitsandbytes 4-bit `save_pretrained` writes (the same safetensors
keys and config.json `quantization_config`), so `from_pretrained(out)` with bitsandbytes installed
loads it. Re-quantizing adds a quantization error of the size of the one the adapter was trained
over; when it is larger than the update the adapter made (`|dW| / |error|` below 1) much of the
fine-tune is lost, so the ratio is reported per layer, with the share of the update that survives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checkpoint.convert import bnb_quantization_config
from ..checkpoint.output_folder import DEFAULT_MAX_SHARD_SIZE, Entry
from ..codes import code4
from ..errors import InvalidFolderError
from ..format import QuantizedWeight, check_bnb_quant_type, quantize_weight
from .base import dense_entry, estimated_bytes, parse_dtype, write_export
from .merged import merged_experts, merged_weight, open_inputs, write_config


@dataclass
class LayerReport:
    """One merged layer: its LoRA update against the 4-bit rounding noise of re-quantizing it.

    Attributes:
        delta_norm: |dW|, the Frobenius norm of scaling * B @ A.
        noise_norm: the expected norm of the rounding error that re-quantization adds: each
            element is rounded within its code's cell (width w times its block's absmax), an
            error of RMS w * absmax / sqrt(12). Computed from the re-quantized weight's codes.
        kept: the share of dW that survives re-quantization, <Q(W+dW) - Q(W), dW> / |dW|^2
            (Q(W): the dequantized base weight the adapter was trained over).
    """

    module: str
    delta_norm: float
    noise_norm: float
    kept: float

    @property
    def ratio(self) -> float:
        """|dW| / |quantization error|: well below 1, re-quantizing erases much of the update."""
        return self.delta_norm / self.noise_norm if self.noise_norm > 0 else float("inf")


def _cell_widths(quant_type: str) -> torch.Tensor:
    """Width of each 4-bit code's rounding cell (in units of absmax), indexed by code."""
    values, order = code4(quant_type).float().sort()
    mids = (values[1:] + values[:-1]) / 2
    lower = torch.cat([values[:1], mids])
    upper = torch.cat([mids, values[-1:]])
    widths = torch.empty(16)
    widths[order] = upper - lower
    return widths


def quantization_noise(qw: QuantizedWeight) -> float:
    """Expected norm of the rounding error of a weight quantized to these codes."""
    p = qw.packed.view(-1)
    codes = torch.stack([p >> 4, p & 15], dim=1).view(-1)[: qw.numel].long()
    scale = qw.absmax_fp32().repeat_interleave(qw.blocksize)[: qw.numel]
    cell = _cell_widths(qw.quant_type)[codes] * scale
    return float(cell.square().sum().div(12).sqrt())


def format_report(layers: list[LayerReport]) -> str:
    """A table of the per-layer ratios, with a closing line on how many fall below 1."""
    width = max((len(r.module) for r in layers), default=6)
    lines = [f"{'layer':<{width}}  {'|dW|':>10}  {'|quant err|':>11}  {'ratio':>7}  {'kept':>6}"]
    lines += [
        f"{r.module:<{width}}  {r.delta_norm:10.4g}  {r.noise_norm:11.4g}  {r.ratio:7.3f}  {r.kept:6.1%}"
        for r in layers
    ]
    low = [r for r in layers if r.ratio < 1]
    lines.append(
        f"{len(low)} of {len(layers)} merged layers have |dW| / |quantization error| < 1"
        + (": re-quantizing erases much of their fine-tune" if low else "")
    )
    return "\n".join(lines)


def requantized(base, adapter, module: str, dtype: torch.dtype | None):
    """(merged weight re-quantized with the base layer's settings, its LayerReport, the base 4-bit weight)."""
    merged, delta, qw = merged_weight(base, adapter, module, dtype)
    return (*requantize(merged, delta, qw, module), qw)


def requantize(merged: torch.Tensor, delta: torch.Tensor, qw: QuantizedWeight, label: str):
    """(`merged` quantized with `qw`'s settings, the LayerReport of `delta` against `qw`)."""
    new = quantize_weight(
        merged, quant_type=qw.quant_type, blocksize=qw.blocksize, double_quant=qw.double_quant
    )
    moved = new.dequantize(torch.float32) - qw.dequantize(torch.float32)
    d2 = float(delta.square().sum())
    kept = float((moved * delta).sum()) / d2 if d2 > 0 else 1.0
    return new, LayerReport(label, d2**0.5, quantization_noise(new), kept)


def expert_entries(base, adapter, name: str, dtype: torch.dtype | None, reports: list[LayerReport]):
    """Yields (bitsandbytes entries in our layout, base 4-bit weight) per expert of `name`: re-quantized
    after merging its expert LoRA (one LayerReport each), else the base's bytes as they are."""
    weight = base.experts[name]
    for e, merged, delta, qw in merged_experts(base, adapter, name, dtype):
        if delta is not None:
            new, report = requantize(merged, delta, qw, f"{name}[{e}]")
            reports.append(report)
            yield new.to_bnb(weight.key(e)), qw
        elif name in base.quantized_experts:
            yield base.raw_entries(base.quantized_experts[name][e]), qw
        else:
            yield qw.to_bnb(weight.key(e)), qw


def export_nf4(
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
) -> tuple[Path, list[LayerReport]]:
    """Merge `adapter` into `base` (onto the dequantized 4-bit weights) and re-quantize.

    Merged layers are quantized with their base layer's quant type, blocksize and double
    quantization; MoE experts are written in our 4-bit layout (one bitsandbytes weight per expert
    matrix, `<experts module>.<e>.<param>`, as `convert_checkpoint` writes them), re-quantized
    per expert where the adapter has expert LoRA (one report per expert, `<name>[e]`); layers the adapter does not touch keep their 4-bit bytes (a bitsandbytes base)
    or are quantized as `qlora_compile.compile` does (a 16-bit base). Arguments as in
    `export_merged`; `dtype` is also the dtype the merged weights are rounded to before
    re-quantizing, and the compute dtype recorded in quantization_config. Modules the adapter trains
    in full stay dense, with its tensors, and are listed in `llm_int8_skip_modules` (with every
    other linear left dense), so transformers + bitsandbytes loads them dense.

    Sharded and resumable as `export_merged` (a resumed run reports the layers of the shards it
    reuses too, from its manifest).

    Returns:
        (out, one LayerReport per merged layer).
    """
    check_bnb_quant_type(quant_type, "an NF4 export (a bitsandbytes 4-bit folder)")
    dtype = parse_dtype(dtype)
    base_model, lora = open_inputs(base, adapter, quant_type, blocksize, double_quant)

    def entries(item: tuple[str, str]) -> tuple[list[Entry], dict | None]:
        """The item's entries, and a note of what `finish` needs (kept in the manifest for a resumed
        run): its reports, quantization settings and (a linear's) weight dtype."""
        kind, name = item
        if kind == "dense":
            return [dense_entry(base_model, lora, name, dtype)], None
        if kind == "experts":
            reports: list[LayerReport] = []
            out, kinds = [], set()
            for bnb, qw in expert_entries(base_model, lora, name, dtype, reports):
                kinds.add((qw.quant_type, qw.double_quant))
                out += [Entry.of(k, t) for k, t in bnb.items()]
            return out, {"reports": [asdict(r) for r in reports], "kinds": sorted(kinds), "dtype": None}
        return _linear_entries(base_model, lora, name, dtype)

    def finish(path: Path, written) -> None:
        notes = [n for n in written.notes if n is not None]
        reports.extend(LayerReport(**r) for n in notes for r in n["reports"])
        (qt, dq), *others = sorted({tuple(k) for n in notes for k in n["kinds"]})
        if others:
            raise InvalidFolderError(
                f"{base_model.dir}: mixed quantization settings {[(qt, dq), *others]} cannot be described"
            )
        weight_dtype = next((n["dtype"] for n in notes if n["dtype"]), None)
        dense = [
            m for m in base_model.all_linears if m not in base_model.quantized and m not in base_model.head
        ]
        skip = sorted(dense + sorted(base_model.head)) if dense else None
        qconfig = bnb_quantization_config(qt, dq, dtype or weight_dtype, skip)
        write_config(base_model, path, dtype, qconfig)

    reports: list[LayerReport] = []
    options = {"format": "nf4", "dtype": str(dtype), "quant": [quant_type, blocksize, double_quant]}
    write_export(
        base_model, lora, out, entries,
        size=lambda item: estimated_bytes(base_model, *item, 0.52),  # 4.127 bits
        finish=finish, options=options, max_shard_size=max_shard_size, progress=progress,
    )  # fmt: skip
    return Path(out), reports


def _linear_entries(base, lora, name: str, dtype: torch.dtype | None) -> tuple[list[Entry], dict]:
    """A target linear: merged and re-quantized (with its report) where the adapter has LoRA on it,
    else the base's 4-bit bytes (a bitsandbytes base) or its weight quantized as `compile` does."""
    reports = []
    if lora is not None and name in lora.pairs:
        new, report, qw = requantized(base, lora, name, dtype)
        reports.append(asdict(report))
        bnb = new.to_bnb(name)
    elif base.bnb:
        qw = base.quantized_weight(name)
        bnb = base.raw_entries(name)
    else:
        qw = base.quantized_weight(name)
        bnb = qw.to_bnb(name)
    note = {
        "reports": reports,
        "kinds": [(qw.quant_type, qw.double_quant)],
        "dtype": str(qw.dtype).removeprefix("torch."),
    }
    return [Entry.of(k, t) for k, t in bnb.items()], note
