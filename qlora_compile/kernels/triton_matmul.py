"""Triton kernels that fuse 4-bit dequantization into matrix products.

- `linear_forward`: y (M, N) = x (M, K) @ W^T + b; W tiles are dequantized in registers, cast to
  x's dtype (rounding as the full dequantization does), multiplied on tensor cores, accumulated
  in fp32.
- `linear_dx`: dX (M, K) = dY (M, N) @ W, the input gradient, the same way.
- `gemv`: y (N,) = W @ x for a single token, fp32 accumulation over K in registers (decode).

Each has a pure-torch `*_reference` beside it: dequantize to the compute dtype, then matmul in
fp32. `linear` and `linear_dx` at the bottom are what `torch.ops.qlora` calls on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_dequant import INTERPRET, LAUNCH_OPTIONS, cast_rne, dequant_tile, dequantize, kernel_args

# Tile sizes. Under TRITON_INTERPRET small tiles keep the numpy emulation quick; on CUDA a few
# configurations are autotuned per (M, N, K).
_INTERPRET_TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
_CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (16, 64, 128, 4, 4),
        (32, 64, 128, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
    ]
]


@triton.jit
def _linear_fwd_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code4_ptr, code8_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K,
    # strides
    stride_xm, stride_xk, stride_ym, stride_yn,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # fp32 accumulation
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        # phase 1: the activation tile
        x_mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=x_mask, other=0.0)
        # phase 2: the weight tile, dequantized in registers, rounded to the compute dtype
        w = dequant_tile(
            packed_ptr,
            absmax_ptr,
            nested_ptr,
            offset_ptr,
            code4_ptr,
            code8_ptr,
            rn,
            rk,
            N,
            K,
            BLOCKSIZE,
            NESTED,
        )
        w = cast_rne(w, x_ptr.dtype.element_ty)
        # phase 3: multiply-accumulate
        if UPCAST:  # the interpreter's dot mishandles bf16; bf16 products are exact in fp32
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
        cast_rne(acc, y_ptr.dtype.element_ty),
        mask=y_mask,
    )


@triton.jit
def _linear_dx_kernel(
    # pointers
    g_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code4_ptr, code8_ptr, dx_ptr,
    # sizes
    M, N, K,
    # strides
    stride_gm, stride_gn, stride_dm, stride_dk,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # fp32 accumulation
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        g_mask = (rm[:, None] < M) & (rn[None, :] < N)
        g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn, mask=g_mask, other=0.0)
        w = dequant_tile(
            packed_ptr,
            absmax_ptr,
            nested_ptr,
            offset_ptr,
            code4_ptr,
            code8_ptr,
            rn,
            rk,
            N,
            K,
            BLOCKSIZE,
            NESTED,
        )
        w = cast_rne(w, g_ptr.dtype.element_ty)
        if UPCAST:  # the interpreter's dot mishandles bf16; bf16 products are exact in fp32
            g, w = g.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
    d_mask = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(
        dx_ptr + rm[:, None] * stride_dm + rk[None, :] * stride_dk,
        cast_rne(acc, dx_ptr.dtype.element_ty),
        mask=d_mask,
    )


@triton.jit
def _gemv_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code4_ptr, code8_ptr, bias_ptr, y_ptr,
    # sizes
    N, K,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # fp32 accumulation
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
        w = dequant_tile(
            packed_ptr,
            absmax_ptr,
            nested_ptr,
            offset_ptr,
            code4_ptr,
            code8_ptr,
            rn,
            rk,
            N,
            K,
            BLOCKSIZE,
            NESTED,
        )
        w = cast_rne(w, x_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, cast_rne(acc, y_ptr.dtype.element_ty), mask=rn < N)


_tuned: dict = {}


def _launcher(kernel, key: list[str]):
    """The kernel itself under the interpreter; an autotuned wrapper on CUDA (built once)."""
    if INTERPRET:
        return kernel, _INTERPRET_TILES
    if kernel not in _tuned:
        _tuned[kernel] = triton.autotune(configs=_CUDA_CONFIGS, key=key)(kernel)
    return _tuned[kernel], {}


def _precision(dtype: torch.dtype) -> str:
    # fp32 stays fp32 (as torch's matmul by default); 16-bit inputs are exact in any mode
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _check(x: torch.Tensor, shape: list[int]) -> None:
    n, k = shape
    if n * k >= 2**31:
        raise NotImplementedError(f"weight {shape} has 2^31 or more elements: int32 indexing would overflow")
    if x.shape[-1] != k:
        raise ValueError(f"input of shape {tuple(x.shape)} does not match weight {shape}")


def linear_forward(x, packed, absmax, nested_absmax, offset, bias, quant_type, blocksize, shape):
    """Fused dequant + matmul: x (..., K) -> (..., N)."""
    _check(x, shape)
    n, k = shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    kernel, tiles = _launcher(_linear_fwd_kernel, ["M", "N", "K"])

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    kernel[grid](
        x2, *kernel_args(packed, absmax, nested_absmax, offset, quant_type), bias if bias is not None else y, y,
        m, n, k, x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        BLOCKSIZE=blocksize, NESTED=nested_absmax is not None, HAS_BIAS=bias is not None,
        PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype), **tiles, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)


def linear_dx_fused(g, packed, absmax, nested_absmax, offset, quant_type, blocksize, shape):
    """Fused dequant + matmul for the input gradient: g (..., N) -> (..., K)."""
    n, k = shape
    if g.shape[-1] != n:
        raise ValueError(f"gradient of shape {tuple(g.shape)} does not match weight {shape}")
    g2 = g.reshape(-1, n)
    m = g2.shape[0]
    dx = torch.empty((m, k), dtype=g.dtype, device=g.device)
    kernel, tiles = _launcher(_linear_dx_kernel, ["M", "N", "K"])

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_K"]))

    kernel[grid](
        g2, *kernel_args(packed, absmax, nested_absmax, offset, quant_type), dx,
        m, n, k, g2.stride(0), g2.stride(1), dx.stride(0), dx.stride(1),
        BLOCKSIZE=blocksize, NESTED=nested_absmax is not None, PRECISION=_precision(g.dtype),
        UPCAST=_upcast(g.dtype), **tiles, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return dx.view(*g.shape[:-1], k)


def gemv(x, packed, absmax, nested_absmax, offset, bias, quant_type, blocksize, shape):
    """Batch-1 product: x (..., K) with one row in all -> (..., N)."""
    _check(x, shape)
    n, k = shape
    assert x.numel() == k, "gemv takes a single row"
    x1 = x.reshape(k).contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    tiles = {"BLOCK_N": 32, "BLOCK_K": 64} if INTERPRET else {"BLOCK_N": 16, "BLOCK_K": 256}

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    _gemv_kernel[grid](
        x1, *kernel_args(packed, absmax, nested_absmax, offset, quant_type), bias if bias is not None else y, y,
        n, k, BLOCKSIZE=blocksize, NESTED=nested_absmax is not None, HAS_BIAS=bias is not None,
        **tiles, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)


# ---- pure-torch references ----
def _dense_reference(packed, absmax, nested_absmax, offset, quant_type, blocksize, shape, dtype):
    from .triton_dequant import dequantize_reference

    n = shape[0] * shape[1]
    return dequantize_reference(packed, absmax, nested_absmax, offset, quant_type, blocksize, n, dtype).view(
        shape
    )


def linear_reference(x, packed, absmax, nested_absmax, offset, bias, quant_type, blocksize, shape):
    """x @ W^T + b with W dequantized to x's dtype, product in fp32, rounded once."""
    w = _dense_reference(packed, absmax, nested_absmax, offset, quant_type, blocksize, shape, x.dtype)
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def linear_dx_reference(g, packed, absmax, nested_absmax, offset, quant_type, blocksize, shape):
    w = _dense_reference(packed, absmax, nested_absmax, offset, quant_type, blocksize, shape, g.dtype)
    return (g.float() @ w.float()).to(g.dtype)


