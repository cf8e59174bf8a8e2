"""`QLoRALinear`: a frozen 4-bit linear layer with a trainable LoRA branch beside it.

    y = base(x) + lora_B(lora_A(dropout(x))) * scaling,   scaling = lora_alpha / r
                                                          (lora_alpha / sqrt(r) with rsLoRA)

as PEFT's `lora.Linear4bit` computes it: the base product runs in `compute_dtype` (the input is
cast to it and the result cast back), the LoRA branch in the adapters' dtype (fp32), and the two
are added in the input's dtype. With `lora_compute_dtype` (bf16, say) the branch's input and
weights are cast to that dtype for its two products instead, as PEFT's layers compute under
`torch.autocast` (Trainer's `bf16=True`); the weights, their gradients and the optimizer's states
stay in the adapters' dtype, the master copy. `lora_A` is kaiming-uniform (a = sqrt(5)) and `lora_B` zeros, so
the layer starts equal to the base. The names (`lora_A`, `lora_B`, `r`, `lora_alpha`) and the
state-dict keys (`<path>.lora_A.weight`) are PEFT's. `LoRALinear` is the same branch on a dense
`nn.Linear` (PEFT's `lora.Linear`), for linears kept dense; `LoRALayer` holds what the two share.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError
from .format import QuantizedWeight, quantize_weight
from .modules import QuantizedLinear


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling of the LoRA branch: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA")."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALayer:
    """The LoRA half of a layer (PEFT's `LoraLayer`): `lora_A`, `lora_B`, `lora_dropout`, `r`,
    `lora_alpha`, `scaling`, shared by `QLoRALinear` (4-bit base) and `LoRALinear` (dense base).
    The class it is mixed into is an `nn.Module` with `in_features` and `out_features`."""

    def _init_lora(
        self,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        use_rslora: bool,
        device,
        adapter_dtype: torch.dtype,
        lora_compute_dtype: torch.dtype | None = None,
    ) -> None:
        self._new_adapters(r, device, adapter_dtype)
        self.lora_compute_dtype = lora_compute_dtype
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.set_scale(lora_alpha, use_rslora)

    def _new_adapters(self, r: int, device: torch.device, dtype: torch.dtype) -> None:
        self.r = r
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()

    def set_scale(self, lora_alpha: float, use_rslora: bool = False) -> None:
        """Set lora_alpha and rsLoRA, and the scaling PEFT derives from them and the rank."""
        self.lora_alpha, self.use_rslora = lora_alpha, use_rslora
        self.scaling = lora_scaling(self.r, lora_alpha, use_rslora)

    def set_rank(self, r: int) -> bool:
        """Re-create `lora_A` (r, in) and `lora_B` (out, r) at rank `r`, freshly initialized, with
        the old dtype, device and requires_grad; the scaling follows. Returns whether they were
        re-created (not when `r` is already the rank): new parameters, so an optimizer built over
        the old ones must be rebuilt."""
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise InvalidArgumentError(f"r must be a positive int, got {r!r}")
        if r == self.r:
            return False
        old = self.lora_A.weight
        self._new_adapters(r, old.device, old.dtype)
        for p in (self.lora_A.weight, self.lora_B.weight):
            p.requires_grad_(old.requires_grad)
        self.set_scale(self.lora_alpha, self.use_rslora)
        return True

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """`lora_B(lora_A(dropout(x))) * scaling`, in `lora_compute_dtype` when one is set (the
        input is cast before the dropout, so its mask is drawn over the smaller copy) and in the
        adapters' dtype otherwise."""
        dtype = self.lora_A.weight.dtype
        if self.lora_compute_dtype in (None, dtype):
            return self.lora_B(self.lora_A(self.lora_dropout(x.to(dtype)))) * self.scaling
        dtype = self.lora_compute_dtype
        xa = F.linear(self.lora_dropout(x.to(dtype)), self.lora_A.weight.to(dtype))
        return F.linear(xa, self.lora_B.weight.to(dtype)) * self.scaling


class QLoRALinear(LoRALayer, QuantizedLinear):
    """A `QuantizedLinear` plus LoRA adapters.

    Args:
        weight: the quantized (out_features, in_features) base weight.
        bias: optional frozen bias.
        r: LoRA rank; lora_alpha: scaling numerator; lora_dropout: dropout on the LoRA input.
        use_rslora: scale by lora_alpha / sqrt(r) instead of lora_alpha / r.
        compute_dtype: dtype of the base product.
        adapter_dtype: dtype of `lora_A` and `lora_B` (fp32, as PEFT keeps them).
        lora_compute_dtype: dtype of the LoRA products; None: the adapters' dtype.
        fan_in_fan_out: the replaced module stored its weight as (in, out) (a transformers
            `Conv1D`): `.weight` answers in that layout (see `QuantizedLinear`).
    """

    def __init__(
        self,
        weight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        *,
        fan_in_fan_out: bool = False,
        r: int = 64,
        lora_alpha: float = 16,
        lora_dropout: float = 0.05,
        use_rslora: bool = False,
        compute_dtype: torch.dtype = torch.bfloat16,
        adapter_dtype: torch.dtype = torch.float32,
        lora_compute_dtype: torch.dtype | None = None,
    ):
        super().__init__(weight, bias, fan_in_fan_out=fan_in_fan_out)
        self.compute_dtype = compute_dtype
        self._init_lora(
            r, lora_alpha, lora_dropout, use_rslora, weight.device, adapter_dtype, lora_compute_dtype
        )

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        **lora,
    ) -> QLoRALinear:
        """Quantize a dense (out_features, in_features) weight and add adapters (`**lora`: the
        keyword arguments of `QLoRALinear`, `fan_in_fan_out` included)."""
        qw = quantize_weight(
            weight.detach(), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant
        )
        return cls(qw, bias, **lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x.to(self.compute_dtype))
        return base.to(x.dtype) + self.lora_branch(x).to(x.dtype)

    def extra_repr(self) -> str:
        rs = ", use_rslora=True" if self.use_rslora else ""
        return f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}{rs}, compute_dtype={self.compute_dtype}"


