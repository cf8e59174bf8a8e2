"""`load_quantized`: a bitsandbytes 4-bit folder in, a Hugging Face model with our `QuantizedLinear`s out.

Reads what transformers' `save_pretrained` writes for a `load_in_4bit` model (or what
`convert_checkpoint` writes). The model is built with its parameters on the meta device, each
quantized module is replaced by a `QuantizedLinear` holding the file's bytes as they are (no
dequantize, no requantize), and the remaining tensors are assigned from the file.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ..errors import UnsupportedError
from ..experts import QuantizedExperts, install
from ..format import QuantizedWeight
from ..modules import QuantizedLinear
from . import skeleton
from .expert_layout import expert_weights, quantized_experts, renamer
from .model_folder import ConversionError, ModelFolder

logger = logging.getLogger(__name__)


def _rename(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Add or strip `base_model_prefix` when the file and the model class disagree about it."""
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    prefix = getattr(model, "base_model_prefix", "")
    if (
        not prefix
        or not tensors
        or any(k in names for k in tensors if not k.endswith((".absmax", ".quant_map")))
    ):
        return tensors
    has_prefix = any(n.startswith(prefix + ".") for n in names)
    if has_prefix:
        return {f"{prefix}.{k}": v for k, v in tensors.items()}
    return {k.removeprefix(prefix + "."): v for k, v in tensors.items()}


def _take_weight(tensors: dict[str, torch.Tensor], prefix: str) -> QuantizedWeight:
    """The 4-bit weight stored under `prefix`, its entries taken out of `tensors`."""
    entries = {k: tensors.pop(k) for k in list(tensors) if k.startswith(prefix + ".weight")}
    return QuantizedWeight.from_bnb(entries, prefix)


