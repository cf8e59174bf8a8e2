"""The model skeleton a checkpoint belongs to, and which of its modules transformers quantizes.

The converter never loads weights into a model: it builds the model class on the meta device
(no memory) only to learn its module tree, tied weights and `_keep_in_fp32_modules`, and applies
the rules transformers' bitsandbytes 4-bit quantizer applies (`get_keys_to_not_convert`,
`should_convert_module`, `replace_with_bnb_linear`: exactly `nn.Linear` and `Conv1D` modules).
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from ..errors import InvalidConfigError


def model_class(config, auto_class=None):
    """The class the checkpoint was saved from (`config.architectures[0]`), else `auto_class`'s
    (default: a causal LM), else the base model's.

    Raises:
        ValueError: transformers has no model class for the config's model_type.
    """
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    for auto in (auto_class or transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    raise InvalidConfigError(f"transformers has no model class for model_type {config.model_type!r}")


@contextlib.contextmanager
def params_on_meta():
    """Parameters created inside are on the meta device; buffers (rotary tables...) are real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def skeleton(config, cls, *, real_buffers: bool = False) -> nn.Module:
    """An instance of `cls` whose parameters are on the meta device (everything, unless `real_buffers`)."""
    context = params_on_meta() if real_buffers else torch.device("meta")
    with context:
        return cls(config)


def _keys_to_not_convert(model: nn.Module) -> list[str]:
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        return list(get_keys_to_not_convert(model))
    except ImportError:  # the same rule, for transformers versions that moved it
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        keys = set(tied) | set(tied.values())
        keys.add(list(model.named_parameters())[-1][0])
        head = model.get_output_embeddings()
        keys |= {n for n, m in model.named_modules() if head is not None and m is head}
        return list({k.removesuffix(".weight") for k in keys})


def should_convert(name: str, patterns: list[str]) -> bool:
    """transformers' `should_convert_module`: a pattern matches a module-boundary prefix, a regex or a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)


def linear_kinds() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def modules_to_not_convert(model: nn.Module, skip: list[str] | None) -> list[str]:
    """transformers' default skips (output head, tied weights, last parameter), then `skip`, then the
    modules the model keeps in fp32.

    `_keep_in_fp32_modules` is what transformers' bitsandbytes quantizer skips. We skip
    `_keep_in_fp32_modules_strict` too (entries may name a parameter, `gate.weight`: its module is
    skipped): such modules are forced to fp32 in every dtype, which a 4-bit weight would defeat.
    `compile` and the converter both select with this rule.
    """
    names = _keys_to_not_convert(model)
    names += list(skip or [])
    names += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    strict = getattr(model, "_keep_in_fp32_modules_strict", None) or []
    names += [re.sub(r"\.(weight|bias)$", "", n) for n in strict]
    return sorted(set(names))


def quantized_modules(model: nn.Module, not_convert: list[str]) -> dict[str, bool]:
    """{module name: is a Conv1D (stored transposed)} of the modules bitsandbytes 4-bit replaces."""
    _, conv1d = linear_kinds()
    chosen = {}
    for name, module in model.named_modules():
        if not should_convert(name, not_convert):
            continue
        if type(module) is nn.Linear or isinstance(module, conv1d):
            chosen[name] = isinstance(module, conv1d)
    return chosen


def fp32_patterns(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Module names transformers keeps in fp32 when the model loads in `dtype`."""
    patterns = []
    if dtype == torch.float16:
        patterns += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return patterns


def keeps_fp32(key: str, patterns: list[str]) -> bool:
    return any(re.search(rf"(^|\.){re.escape(p)}(\.|$)", key) for p in patterns)
