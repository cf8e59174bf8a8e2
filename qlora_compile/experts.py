"""Mixture-of-experts layers in 4-bit: `QuantizedExperts`, and the experts forward that uses them.

transformers 5 keeps the experts of an MoE layer as 3-D parameters of one module (classes
decorated by `use_experts_implementation`: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, gpt-oss, ...):
`gate_up_proj` (E, 2I, H) (`up_proj` when the experts have no gate) and `down_proj` (E, H, I),
each expert's matrix stored (out_features, in_features), or (in, out) when the class says
`is_transposed`.

`rewrite_experts` replaces each of those parameters by a `QuantizedExperts` child of the same
name: expert e's (out, in) matrix is quantized on its own by `quantize_weight` (so its bytes are
bitsandbytes' `quantize_4bit` of that matrix), and the E results are stacked along dim 0 in
buffers, so one expert's bytes are a slice that dequantizes without touching the others. The
3-D parameter is dropped at once. LoRA, when the parameter is in `target_parameters`, follows
PEFT's `ParamWrapper` (`LoraConfig(target_parameters=...)`): `lora_A` (r * E, in) and `lora_B`
(out, r * E), expert e's update `scaling * B_e A_e` with `A_e = lora_A.weight.view(E, r, in)[e]`
and `B_e = lora_B.weight.view(out, r, E)[:, :, e]`, no dropout (PEFT refuses it there).

The module keeps its object and attributes (router weights live elsewhere; `act_fn`, biases,
`_apply_gate` stay); its class becomes a subclass whose forward is transformers'
`grouped_mm_experts_forward` (sort the (token, expert) pairs by expert, one product per expert,
gate, weight by the router, sum over top-k), with each product one `qlora::experts_linear` node
(plus two `qlora::grouped_mm` nodes for LoRA): no data-dependent shape, no graph break.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from .errors import InvalidArgumentError
from .format import QuantizedWeight
from .lora import lora_scaling

logger = logging.getLogger(__name__)
EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")
_BUFFERS = ("weight_packed", "weight_absmax", "weight_nested_absmax", "weight_offset")


class QuantizedExperts(nn.Module):
    """E frozen 4-bit (out_features, in_features) weights, one per expert, plus optional LoRA.

    Args:
        weights: one `QuantizedWeight` per expert, all of one shape and format.
        compute_dtype: dtype of the base products.
    """

    def __init__(self, weights: list[QuantizedWeight], *, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        first = weights[0]
        if len(first.shape) != 2 or any(w.shape != first.shape for w in weights):
            raise InvalidArgumentError(
                f"QuantizedExperts needs E weights of one 2-D shape, got {[tuple(w.shape) for w in weights]}"
            )
        self.num_experts = len(weights)
        self.out_features, self.in_features = first.shape
        self.quant_type, self.blocksize, self.weight_dtype = first.quant_type, first.blocksize, first.dtype
        self.compute_dtype = compute_dtype

        def stack(get) -> torch.Tensor | None:
            parts = [get(w) for w in weights]
            return None if parts[0] is None else torch.stack([p.reshape(-1) if p.dim() else p for p in parts])

        self.register_buffer("weight_packed", stack(lambda w: w.packed))  # (E, ceil(n / 2)) uint8
        self.register_buffer("weight_absmax", stack(lambda w: w.absmax))  # (E, n_blocks)
        self.register_buffer(
            "weight_nested_absmax", stack(lambda w: w.nested_absmax)
        )  # (E, ...) fp32 or None
        self.register_buffer("weight_offset", stack(lambda w: w.offset))  # (E,) fp32 or None
        self.r: int | None = None
        self.lora_A: nn.Linear | None = None
        self.lora_B: nn.Linear | None = None

    @property
    def shape(self) -> list[int]:
        return [self.num_experts, self.out_features, self.in_features]

    @property
    def nbytes(self) -> int:
        """Bytes of the 4-bit weights and their statistics (LoRA not counted)."""
        return sum(
            t.numel() * t.element_size() for t in (getattr(self, b) for b in _BUFFERS) if t is not None
        )

    def quantized_weight(self, expert: int) -> QuantizedWeight:
        """Expert `expert`'s weight (views of the stacked buffers)."""
        nested, offset = self.weight_nested_absmax, self.weight_offset
        return QuantizedWeight(
            self.weight_packed[expert].view(-1, 1), self.weight_absmax[expert], self.quant_type, self.blocksize,
            torch.Size((self.out_features, self.in_features)), self.weight_dtype,
            None if nested is None else nested[expert], None if offset is None else offset[expert],
        )  # fmt: skip

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(E, out_features, in_features) dense weights."""
        return torch.stack([self.quantized_weight(e).dequantize(dtype) for e in range(self.num_experts)])

    def add_lora(
        self, r: int, lora_alpha: float, use_rslora: bool = False, adapter_dtype: torch.dtype = torch.float32
    ) -> None:
        """PEFT's `ParamWrapper` adapters: kaiming-uniform `lora_A`, zero `lora_B`, PEFT's scaling
        (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
        device, e = self.weight_packed.device, self.num_experts
        self.r, self.lora_alpha, self.scaling = r, lora_alpha, lora_scaling(r, lora_alpha, use_rslora)
        self.lora_A = nn.Linear(self.in_features, r * e, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r * e, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)
        nn.init.zeros_(self.lora_B.weight)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (E, r, in), B (E, out, r)) views of the PEFT-layout adapters."""
        return lora_factors(self.lora_A.weight, self.lora_B.weight, self.num_experts)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(S, out_features) for rows `x` (S, in_features) grouped by expert, `counts[e]` rows each."""
        base = torch.ops.qlora.experts_linear(
            x.to(self.compute_dtype), counts, self.weight_packed, self.weight_absmax,
            self.weight_nested_absmax, self.weight_offset, self.quant_type, self.blocksize, self.shape,
        )  # fmt: skip
        if self.lora_A is None:
            return base.to(x.dtype)
        a, b = self.lora_factors()
        xl = x.to(self.lora_A.weight.dtype)
        lora = torch.ops.qlora.grouped_mm(torch.ops.qlora.grouped_mm(xl, a, counts), b, counts) * self.scaling
        return base.to(x.dtype) + lora.to(x.dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.weight_nested_absmax is not None else ""
        lora = f", r={self.r}, lora_alpha={self.lora_alpha}" if self.r else ""
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.quant_type}, blocksize={self.blocksize}{dq}{lora}")  # fmt: skip