def _stack_dense_experts(tensors: dict[str, torch.Tensor], model: nn.Module, packed: set[str]) -> None:
    """Per-expert dense tensors (transformers + bitsandbytes leaves experts dense and saves them per
    expert) stacked into the model's 3-D parameters, as `from_pretrained` stacks them. `packed`:
    4-bit weights, never dense experts (Qwen-MoE's `experts.{e}.down_proj.weight` is both a
    transformers key and one of ours)."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if k not in packed}
    for name, weight in expert_weights(model, list(shapes), shapes).items():
        if weight.parts:
            tensors[name] = torch.stack(
                [weight.stored(e, lambda k, _: tensors.pop(k)) for e in range(weight.num_experts)]
            )


def load_quantized(
    path: str | os.PathLike,
    *,
    model_class: type | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a bitsandbytes 4-bit Hugging Face folder into the model class, with our `QuantizedLinear`s.

    Args:
        path: a folder with config.json (quantization_config: bitsandbytes, load_in_4bit) and
            model.safetensors or shards with an index.
        model_class: the class to build (default: `config.architectures[0]`, else
            `AutoModelForCausalLM`'s class for the config); a transformers Auto class works too.
        dtype: cast the dense (non-quantized) floating tensors to this dtype (default: as stored).
        device: where the model goes. "meta": nothing is read but the 4-bit statistics (quant
            state, nested absmax); every other tensor is a meta tensor of its stored shape, for
            `qlora_compile.distributed.shard(model, weights=path)` to read each rank's rows.

    Returns:
        The model in eval mode; each quantized linear is a `QuantizedLinear` whose buffers hold the
        file's bytes, and each 3-D expert weight stored per expert in 4 bits (`convert_checkpoint`'s
        layout, `checkpoint/expert_layout.py`) a `QuantizedExperts` holding them (compute dtype: the
        folder's `bnb_4bit_compute_dtype`). `qlora_compile.compile(model)` turns them into QLoRA layers without
        requantizing.
    """

    folder = ModelFolder(path)
    path = folder.path
    quant = folder.check_bnb_4bit()
    config = folder.config()
    if model_class is not None and hasattr(model_class, "_model_mapping"):  # an Auto class
        model_class = model_class._model_mapping[type(config)]
    cls = model_class or skeleton.model_class(config)
    model = skeleton.skeleton(config, cls, real_buffers=True)
    rename = renamer(model)
    meta = torch.device(device).type == "meta"
    stored = folder.read_meta(_statistic) if meta else folder.read_all()
    tensors = {rename(k): v for k, v in stored.items()}  # transformers' renamings
    tensors = _rename(tensors, model)
    keys = _rename({rename(k): k for k in stored}, model)  # the model's names -> the folder's
    prefixes = list(folder.bnb_groups(tensors))
    _stack_dense_experts(tensors, model, {f"{p}.weight" for p in prefixes})
    experts = quantized_experts(model, prefixes)
    if meta and experts:
        raise UnsupportedError(f"{path}: device='meta' does not load 4-bit experts yet")
    sources = {}  # device="meta": parameter or buffer name -> the folder's key it will be read from
    compute_dtype = getattr(
        torch, str(quant.get("bnb_4bit_compute_dtype", "bfloat16")).removeprefix("torch.")
    )
    for name, (weight, by_expert) in experts.items():
        stack = [_take_weight(tensors, by_expert[e]) for e in range(weight.num_experts)]
        wrong = [s.shape for s in stack if tuple(s.shape) != weight.shape]
        if wrong:
            raise ConversionError(
                f"{path}: {name}: 4-bit experts of shape {wrong[0]}, the model's are {weight.shape}"
            )
        install(
            model.get_submodule(weight.module),
            weight.param,
            QuantizedExperts(stack, compute_dtype=compute_dtype),
        )
    for prefix in [p for p in prefixes if f"{p}.weight" in tensors]:
        qw = _take_weight(tensors, prefix)
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            raise ConversionError(
                f"{path}: {prefix} is quantized in the file but is not a module of {cls.__name__}"
            ) from None
        if not isinstance(module, skeleton.linear_kinds()):
            raise ConversionError(
                f"{path}: {prefix} is quantized in the file but is a {type(module).__name__}"
            )
        bias = tensors.pop(f"{prefix}.bias", None)
        if bias is not None and dtype is not None:
            bias = bias.to(dtype)
        parent, _, child = prefix.rpartition(".")
        sources[f"{prefix}.weight_packed"] = keys[f"{prefix}.weight"]
        sources[f"{prefix}.weight_absmax"] = keys[f"{prefix}.weight.absmax"]
        if bias is not None:
            sources[f"{prefix}.bias"] = keys[f"{prefix}.bias"]
        layer = QuantizedLinear(
            qw, bias, fan_in_fan_out=not isinstance(module, nn.Linear)
        )  # Conv1D: (in, out)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if getattr(model, "tie_weights", None) is not None:
        model.tie_weights()
    stored = set(tensors) | {  # on meta (device="meta"): stored, to be read by rank later
        f"{n}.{b}"
        for n, m in model.named_modules()
        if isinstance(m, (QuantizedLinear, QuantizedExperts))
        for b in m._buffers
    }
    missing = [
        n for n, p in model.named_parameters() if p.device.type == "meta" and not (meta and n in stored)
    ]
    missing += [
        n
        for n, b in model.named_buffers()
        if b is not None and b.device.type == "meta" and not (meta and n in stored)
    ]
    if missing:
        raise ConversionError(f"{path}: tensors missing from the checkpoint: {', '.join(missing[:5])}")
    if result.unexpected_keys:
        logger.warning(
            "%s: tensors that %s does not have are ignored: %s",
            path,
            cls.__name__,
            ", ".join(result.unexpected_keys[:5]),
        )
    if not meta:
        return model.to(device).eval()
    sources.update({k: keys[k] for k in tensors if k in keys})
    model._qlora_meta_sources, model._qlora_meta_folder = sources, str(path)  # read by distributed.shard
    return model.eval()


def _statistic(key: str) -> bool:
    """A 4-bit entry read even on meta: the quant state (JSON) and nested absmax, a few bytes."""
    return ".quant_state." in key or key.endswith(".nested_absmax")
