"""Triton kernels against their pure-torch references and bitsandbytes.

On a machine without CUDA they run under TRITON_INTERPRET=1 (set in conftest.py) on small shapes;
tools/gpu_check.sh runs the same tests on a GPU.
"""

import pytest
import torch

from qlora_compile import quantize_weight
from qlora_compile.kernels import triton_dequant as td
from qlora_compile.kernels import triton_matmul as tm
from tests import bnb_oracle

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, K): rows a whole number of blocks, and rows that straddle blocks (K = 200)
SHAPES = [(64, 256), (96, 200)]


def tolerance(dtype):
    """One or two units in the last place of the output dtype, for sums in another order."""
    return {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 1e-2)}[dtype]


def weight(shape, dtype, device, quant_type="nf4", blocksize=64, double_quant=True):
    w = (torch.randn(shape) * 0.05).to(dtype)
    qw = quantize_weight(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    return w, qw.to(device)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_dequant_kernel_bit_exact(quant_type, dtype, double_quant, blocksize, device):
    w, qw = weight((77, 131), dtype, device, quant_type, blocksize, double_quant)  # odd numel
    n = w.numel()
    got = td.dequantize(*qw.op_args(), quant_type, blocksize, n, dtype)
    assert torch.equal(got, td.dequantize_reference(*qw.op_args(), quant_type, blocksize, n, dtype))
    packed, state, _ = bnb_oracle.quantize(w, quant_type, blocksize, double_quant)
    assert torch.equal(got.cpu().view(w.shape), bnb_oracle.dequantize(packed, state))


def test_dequant_kernel_one_million_elements(device):
    w, qw = weight((1024, 1024), torch.bfloat16, device)
    got = td.dequantize(*qw.op_args(), "nf4", 64, w.numel(), torch.bfloat16)
    packed, state, _ = bnb_oracle.quantize(w, "nf4", 64, True)
    assert torch.equal(got.cpu().view(w.shape), bnb_oracle.dequantize(packed, state))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_forward(dtype, shape, with_bias, device):
    n, k = shape
    _, qw = weight(shape, dtype, device)
    x = torch.randn(2, 9, k, dtype=dtype, device=device)
    bias = torch.randn(n, dtype=dtype, device=device) if with_bias else None
    args = (*qw.op_args(), bias, "nf4", 64, [n, k])
    got = tm.linear_forward(x, *args)
    assert got.shape == (2, 9, n) and got.dtype == dtype
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(got, tm.linear_reference(x, *args), rtol=rtol, atol=atol)


def test_fused_forward_matches_bitsandbytes(device):
    import bitsandbytes as bnb

    w = torch.randn(64, 256) * 0.05
    qw = quantize_weight(w).to(device)
    x = torch.randn(5, 256)
    got = tm.linear_forward(x.to(device), *qw.op_args(), None, "nf4", 64, [64, 256])
    packed, state, _ = bnb_oracle.quantize(w, "nf4", 64, True)
    torch.testing.assert_close(
        got.cpu(), bnb.matmul_4bit(x, packed.t(), quant_state=state), rtol=2e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_dx(dtype, shape, device):
    n, k = shape
    _, qw = weight(shape, dtype, device)
    g = torch.randn(3, 11, n, dtype=dtype, device=device)
    args = (*qw.op_args(), "nf4", 64, [n, k])
    got = tm.linear_dx_fused(g, *args)
    assert got.shape == (3, 11, k)
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(got, tm.linear_dx_reference(g, *args), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gemv(dtype, shape, quant_type, device):
    n, k = shape
    _, qw = weight(shape, dtype, device, quant_type)
    x = torch.randn(1, 1, k, dtype=dtype, device=device)
    bias = torch.randn(n, dtype=dtype, device=device)
    args = (*qw.op_args(), bias, quant_type, 64, [n, k])
    got = tm.gemv(x, *args)
    assert got.shape == (1, 1, n)
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(got, tm.gemv_reference(x, *args), rtol=rtol, atol=atol)


def test_gemv_matches_bitsandbytes(device):
    import bitsandbytes as bnb

    w = torch.randn(96, 200) * 0.05
    qw = quantize_weight(w).to(device)
    x = torch.randn(1, 200)
    got = tm.gemv(x.to(device), *qw.op_args(), None, "nf4", 64, [96, 200])
    packed, state, _ = bnb_oracle.quantize(w, "nf4", 64, True)
    torch.testing.assert_close(
        got.cpu(), bnb.matmul_4bit(x, packed.t(), quant_state=state), rtol=2e-5, atol=1e-5
    )


def test_linear_routes_by_shape(device, monkeypatch):
    """One token takes the GEMV, a few the fused kernel, many dequantize then the dense matmul."""
    _, qw = weight((64, 256), torch.float32, device)
    args = (*qw.op_args(), None, "nf4", 64, [64, 256])
    calls = []
    for name in ("gemv", "linear_forward", "dequantize"):
        original = getattr(tm, name)
        monkeypatch.setattr(tm, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    monkeypatch.setattr(tm, "_DEQUANT_THEN_CUBLAS_M", 8)
    for m in (1, 4, 16):
        x = torch.randn(m, 256, device=device)
        torch.testing.assert_close(tm.linear(x, *args), tm.linear_reference(x, *args), rtol=2e-5, atol=1e-5)
    assert calls == ["gemv", "linear_forward", "dequantize"]


def test_kernels_reject_bad_shapes(device):
    _, qw = weight((64, 256), torch.float32, device)
    with pytest.raises(ValueError, match="does not match weight"):
        tm.linear_forward(torch.randn(2, 128, device=device), *qw.op_args(), None, "nf4", 64, [64, 256])
    with pytest.raises(ValueError, match="does not match weight"):
        tm.linear_dx_fused(torch.randn(2, 32, device=device), *qw.op_args(), "nf4", 64, [64, 256])


@pytest.mark.parametrize("m", [1, 6])
def test_ops_autograd_on_device(m, device):
    """torch.ops.qlora on the device: Triton on CUDA (GEMV for one row), the CPU path elsewhere."""
    _, qw = weight((96, 200), torch.float32, device)
    x = torch.randn(m, 200, device=device, requires_grad=True)
    bias = torch.randn(96, device=device, requires_grad=True)
    y = qw.linear(x, bias)
    g = torch.randn_like(y)
    y.backward(g)
    dense = qw.dequantize(torch.float32)
    torch.testing.assert_close(y, x.detach() @ dense.t() + bias.detach(), rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, g @ dense, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, g.sum(0), rtol=2e-5, atol=1e-5)
