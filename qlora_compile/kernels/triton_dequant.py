"""Triton dequantization of the 4-bit format, nested statistics decoded inside the kernel.

`dequantize` launches the kernel; `dequantize_reference` is the pure-torch equivalent that tests
compare it with (and with bitsandbytes). `dequant_tile` is shared by the matmul kernels: it turns
a (rows x cols) window of the weight into values, bit-identical to the full dequantization.

Launched with `enable_fp_fusion=False`: the nested scale is `code8[q] * nested + offset` with two
roundings, as bitsandbytes computes it; a fused multiply-add would round once and differ.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..codes import NESTED_BLOCKSIZE, code4, dynamic_map
from . import cpu

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LAUNCH_OPTIONS = {} if INTERPRET else {"enable_fp_fusion": False}


@triton.jit
def load_scale(absmax_ptr, nested_ptr, offset_ptr, code8_ptr, block, mask, NESTED: tl.constexpr):
    """fp32 absmax of `block`: stored, or decoded from its 8-bit code."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code8_ptr + q) * tl.load(nested_ptr + block // 256, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def cast_rne(values, DTYPE: tl.constexpr):
    """Cast fp32 to DTYPE rounding to nearest even, also under TRITON_INTERPRET (which truncates
    to bf16): bf16 is rounded by hand on the bits first, so the final cast is exact."""
    if DTYPE == tl.bfloat16:
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        rounded = bits.to(tl.float32, bitcast=True)
        values = tl.where(values != values, values, rounded)  # NaN stays NaN
    return values.to(DTYPE)


@triton.jit
def dequant_values(
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code4_ptr, code8_ptr, idx, mask,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
):  # fmt: skip
    """fp32 values of the weight at flat indices `idx` (any shape)."""
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 0xF)  # first element in the high nibble
    value = tl.load(code4_ptr + nibble)
    scale = load_scale(absmax_ptr, nested_ptr, offset_ptr, code8_ptr, idx // BLOCKSIZE, mask, NESTED)
    return value * scale


@triton.jit
def dequant_tile(
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code4_ptr, code8_ptr,
    rows, cols, N, K,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
):  # fmt: skip
    """(len(rows), len(cols)) fp32 window of the (N, K) row-major weight."""
    idx = rows[:, None] * K + cols[None, :]
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    return dequant_values(
        packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code4_ptr, code8_ptr, idx, mask, BLOCKSIZE, NESTED
    )


@triton.jit
def _dequant_kernel(
    # pointers
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code4_ptr, code8_ptr, out_ptr,
    # sizes
    n,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    values = dequant_values(
        packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code4_ptr, code8_ptr, idx, mask, BLOCKSIZE, NESTED
    )
    tl.store(out_ptr + idx, cast_rne(values, out_ptr.dtype.element_ty), mask=mask)  # one rounding, at the end


def kernel_args(packed, absmax, nested_absmax, offset, quant_type: str) -> tuple:
    """The pointer arguments every kernel takes, with the code tables on the weight's device."""
    device = packed.device
    nested = nested_absmax is not None
    return (
        packed,
        absmax if nested else absmax.float(),
        nested_absmax if nested else absmax,  # unused when not nested; any valid pointer
        offset if nested else absmax,
        code4(quant_type).to(device),
        dynamic_map().to(device),
    )


def dequantize(packed, absmax, nested_absmax, offset, quant_type: str, blocksize: int, n: int, dtype):
    """Flat (n,) weight of `dtype` from the Triton kernel."""
    out = torch.empty(n, dtype=dtype, device=packed.device)
    block = 1024

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]),)

    _dequant_kernel[grid](
        *kernel_args(packed, absmax, nested_absmax, offset, quant_type), out, n,
        BLOCKSIZE=blocksize, NESTED=nested_absmax is not None, BLOCK=block, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out


def dequantize_reference(
    packed, absmax, nested_absmax, offset, quant_type: str, blocksize: int, n: int, dtype
):
    """Pure-torch equivalent of `dequantize` (the vectorized CPU path, on any device)."""
    absmax32 = cpu.decode_absmax(absmax, nested_absmax, offset)
    return cpu.dequantize_4bit(packed, absmax32, quant_type, blocksize, n, dtype)


assert NESTED_BLOCKSIZE == 256  # load_scale hard-codes the nested block of 256