gemv_reference = linear_reference


# ---- what torch.ops.qlora runs on CUDA ----
_DEQUANT_THEN_CUBLAS_M = 1024  # from here on, dequantize once and use cuBLAS


def choose(m: int) -> str:
    """The forward kernel for M rows: GEMV for one token, fused for few, cuBLAS for many."""
    if m == 1:
        return "gemv"
    return "fused" if m < _DEQUANT_THEN_CUBLAS_M else "dequant_matmul"


def linear(x, packed, absmax, nested_absmax, offset, bias, quant_type, blocksize, shape, kernel="auto"):
    """x @ W^T + b with the kernel `kernel` ("auto": `choose` by the number of rows)."""
    m = x.numel() // shape[1]
    kernel = choose(m) if kernel == "auto" else kernel
    args = (packed, absmax, nested_absmax, offset)
    if kernel == "gemv" and m == 1:
        return gemv(x, *args, bias, quant_type, blocksize, shape)
    if kernel == "fused":
        return linear_forward(x, *args, bias, quant_type, blocksize, shape)
    w = dequantize(*args, quant_type, blocksize, shape[0] * shape[1], x.dtype).view(shape)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def linear_dx(g, packed, absmax, nested_absmax, offset, quant_type, blocksize, shape):
    m = g.numel() // shape[0]
    args = (packed, absmax, nested_absmax, offset)
    if m < _DEQUANT_THEN_CUBLAS_M:
        return linear_dx_fused(g, *args, quant_type, blocksize, shape)
    w = dequantize(*args, quant_type, blocksize, shape[0] * shape[1], g.dtype).view(shape)
    return g @ w
