"""Mixture-of-experts weights in checkpoints: where each expert's matrix is on disk, and our 4-bit keys.

transformers 5 keeps an MoE layer's experts as 3-D parameters (`mlp.experts.gate_up_proj`
(E, 2I, H), `down_proj` (E, H, I)), but its `save_pretrained` reverts its conversion mapping and
writes one 2-D tensor per expert and projection, as the hub's checkpoints have them: Mixtral
`block_sparse_moe.experts.{e}.w1` / `w3` / `w2.weight`, Qwen2/3-MoE and OLMoE
`mlp.experts.{e}.gate_proj` / `up_proj` / `down_proj.weight`. `from_pretrained` fuses them back
(`MergeModulelist(dim=0)`, then `Concatenate(dim=1)` of gate and up). Models without such a
mapping (gpt-oss) store the 3-D tensors as they are. `expert_weights` reads that mapping off
transformers itself, so every family it fuses is found the same way.

Our 4-bit layout: one bitsandbytes-serialized weight per expert and fused parameter, keyed
`<experts module>.<e>.<parameter>` (`model.layers.0.mlp.experts.3.gate_up_proj.weight`,
`.weight.absmax`, ..., `.weight.quant_state.bitsandbytes__nf4`), holding expert e's
(out_features, in_features) matrix exactly as `compile` quantizes it: gate and up together, so
one quantization (one double-quantization offset) per expert matrix, as `QuantizedExperts` keeps it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InvalidFolderError, UnsupportedError
from ..experts import expert_parameters

# the operations transformers fuses per-expert tensors with: stack the experts, then concatenate the parts
_FUSE_OPS = (["MergeModulelist"], ["MergeModulelist", "Concatenate"])


@dataclass
class ExpertWeight:
    """One 3-D expert parameter of a model and where its experts are stored.

    Attributes:
        module: the experts module's name (`model.layers.0.mlp.experts`).
        param: the parameter (`gate_up_proj`).
        num_experts: E.
        shape: one expert's (out_features, in_features).
        transposed: the parameter is stored (E, in, out) (`is_transposed`).
        parts: per expert, the checkpoint keys whose rows, concatenated, make its stored matrix
            (Mixtral's gate_up_proj: [w1, w3]); empty when the checkpoint holds the 3-D tensor.
        fused: the checkpoint key of the 3-D tensor, when it holds one.
    """

    module: str
    param: str
    num_experts: int
    shape: tuple[int, int]
    transposed: bool
    parts: list[list[str]] = field(default_factory=list)
    fused: str | None = None

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param}"

    def key(self, expert: int) -> str:
        """The bitsandbytes prefix of expert `expert`'s 4-bit matrix in our layout."""
        return f"{self.module}.{expert}.{self.param}"

    def source_keys(self) -> list[str]:
        return [self.fused] if self.fused else [k for keys in self.parts for k in keys]

    def matrix(self, expert: int, read: Callable[[str, int | None], torch.Tensor]) -> torch.Tensor:
        """Expert `expert`'s (out_features, in_features) matrix; `read(key, None)` gives a stored
        tensor, `read(key, e)` its slice e along dim 0 (one expert of a 3-D tensor)."""
        stored = self.stored(expert, read)
        return stored.t() if self.transposed else stored

    def stored(self, expert: int, read: Callable[[str, int | None], torch.Tensor]) -> torch.Tensor:
        """Expert `expert`'s slice of the 3-D parameter, in its stored layout (see `matrix`)."""
        if self.fused:
            return read(self.fused, expert)
        return torch.cat([read(k, None) for k in self.parts[expert]])

    def split(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """An (out, in) matrix cut into the stored parts (rows of the stored layout), in `parts` order."""
        stored = matrix.t() if self.transposed else matrix
        n = len(self.parts[0]) if self.parts else 1
        return list(stored.chunk(n))


def _experts_modules(model: nn.Module) -> dict[str, tuple[nn.Module, list[str]]]:
    out = {}
    for name, module in model.named_modules():
        params = expert_parameters(module)
        if params:
            out[name] = (module, params)
    return out


def _weight(model: nn.Module, module_name: str, param: str) -> ExpertWeight:
    module = model.get_submodule(module_name)
    e, a, b = getattr(module, param).shape
    transposed = bool(module.is_transposed)
    return ExpertWeight(module_name, param, e, (b, a) if transposed else (a, b), transposed)


def _conversions(model: nn.Module, reverse: bool = False):
    """(renamings, converters) of transformers' conversion mapping for `model` (the save direction when
    `reverse`, as `revert_weight_conversion` builds it)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model, add_legacy=not reverse) or []
    if reverse:
        transforms = [t for t in transforms if not isinstance(t, PrefixChange)]
        transforms = [t.reverse_transform() for t in transforms[::-1]]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def renamer(model: nn.Module) -> Callable[[str], str]:
    """A key -> the key as `from_pretrained` renames it before fusing (Mixtral's `block_sparse_moe.`
    -> `mlp.`)."""
    from transformers.core_model_loading import apply_renamings

    renamings = _conversions(model)[0]
    return lambda key: apply_renamings(key, renamings)


def _check_ops(converter, target: str) -> None:
    ops = [type(op).__name__ for op in getattr(converter, "operations", [])]
    if ops not in [list(o) for o in _FUSE_OPS]:
        raise UnsupportedError(
            f"{target}: transformers fuses its experts with {ops}; only per-expert tensors stacked "
            "(MergeModulelist) and concatenated along rows (Concatenate(dim=1)) are supported"
        )


def expert_weights(
    model: nn.Module, keys: list[str], shapes: dict[str, tuple[int, ...]]
) -> dict[str, ExpertWeight]:
    """The model's 3-D expert parameters found among checkpoint `keys`, by `<module>.<param>`.

    Each key is renamed as `from_pretrained` renames it (the model's conversion mapping, then the
    base-model prefix added or dropped); the keys a converter fuses into an expert parameter become
    its `parts` (by expert index and position in the converter's sources), a key that already is
    the 3-D parameter its `fused`. Keys of nothing else are left out.

    Args:
        model: the model class built on the meta device (its module tree).
        shapes: the stored shape of each key.

    Raises:
        ValueError: an expert parameter is only partly stored, or with other shapes than the model's.
    """
    from transformers.core_model_loading import rename_source_key

    modules = _experts_modules(model)
    if not modules:
        return {}
    targets = {f"{m}.{p}": (m, p) for m, (_, params) in modules.items() for p in params}
    renamings, converters = _conversions(model)
    meta = dict.fromkeys(targets, True)
    prefix = getattr(model, "base_model_prefix", None) or None
    found: dict[str, ExpertWeight] = {}
    slots: dict[str, dict[tuple[int, int], str]] = {}
    for key in keys:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in targets:
            continue
        weight = found.setdefault(renamed, _weight(model, *targets[renamed]))
        if pattern is None:
            weight.fused = key
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        _check_ops(converter, renamed)
        index = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
        slots.setdefault(renamed, {})[(int(index.group(1)), converter.source_patterns.index(pattern))] = key
    for name, weight in found.items():
        _fill_parts(weight, slots.get(name, {}), shapes)
    return found


def _fill_parts(weight: ExpertWeight, slots: dict[tuple[int, int], str], shapes) -> None:
    e = weight.num_experts
    stored = weight.shape[::-1] if weight.transposed else weight.shape
    if weight.fused:
        if slots or tuple(shapes[weight.fused]) != (e, *stored):
            raise InvalidFolderError(
                f"{weight.name}: the checkpoint's {weight.fused} {tuple(shapes[weight.fused])} is not the "
                f"model's ({e}, {stored[0]}, {stored[1]})"
                + (" and it has per-expert tensors too" if slots else "")
            )
        return
    n_parts = 1 + max(k for _, k in slots)
    missing = [(x, k) for x in range(e) for k in range(n_parts) if (x, k) not in slots]
    if missing:
        raise InvalidFolderError(
            f"{weight.name}: the checkpoint lacks (expert, part) {missing[:5]} of {e} experts"
        )
    weight.parts = [[slots[(x, k)] for k in range(n_parts)] for x in range(e)]
    rows = sum(shapes[k][0] for k in weight.parts[0])
    bad = [k for keys in weight.parts for k in keys if tuple(shapes[k]) != (stored[0] // n_parts, stored[1])]
    if rows != stored[0] or bad:
        raise InvalidFolderError(
            f"{weight.name}: per-expert tensors {bad[:3]} do not make one expert's {stored}"
        )


def save_layout(model: nn.Module, weight: ExpertWeight) -> ExpertWeight:
    """`weight` with `parts` / `fused` set to the keys transformers' `save_pretrained` writes for it
    (the reverse of its conversion mapping), so a folder written with them loads in transformers."""
    from transformers.core_model_loading import apply_renamings

    renamings, converters = _conversions(model, reverse=True)
    for converter in converters:
        for source in converter.source_patterns:  # reversed: the fused name's pattern
            if not weight.name.endswith(source):
                continue
            _check_ops(converter.reverse_transform(), weight.name)
            stem = weight.name[: -len(source)]
            parts = [
                [apply_renamings(stem + t.replace("*", str(e)), renamings) for t in converter.target_patterns]
                for e in range(weight.num_experts)
            ]
            return ExpertWeight(
                weight.module, weight.param, weight.num_experts, weight.shape, weight.transposed, parts
            )
    fused = apply_renamings(weight.name, renamings)
    return ExpertWeight(
        weight.module, weight.param, weight.num_experts, weight.shape, weight.transposed, fused=fused
    )


def quantized_experts(
    model: nn.Module, prefixes: list[str]
) -> dict[str, tuple[ExpertWeight, dict[int, str]]]:
    """Our 4-bit layout read back: {`<module>.<param>`: (its ExpertWeight, {expert: prefix})} for the
    bitsandbytes prefixes (`<experts module>.<e>.<param>`) that name one expert of the model."""
    modules = _experts_modules(model)
    out: dict[str, tuple[ExpertWeight, dict[int, str]]] = {}
    for prefix in prefixes:
        m = re.fullmatch(r"(.+)\.(\d+)\.([^.]+)", prefix)
        if m is None or m.group(1) not in modules or m.group(3) not in modules[m.group(1)][1]:
            continue
        name = f"{m.group(1)}.{m.group(3)}"
        weight, by_expert = out.setdefault(name, (_weight(model, m.group(1), m.group(3)), {}))
        by_expert[int(m.group(2))] = prefix
    for name, (weight, by_expert) in out.items():
        if sorted(by_expert) != list(range(weight.num_experts)):
            raise InvalidFolderError(
                f"{name}: 4-bit experts {sorted(by_expert)} stored, the model has {weight.num_experts}"
            )
    return out
