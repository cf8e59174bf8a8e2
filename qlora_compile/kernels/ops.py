"""torch.library ops over the 4-bit format (namespace `qlora`).

- `qlora::dequantize(packed, absmax, nested_absmax, offset, quant_type, blocksize, shape, dtype)`
- `qlora::linear(x, packed, absmax, nested_absmax, offset, bias, quant_type, blocksize, shape)`:
  `y = x W^T + b` with W dequantized to x's dtype.
- `qlora::linear_dx(grad, packed, ..., shape)`: `grad W`, the input gradient.

Every op is opaque to Dynamo (one FX node each) and has a fake kernel, so `torch.compile` traces a
model that uses them with `fullgraph=True`. `linear`'s autograd computes dX only (the weight is
frozen), saves only the 4-bit tensors and re-dequantizes in backward; it returns a bias gradient
when the bias requires one. CUDA runs Triton kernels; CPU runs the native (or torch) dequantize
and then the BLAS matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dtypes import FLOAT_DTYPES
from . import dispatch, native


def _dense(
    packed, absmax, nested_absmax, offset, quant_type, blocksize, shape, dtype, scratch=False
) -> Tensor:
    """The dense weight. `scratch=True` (CPU): in the per-thread workspace that the next call
    overwrites, for callers that use the weight and drop it before returning."""
    n = int(torch.Size(shape).numel())
    out = native.workspace(n, dtype) if scratch and packed.device.type == "cpu" else None
    flat = dispatch.dequantize_4bit(
        packed, absmax, nested_absmax, offset, quant_type, blocksize, n, dtype, out
    )
    return flat.view(shape)


def _check_linear(x: Tensor, shape: list[int]) -> None:
    if len(shape) != 2 or x.shape[-1] != shape[1]:
        raise ValueError(f"qlora::linear: input of shape {tuple(x.shape)} does not match weight {shape}")
    if x.dtype not in FLOAT_DTYPES.values():
        raise TypeError(f"qlora::linear: input dtype must be fp32, fp16 or bf16, got {x.dtype}")


@torch.library.custom_op("qlora::dequantize", mutates_args=())
def dequantize(
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    offset: Tensor | None,
    quant_type: str,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
) -> Tensor:
    """The dense weight of `shape` and `dtype`, bit-identical to bitsandbytes' dequantize_4bit."""
    return _dense(packed, absmax, nested_absmax, offset, quant_type, blocksize, shape, dtype)


@dequantize.register_fake
def _(packed, absmax, nested_absmax, offset, quant_type, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("qlora::linear", mutates_args=())
def linear(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    offset: Tensor | None,
    bias: Tensor | None,
    quant_type: str,
    blocksize: int,
    shape: list[int],
    impl: str = "auto",
) -> Tensor:
    """`x @ W.T + bias`, W (out_features, in_features) in the 4-bit format.

    `impl` (the kernel) is "auto" (chosen per call by shape) or what passes/choose_kernel.py fixed for a
    static shape: "gemv", "fused" or "dequant_matmul" on CUDA; the CPU has one, "dequant_matmul".
    """
    _check_linear(x, shape)
    if x.device.type == "cuda":
        from . import triton_matmul

        return triton_matmul.linear(
            x, packed, absmax, nested_absmax, offset, bias, quant_type, blocksize, shape, impl
        )
    w = _dense(packed, absmax, nested_absmax, offset, quant_type, blocksize, shape, x.dtype, scratch=True)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))  # w is dropped here


@linear.register_fake
def _(x, packed, absmax, nested_absmax, offset, bias, quant_type, blocksize, shape, impl="auto"):
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.custom_op("qlora::linear_dx", mutates_args=())
def linear_dx(
    grad: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    offset: Tensor | None,
    quant_type: str,
    blocksize: int,
    shape: list[int],
) -> Tensor:
    """`grad @ W`: the gradient of `x @ W.T` with respect to x."""
    if grad.device.type == "cuda":
        from . import triton_matmul

        return triton_matmul.linear_dx(
            grad, packed, absmax, nested_absmax, offset, quant_type, blocksize, shape
        )
    w = _dense(packed, absmax, nested_absmax, offset, quant_type, blocksize, shape, grad.dtype, scratch=True)
    return grad @ w  # w is dropped here


@linear_dx.register_fake
def _(grad, packed, absmax, nested_absmax, offset, quant_type, blocksize, shape):
    return grad.new_empty((*grad.shape[:-1], shape[1]))


