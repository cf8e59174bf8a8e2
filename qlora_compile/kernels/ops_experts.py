"""torch.library ops over a stack of experts (namespace `qlora`), for mixture-of-experts layers.

Rows of `x` are grouped by expert: `counts[e]` consecutive rows go to expert e, in expert order
(the layout transformers' `grouped_mm` experts implementation sorts its tokens into).

- `qlora::experts_linear(x, counts, packed, absmax, nested_absmax, offset, quant_type, blocksize,
  shape)`: each expert's rows times its 4-bit weight, `x_e W_e^T`. The 4-bit tensors are stacked
  per expert along dim 0 (`packed[e]` is expert e's `QuantizedWeight.packed`, flattened); `shape`
  is `[E, out_features, in_features]`. Expert e's product is one `qlora::linear` call on views
  of its own bytes: no other expert is dequantized. Experts without rows are skipped.
- `qlora::experts_linear_dx(grad, counts, ...)`: its input gradient, one `qlora::linear_dx` each.
- `qlora::grouped_mm(x, weight, counts)`: `x_e w_e^T` for a dense (E, N, K) weight (the LoRA
  factors), differentiable in x and weight; `qlora::grouped_mm_backward` is its backward.

The loops over experts read `counts` as Python integers, inside the ops: Dynamo sees one opaque
node per op with a static output shape (the number of rows), so routing adds no graph break and
no data-dependent shape. Backward formulas call ops too, so AOTAutograd traces them as nodes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _bounds(counts: Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of each expert that has rows (one host sync on CUDA)."""
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out.append((e, start, start + int(n)))
        start += int(n)
    return out


def _expert(e: int, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None, offset: Tensor | None):
    # packed (ceil(n / 2), 1), as QuantizedWeight holds it; offset 0-dim
    return (packed[e].unsqueeze(-1), absmax[e], None if nested_absmax is None else nested_absmax[e],
            None if offset is None else offset[e])  # fmt: skip


def _per_expert(product, rows: Tensor, counts: Tensor, weights: tuple, out_features: int) -> Tensor:
    """(S, out_features): `product(expert e's rows, *expert e's 4-bit tensors)` for each expert."""
    out = rows.new_zeros((rows.shape[0], out_features))
    for e, start, end in _bounds(counts):
        out[start:end] = product(rows[start:end], *_expert(e, *weights))
    return out


def _check(x: Tensor, counts: Tensor, shape: list[int], what: str) -> None:
    if len(shape) != 3 or x.dim() != 2 or counts.shape != (shape[0],):
        raise ValueError(
            f"qlora::{what}: input {tuple(x.shape)} and counts {tuple(counts.shape)} do not fit experts {shape}"
        )


@torch.library.custom_op("qlora::experts_linear", mutates_args=())
def experts_linear(
    x: Tensor,
    counts: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    offset: Tensor | None,
    quant_type: str,
    blocksize: int,
    shape: list[int],
) -> Tensor:
    """(S, out_features): rows of expert e (grouped by `counts`) times W_e^T, W_e in the 4-bit format."""
    _check(x, counts, shape, "experts_linear")
    return _per_expert(
        lambda rows, *w: torch.ops.qlora.linear(rows, *w, None, quant_type, blocksize, shape[1:]),
        x, counts, (packed, absmax, nested_absmax, offset), shape[1],
    )  # fmt: skip


@experts_linear.register_fake
def _(x, counts, packed, absmax, nested_absmax, offset, quant_type, blocksize, shape):
    return x.new_empty((x.shape[0], shape[1]))


@torch.library.custom_op("qlora::experts_linear_dx", mutates_args=())
def experts_linear_dx(
    grad: Tensor,
    counts: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    offset: Tensor | None,
    quant_type: str,
    blocksize: int,
    shape: list[int],
) -> Tensor:
    """(S, in_features): rows of expert e of `grad` times W_e (the input gradient of experts_linear)."""
    _check(grad, counts, shape, "experts_linear_dx")
    return _per_expert(
        lambda rows, *w: torch.ops.qlora.linear_dx(rows, *w, quant_type, blocksize, shape[1:]),
        grad, counts, (packed, absmax, nested_absmax, offset), shape[2],
    )  # fmt: skip


@experts_linear_dx.register_fake
def _(grad, counts, packed, absmax, nested_absmax, offset, quant_type, blocksize, shape):
    return grad.new_empty((grad.shape[0], shape[2]))


def _setup_experts_linear(ctx, inputs, output) -> None:
    x, counts, packed, absmax, nested_absmax, offset, quant_type, blocksize, shape = inputs
    ctx.save_for_backward(counts, packed, absmax, nested_absmax, offset)  # 4-bit tensors only
    ctx.quant = (quant_type, blocksize, shape)


def _experts_linear_backward(ctx, grad):
    counts, packed, absmax, nested_absmax, offset = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = experts_linear_dx(grad, counts, packed, absmax, nested_absmax, offset, *ctx.quant)
    return grad_x, None, None, None, None, None, None, None, None


experts_linear.register_autograd(_experts_linear_backward, setup_context=_setup_experts_linear)


# ---- dense grouped product for the experts' LoRA factors ----
@torch.library.custom_op("qlora::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """(S, N): rows of expert e of x (S, K) times weight[e]^T, weight (E, N, K)."""
    out = x.new_zeros((x.shape[0], weight.shape[1]))
    for e, start, end in _bounds(counts):
        torch.mm(x[start:end], weight[e].t(), out=out[start:end])
    return out


@grouped_mm.register_fake
def _(x, weight, counts):
    return x.new_empty((x.shape[0], weight.shape[1]))


@torch.library.custom_op("qlora::grouped_mm_backward", mutates_args=())
def grouped_mm_backward(grad: Tensor, x: Tensor, weight: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x (S, K), grad_weight (E, N, K)) of `grouped_mm(x, weight, counts)`."""
    grad_x, grad_w = torch.zeros_like(x), weight.new_zeros(weight.shape)  # experts without rows: 0
    for e, start, end in _bounds(counts):
        torch.mm(grad[start:end], weight[e], out=grad_x[start:end])
        torch.mm(grad[start:end].t(), x[start:end], out=grad_w[e])
    return grad_x, grad_w


@grouped_mm_backward.register_fake
def _(grad, x, weight, counts):
    return torch.empty_like(x), weight.new_empty(weight.shape)


def _setup_grouped_mm(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    x, weight, counts = ctx.saved_tensors
    grad_x, grad_w = grouped_mm_backward(grad.contiguous(), x, weight, counts)
    return grad_x, grad_w, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_setup_grouped_mm)
__all__ = ["experts_linear", "experts_linear_dx", "grouped_mm", "grouped_mm_backward"]
