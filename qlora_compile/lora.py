"""`QLoRALinear`: a frozen 4-bit linear layer with a trainable LoRA branch beside it.

    y = base(x) + lora_B(lora_A(dropout(x))) * (lora_alpha / r)

as PEFT's `lora.Linear4bit` computes it: the base product runs in `compute_dtype` (the input is
cast to it and the result cast back), the LoRA branch in the adapters' dtype (fp32), and the two
are added in the input's dtype. `lora_A` is kaiming-uniform (a = sqrt(5)) and `lora_B` zeros, so
the layer starts equal to the base. The names (`lora_A`, `lora_B`, `r`, `lora_alpha`) and the
state-dict keys (`<path>.lora_A.weight`) are PEFT's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .format import QuantizedWeight, quantize_weight
from .modules import QuantizedLinear


class QLoRALinear(QuantizedLinear):
    """A `QuantizedLinear` plus LoRA adapters.

    Args:
        weight: the quantized (out_features, in_features) base weight.
        bias: optional frozen bias.
        r: LoRA rank; lora_alpha: scaling numerator; lora_dropout: dropout on the LoRA input.
        compute_dtype: dtype of the base product.
        adapter_dtype: dtype of `lora_A` and `lora_B` (fp32, as PEFT keeps them).
    """

    def __init__(
        self,
        weight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        *,
        r: int = 64,
        lora_alpha: float = 16,
        lora_dropout: float = 0.05,
        compute_dtype: torch.dtype = torch.bfloat16,
        adapter_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(weight, bias)
        self.r, self.lora_alpha, self.scaling = r, lora_alpha, lora_alpha / r
        self.compute_dtype = compute_dtype
        device = weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

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
        """Quantize a dense (out_features, in_features) weight and add adapters."""
        qw = quantize_weight(
            weight.detach(), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant
        )
        return cls(qw, bias, **lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x.to(self.compute_dtype))
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling
        return base.to(x.dtype) + lora.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, compute_dtype={self.compute_dtype}"