class LoRALinear(LoRALayer, nn.Linear):
    """A frozen dense `nn.Linear` plus LoRA adapters (PEFT's `lora.Linear` on a plain base): for
    the linears "all-linear" keeps dense as transformers + bitsandbytes does (T5's `wo`,
    `_keep_in_fp32_modules`), which PEFT's "all-linear" still adapts.

        y = x W^T + b + lora_B(lora_A(dropout(x))) * scaling

    The base product runs in the weight's dtype, the branch in the adapters' (fp32), added in the
    input's dtype. `weight` and `bias` are the original module's parameters (not copied), so
    state-dict keys and `.weight` reads stay as they were.

    Args:
        base: the dense layer; its parameters are taken over.
        r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, lora_compute_dtype: as `QLoRALinear`.
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        r: int = 64,
        lora_alpha: float = 16,
        lora_dropout: float = 0.05,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
        lora_compute_dtype: torch.dtype | None = None,
    ):
        nn.Module.__init__(self)
        self.fan_in_fan_out = False  # an nn.Linear: (out, in)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self._init_lora(
            r, lora_alpha, lora_dropout, use_rslora, base.weight.device, adapter_dtype, lora_compute_dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x)
        return (base + self.lora_branch(x)).to(base.dtype)  # PEFT's order: add, then back to the base's dtype

    def extra_repr(self) -> str:
        rs = ", use_rslora=True" if self.use_rslora else ""
        return f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}{rs}"


class LoRA16Linear(LoRALinear):
    """A frozen 16-bit `nn.Linear` plus LoRA, computed as `QLoRALinear` computes it: the
    16-bit LoRA baseline of QLoRA (`QLoRAConfig(quant_type="none")`).

        y = (x_c W_c^T + b_c).to(x.dtype) + lora_branch(x).to(x.dtype)

    where `_c` means cast to `compute_dtype`. Only the base weight's storage differs from a 4-bit
    `QLoRALinear`: it keeps its dtype (bf16 from a bf16 model) instead of a 4-bit code, so the
    rest of the model (norms and residual stream, adapters, `lora_compute_dtype`) is the same in
    both runs and a comparison measures the data type alone. `weight` and `bias` stay the original
    parameters.

    Args:
        base: the dense layer; its parameters are taken over (frozen, in their dtype).
        compute_dtype: dtype of the base product.
        r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, lora_compute_dtype: as `QLoRALinear`.
    """

    def __init__(self, base: nn.Linear, *, compute_dtype: torch.dtype = torch.bfloat16, **lora):
        super().__init__(base, **lora)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(c)
        base = nn.functional.linear(x.to(c), self.weight.to(c), bias)
        return base.to(x.dtype) + self.lora_branch(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, compute_dtype={self.compute_dtype}"