class QLoRAExpertsMixin:
    """The forward of an experts module whose weights are `QuantizedExperts` children.

    transformers' `grouped_mm_experts_forward` (integrations/moe.py) step for step, the products
    through the children: same routing (the router's top-k indices and weights), same gate
    (`self._apply_gate`, or `act_fn` without a gate), biases, post-expert norm, and the sum over
    the top-k in the output's dtype.
    """

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        num_top_k, (num_tokens, hidden_dim) = top_k_index.size(-1), hidden_states.shape
        sample_weights, expert_ids = (
            top_k_weights.reshape(-1),
            top_k_index.reshape(-1),
        )  # (S,), S = tokens * top_k
        expert_ids_g, perm = torch.sort(expert_ids)
        x = hidden_states[perm // num_top_k]  # (S, hidden) grouped by expert
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts = counts.scatter_add(0, expert_ids, torch.ones_like(expert_ids, dtype=torch.int64))
        up = "gate_up_proj" if self.has_gate else "up_proj"
        proj = getattr(self, up)(x, counts)
        if self.has_bias:
            proj = proj + getattr(self, f"{up}_bias")[expert_ids_g]
        proj = self._apply_gate(proj) if self.has_gate else self.act_fn(proj)
        proj = self.down_proj(proj, counts)
        if self.has_bias:
            proj = proj + self.down_proj_bias[expert_ids_g]
        if self.has_post_expert_norm:
            proj = self.post_expert_norm(proj)
        weighted = proj * sample_weights[perm].unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
        out = weighted[inv_perm].view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
        return out.to(hidden_states.dtype)


_CLASSES: dict[type, type] = {}


def _quantized_class(cls: type) -> type:
    if issubclass(cls, QLoRAExpertsMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"QLoRA{cls.__name__}", (QLoRAExpertsMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def expert_parameters(module: nn.Module) -> list[str]:
    """Names of `module`'s 3-D expert weights in registration order ([] if it is not a transformers
    experts module). The order decides PEFT's nesting of its `ParamWrapper`s."""
    if not all(hasattr(module, a) for a in ("has_gate", "is_transposed", "num_experts")):
        return []
    names = [n for n, p in module.named_parameters(recurse=False) if n in EXPERT_PARAMETERS and p.dim() == 3]
    names += [
        n for n, m in module.named_children() if n in EXPERT_PARAMETERS and isinstance(m, QuantizedExperts)
    ]
    return names


def is_experts(module: nn.Module) -> bool:
    return bool(expert_parameters(module))


def matches(key: str, names) -> bool:
    """PEFT's rule for `target_parameters`: the full key, or a suffix after a dot."""
    return any(key == t or key.endswith("." + t) for t in names)


def _unsupported(module: nn.Module, weight: torch.Tensor) -> str | None:
    if getattr(module, "_is_expert_parallel", False):
        return "expert-parallel experts (sentinel routing) are not supported"
    if not weight.dtype.is_floating_point:
        return f"weight dtype {weight.dtype} is not a float dtype (already quantized?)"
    return None


def rewrite_experts(
    name: str,
    module: nn.Module,
    *,
    quantize: Callable[[torch.Tensor], QuantizedWeight],
    compute_dtype: torch.dtype,
    lora: tuple[int, float, bool] | None,
    target_parameters,
    record: Callable,
) -> None:
    """Quantize each 3-D expert weight of `module` in place, one parameter at a time.

    Args:
        quantize: turns one expert's (out, in) matrix into a `QuantizedWeight`.
        lora: (r, lora_alpha, use_rslora) for parameters that `target_parameters` names, None for no LoRA.
        record: `record(param_name, kind, shape, bytes_before)` returns a `pipeline.Rewrite`
            whose `bytes_after` / `skipped` this function fills in.
    """
    kind = type(module).__name__
    for pname in expert_parameters(module):
        weight = module._parameters.get(pname)
        if weight is None:  # already 4-bit (load_quantized): keep its bytes, add what the config asks
            _adopt(name, pname, getattr(module, pname), compute_dtype, lora, target_parameters, record)
            continue
        rec = record(pname, kind, tuple(weight.shape), weight.numel() * weight.element_size())
        reason = _unsupported(module, weight)
        if reason is not None:
            rec.skipped = reason
            logger.warning("qlora_compile: skipping %s.%s: %s", name, pname, reason)
            continue
        w = weight.detach()
        mats = [(w[e].t() if module.is_transposed else w[e]) for e in range(w.shape[0])]  # (out, in) each
        experts = QuantizedExperts([quantize(m) for m in mats], compute_dtype=compute_dtype)
        if lora is not None and matches(f"{name}.{pname}", target_parameters):
            experts.add_lora(*lora)
        del w, mats, weight
        install(module, pname, experts)  # the 3-D parameter goes now
        rec.bytes_after = experts.nbytes


def _adopt(name, pname, experts: QuantizedExperts, compute_dtype, lora, target_parameters, record) -> None:
    rec = record(pname, type(experts).__name__, tuple(experts.shape), experts.nbytes)
    rec.bytes_after = experts.nbytes
    experts.compute_dtype = compute_dtype
    if lora is not None and experts.lora_A is None and matches(f"{name}.{pname}", target_parameters):
        experts.add_lora(*lora)


def install(module: nn.Module, pname: str, experts: QuantizedExperts) -> None:
    """Put `experts` in place of `module`'s 3-D parameter `pname` (dropped) and give the module the
    forward that runs through its `QuantizedExperts` children."""
    module._parameters.pop(pname, None)
    module.add_module(pname, experts)
    module.__class__ = _quantized_class(type(module))


def peft_lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The experts' LoRA parameters under PEFT's state-dict keys (without `base_model.model.`).

    PEFT wraps each targeted parameter of a module in a `ParamWrapper`, the first registered
    innermost, so the keys are `<module>.` + `base_layer.` * (parameters wrapped after this one)
    + `lora_A.weight` / `lora_B.weight`.
    """
    out = {}
    for name, module in model.named_modules():
        for pname, key in peft_prefixes(name, _adapted(module)).items():
            child = getattr(module, pname)
            out[f"{key}.lora_A.weight"] = child.lora_A.weight
            out[f"{key}.lora_B.weight"] = child.lora_B.weight
    return out


def peft_prefixes(module: str, adapted: list[str]) -> dict[str, str]:
    """{parameter: PEFT's key prefix of its LoRA} for the `adapted` expert weights of `module`, given
    in registration order: `<module>` + `.base_layer` * (parameters wrapped after this one)."""
    return {p: module + ".base_layer" * (len(adapted) - 1 - i) for i, p in enumerate(adapted)}


def lora_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (E, r, in), B (E, out, r)) views of PEFT's `ParamWrapper` tensors `lora_A` (r * E, in)
    and `lora_B` (out, r * E)."""
    r = lora_a.shape[0] // num_experts
    return lora_a.view(num_experts, r, lora_a.shape[1]), lora_b.view(lora_b.shape[0], r, num_experts).permute(
        2, 0, 1
    )


def adapted_experts(model: nn.Module) -> dict[str, QuantizedExperts]:
    """`{"<module>.<parameter>": QuantizedExperts}` of every expert weight that has LoRA."""
    return {
        f"{name}.{p}": getattr(module, p) for name, module in model.named_modules() for p in _adapted(module)
    }


def _adapted(module: nn.Module) -> list[str]:
    """Names of `module`'s expert weights that have LoRA, in registration order."""
    return [p for p in expert_parameters(module) if getattr(getattr(module, p), "lora_A", None) is not None]
