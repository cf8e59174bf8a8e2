"""`QuantizedLinear`: an `nn.Linear` whose weight is stored in the 4-bit format.

The weight lives in buffers (packed bytes, absmax, nested statistics), so `state_dict`, `.to()`
and `torch.compile` see plain tensors; the forward is one `torch.ops.qlora.linear` node.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import InvalidArgumentError
from .format import QuantizedWeight, quantize_weight


class QuantizedLinear(nn.Module):
    """A frozen 4-bit linear layer: `y = x W^T + b`, W dequantized inside the op.

    Args:
        weight: the quantized (out_features, in_features) weight.
        bias: optional bias, kept as a (frozen) parameter in its own dtype.
        fan_in_fan_out: the module replaced stored its weight as (in, out), as transformers'
            `Conv1D` does (PEFT's name for it): `.weight` answers in that layout. The 4-bit weight
            and the product are (out, in) either way.
    """

    def __init__(
        self, weight: QuantizedWeight, bias: torch.Tensor | None = None, *, fan_in_fan_out: bool = False
    ):
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out
        if len(weight.shape) != 2:
            raise InvalidArgumentError(f"QuantizedLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.quant_type, self.blocksize, self.weight_dtype = weight.quant_type, weight.blocksize, weight.dtype
        self.register_buffer("weight_packed", weight.packed)
        self.register_buffer("weight_absmax", weight.absmax)
        self.register_buffer("weight_nested_absmax", weight.nested_absmax)
        self.register_buffer("weight_offset", weight.offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
    ) -> QuantizedLinear:
        """Quantize an `nn.Linear` (its weight is read, not modified)."""
        qw = quantize_weight(
            linear.weight.detach(), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant
        )
        return cls(qw, linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, dequantized from the 4-bit buffers on each read: not stored, not a
        parameter, never in `state_dict` (writes to it are lost).

        For code outside our control that reads a linear's `.weight`: dtype and device checks (T5's
        feed-forward casts to `wo.weight.dtype`), shapes, or a product with it. Its dtype is the
        original weight's, its layout the original module's ((in, out) for a Conv1D). bitsandbytes
        answers with its packed uint8 parameter instead, whose dtype and shape are the storage's,
        which breaks such reads. Under torch.compile an unused read (`.weight.dtype`) costs nothing:
        the dequantize node has no user and is removed.
        """
        w = torch.ops.qlora.dequantize(
            self.weight_packed, self.weight_absmax, self.weight_nested_absmax, self.weight_offset,
            self.quant_type, self.blocksize, [self.out_features, self.in_features], self.weight_dtype,
        )  # fmt: skip
        return w.t() if self.fan_in_fan_out else w

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.weight_packed, self.weight_absmax, self.quant_type, self.blocksize,
            torch.Size((self.out_features, self.in_features)), self.weight_dtype,
            self.weight_nested_absmax, self.weight_offset,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qlora.linear(
            x, self.weight_packed, self.weight_absmax, self.weight_nested_absmax, self.weight_offset,
            self.bias, self.quant_type, self.blocksize, [self.out_features, self.in_features],
        )  # fmt: skip

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.weight_nested_absmax is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, blocksize={self.blocksize}{dq}"


def quantize_linears_(
    model: nn.Module,
    *,
    skip: tuple[str, ...] = ("lm_head",),
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> list[str]:
    """Replace every `nn.Linear` of `model` (in place) by a `QuantizedLinear`, layer by layer.

    Each dense weight is dropped as soon as its layer is quantized. Modules whose last name is in
    `skip` stay dense. Returns the qualified names that were quantized.
    """
    done = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child_name in skip:
                continue
            quantized = QuantizedLinear.from_linear(
                child, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant
            )
            setattr(module, child_name, quantized)
            done.append(f"{name}.{child_name}" if name else child_name)
    return done
