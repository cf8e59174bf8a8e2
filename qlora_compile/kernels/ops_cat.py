"""`qlora::lora_linear_cat`: several QLoRA products that read the same input, as one op.

Made by passes/fuse_shared_input.py from the q/k/v (or gate/up) `qlora::lora_linear` nodes of a
layer. The base weights are dequantized into one (sum N, K) buffer and multiplied once; the LoRA
branches share one `xl @ cat(A)^T` and one product with the block-diagonal stack of the B's.
The output is the members' outputs side by side along the last dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch, native
from .ops import linear, linear_dx, lora_grads


def _stats(nested_absmax: list[Tensor], offset: list[Tensor], n: int) -> tuple[list, list]:
    if not nested_absmax:
        return [None] * n, [None] * n
    return list(nested_absmax), list(offset)


def _block_diag_b(lora_B: list[Tensor]) -> Tensor:
    """(sum N, sum r): B_i on the diagonal, so one product serves every member."""
    return torch.block_diag(*lora_B)


def _dense_cat(packed, absmax, nested, offset, quant_type, blocksize, out_features, k, dtype) -> Tensor:
    """(sum N, K) dequantized weights, in a per-thread scratch buffer on CPU."""
    total = sum(out_features) * k
    out = native.workspace(total, dtype)  # each weight is dequantized straight into its rows
    start = 0
    for p, a, nb, off, n in zip(packed, absmax, nested, offset, out_features, strict=True):
        dispatch.dequantize_4bit(
            p, a, nb, off, quant_type, blocksize, n * k, dtype, out[start : start + n * k]
        )
        start += n * k
    return out.view(sum(out_features), k)


@torch.library.custom_op("qlora::lora_linear_cat", mutates_args=())
def lora_linear_cat(
    x: Tensor,
    xl: list[Tensor],
    packed: list[Tensor],
    absmax: list[Tensor],
    nested_absmax: list[Tensor],
    offset: list[Tensor],
    bias: Tensor | None,
    lora_A: list[Tensor],
    lora_B: list[Tensor],
    scaling: float,
    quant_type: str,
    blocksize: int,
    out_features: list[int],
    in_features: int,
    out_dtype: torch.dtype,
    impl: str,
) -> Tensor:
    """cat_i[(x W_i^T).to(out_dtype) + ((xl A_i^T) B_i^T * scaling).to(out_dtype)] (+ bias, the
    members' biases concatenated, zeros where one had none).

    `xl` holds one LoRA input shared by every member (no dropout) or one per member (dropout
    draws its own mask per layer); `nested_absmax` and `offset` are empty lists when the weights are
    not double-quantized.
    """
    k = in_features
    nested, offsets = _stats(nested_absmax, offset, len(packed))
    bias = None if bias is None else bias.to(x.dtype)
    if x.device.type == "cuda":
        base = torch.cat(
            [linear(x, p, a, nb, off, None, quant_type, blocksize, [n, k], impl)
             for p, a, nb, off, n in zip(packed, absmax, nested, offsets, out_features, strict=True)],
            dim=-1,
        )  # fmt: skip
        base = base if bias is None else base + bias
    else:
        w = _dense_cat(packed, absmax, nested, offsets, quant_type, blocksize, out_features, k, x.dtype)
        base = F.linear(x, w, bias)
    if len(xl) == 1:
        lora = F.linear(F.linear(xl[0], torch.cat(lora_A)), _block_diag_b(lora_B)) * scaling
    else:
        lora = (
            torch.cat([F.linear(F.linear(t, a), b) for t, a, b in zip(xl, lora_A, lora_B, strict=True)], -1)
            * scaling
        )
    return base.to(out_dtype) + lora.to(out_dtype)


@lora_linear_cat.register_fake
def _(x, xl, packed, absmax, nested_absmax, offset, bias, lora_A, lora_B, scaling, quant_type, blocksize,
      out_features, in_features, out_dtype, impl):  # fmt: skip
    return x.new_empty((*x.shape[:-1], sum(out_features)), dtype=out_dtype)


def _setup(ctx, inputs, output) -> None:
    (x, xl, packed, absmax, nested, offset, bias, lora_A, lora_B, scaling, quant_type, blocksize,
     out_features, in_features) = inputs[:14]  # fmt: skip
    n = len(packed)
    ctx.n, ctx.n_xl = n, len(xl)
    ctx.has_nested = bool(nested)
    ctx.save_for_backward(*xl, *lora_A, *lora_B, *packed, *absmax, *nested, *offset)
    ctx.meta = (scaling, quant_type, blocksize, list(out_features), in_features, x.dtype)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _unpack(ctx):
    saved = list(ctx.saved_tensors)
    n, m = ctx.n, ctx.n_xl
    xl, lora_A, lora_B = saved[:m], saved[m : m + n], saved[m + n : m + 2 * n]
    rest = saved[m + 2 * n :]
    packed, absmax = rest[:n], rest[n : 2 * n]
    nested = rest[2 * n : 3 * n] if ctx.has_nested else [None] * n
    offset = rest[3 * n : 4 * n] if ctx.has_nested else [None] * n
    return xl, lora_A, lora_B, packed, absmax, nested, offset


def _backward(ctx, grad):
    xl, lora_A, lora_B, packed, absmax, nested, offset = _unpack(ctx)
    scaling, quant_type, blocksize, out_features, k, x_dtype = ctx.meta
    need = ctx.needs_input_grad
    g_base = grad.to(x_dtype)
    pieces = g_base.split(out_features, dim=-1)
    grad_x = None
    if need[0]:
        grad_x = sum(
            linear_dx(g.contiguous(), p, a, nb, off, quant_type, blocksize, [n, k])
            for g, p, a, nb, off, n in zip(pieces, packed, absmax, nested, offset, out_features, strict=True)
        )
    grad_bias = None
    if ctx.bias_dtype is not None and need[6]:
        grad_bias = g_base.reshape(-1, g_base.shape[-1]).sum(0).to(ctx.bias_dtype)
    g_lora = grad.to(lora_B[0].dtype) * scaling
    if len(xl) == 1:
        grad_xl, grad_A, grad_B = _lora_grads_shared(xl[0], lora_A, lora_B, g_lora, out_features, need)
    else:
        grad_xl, grad_A, grad_B = _lora_grads_each(xl, lora_A, lora_B, g_lora, out_features, need)
    none = [None] * ctx.n
    stats = none if ctx.has_nested else []
    # one gradient per input, lists for list inputs, then the 7 non-tensor arguments. (`impl` has
    # no default here: with list inputs autograd checks this against the arguments as passed.)
    return (grad_x, grad_xl, none, none, stats, stats, grad_bias, grad_A, grad_B, *[None] * 7)


def _lora_grads_shared(xl, lora_A, lora_B, g_lora, out_features, need):
    """One LoRA input for all members: one product with cat(A), one with the block-diagonal B."""
    ranks = [a.shape[0] for a in lora_A]
    a_cat, b_diag = torch.cat(lora_A), _block_diag_b(lora_B)
    g2 = g_lora.reshape(-1, b_diag.shape[0])  # (M, sum N)
    xl2 = xl.reshape(-1, xl.shape[-1])
    g_xa = g2 @ b_diag  # (M, sum r)
    grad_A = list((g_xa.t() @ xl2).split(ranks)) if need[7] else [None] * len(ranks)
    grad_B = [None] * len(ranks)
    if need[8]:
        g_b = g2.t() @ (xl2 @ a_cat.t())  # (sum N, sum r): keep the diagonal blocks
        starts = [sum(ranks[:i]) for i in range(len(ranks))]
        grad_B = [
            blk[:, c : c + r].contiguous()
            for blk, c, r in zip(g_b.split(out_features), starts, ranks, strict=True)
        ]
    grad_xl = [(g_xa @ a_cat).view(xl.shape)] if need[1] else [None]
    return grad_xl, grad_A, grad_B


def _lora_grads_each(xl, lora_A, lora_B, g_lora, out_features, need):
    """One LoRA input per member."""
    per_member = [
        lora_grads(t, a, b, g, need[1], need[7], need[8])
        for t, a, b, g in zip(xl, lora_A, lora_B, g_lora.split(out_features, dim=-1), strict=True)
    ]
    grad_xl, grad_A, grad_B = (list(col) for col in zip(*per_member, strict=True))
    return grad_xl, grad_A, grad_B


lora_linear_cat.register_autograd(_backward, setup_context=_setup)