def _setup_linear(ctx, inputs, output) -> None:
    x, packed, absmax, nested_absmax, offset, bias, quant_type, blocksize, shape = inputs[:9]
    ctx.save_for_backward(packed, absmax, nested_absmax, offset)  # 4-bit tensors only, never W
    ctx.quant = (quant_type, blocksize, shape)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.n_inputs = len(inputs)  # `impl` may have been left to its default


def _linear_backward(ctx, grad):
    packed, absmax, nested_absmax, offset = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = linear_dx(grad, packed, absmax, nested_absmax, offset, *ctx.quant)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return (grad_x, None, None, None, None, grad_bias, None, None, None, None)[: ctx.n_inputs]


linear.register_autograd(_linear_backward, setup_context=_setup_linear)


# ---- the fused QLoRA op: base product + LoRA branch in one node (made by passes/fuse_lora.py) ----
@torch.library.custom_op("qlora::lora_linear", mutates_args=())
def lora_linear(
    x: Tensor,
    xl: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    offset: Tensor | None,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    quant_type: str,
    blocksize: int,
    shape: list[int],
    out_dtype: torch.dtype,
    impl: str = "auto",
) -> Tensor:
    """`(x W^T + b).to(out_dtype) + ((xl A^T) B^T * scaling).to(out_dtype)`.

    x is the base input in the compute dtype; xl the LoRA input (after dropout) in the adapters'
    dtype. Same values as the unfused QLoRALinear forward, one node instead of eight.
    """
    base = linear(x, packed, absmax, nested_absmax, offset, bias, quant_type, blocksize, shape, impl)
    lora = F.linear(F.linear(xl, lora_A), lora_B) * scaling
    return base.to(out_dtype) + lora.to(out_dtype)


@lora_linear.register_fake
def _(x, xl, packed, absmax, nested_absmax, offset, bias, lora_A, lora_B, scaling, quant_type, blocksize, shape,
      out_dtype, impl="auto"):  # fmt: skip
    return x.new_empty((*x.shape[:-1], shape[0]), dtype=out_dtype)


def _setup_lora_linear(ctx, inputs, output) -> None:
    (
        x,
        xl,
        packed,
        absmax,
        nested_absmax,
        offset,
        bias,
        lora_A,
        lora_B,
        scaling,
        quant_type,
        blocksize,
        shape,
    ) = inputs[:13]
    # the 4-bit weight, the LoRA input and the adapters; x A^T is recomputed (r columns) in backward
    ctx.save_for_backward(packed, absmax, nested_absmax, offset, xl, lora_A, lora_B)
    ctx.quant = (quant_type, blocksize, shape)
    ctx.scaling, ctx.x_dtype = scaling, x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.n_inputs = len(inputs)  # `impl` may have been left to its default


def lora_grads(xl, lora_A, lora_B, g_lora, need_xl: bool, need_A: bool, need_B: bool):
    """Gradients (xl, A, B) of `(xl A^T) B^T` from its (already scaled) output gradient.

    `xl A^T` (r columns) is recomputed here rather than saved in forward.
    """
    xl2, g2 = xl.reshape(-1, xl.shape[-1]), g_lora.reshape(-1, g_lora.shape[-1])  # (M, K), (M, N)
    g_xa = g2 @ lora_B  # (M, r)
    grad_A = g_xa.t() @ xl2 if need_A else None
    grad_B = g2.t() @ (xl2 @ lora_A.t()) if need_B else None
    grad_xl = (g_xa @ lora_A).view(xl.shape) if need_xl else None
    return grad_xl, grad_A, grad_B


def _lora_linear_backward(ctx, grad):
    packed, absmax, nested_absmax, offset, xl, lora_A, lora_B = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x = grad_bias = None
    g_base = grad.to(ctx.x_dtype)
    if need[0]:
        grad_x = linear_dx(g_base, packed, absmax, nested_absmax, offset, *ctx.quant)
    if ctx.bias_dtype is not None and need[6]:
        grad_bias = g_base.reshape(-1, g_base.shape[-1]).sum(0).to(ctx.bias_dtype)
    g_lora = grad.to(lora_B.dtype) * ctx.scaling
    grad_xl, grad_A, grad_B = lora_grads(xl, lora_A, lora_B, g_lora, need[1], need[7], need[8])
    # one gradient per input given: x, xl, 4 weight tensors, bias, A, B, then non-tensor arguments
    return (grad_x, grad_xl, None, None, None, None, grad_bias, grad_A, grad_B, *[None] * 6)[: ctx.n_inputs]


lora_linear.register_autograd(_lora_linear_backward, setup_context=_setup_lora_linear)
__all__ = ["dequantize", "linear", "linear_dx", "lora_linear"]
