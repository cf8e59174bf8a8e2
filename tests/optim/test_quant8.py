"""8-bit blockwise state quantization against bitsandbytes.functional (its CPU kernel)."""

import pytest
import torch

from qlora_compile.codes import dynamic_map
from qlora_compile.optim.quant8 import dequantize_blockwise, quantize_blockwise
from tests.bnb_oracle import bnbf


def test_maps_equal_bitsandbytes():
    assert torch.equal(dynamic_map(signed=False), bnbf.create_dynamic_map(signed=False))
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map(signed=True))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [256, 4096, 5000, 100_003])
def test_quantize_bytes_equal_bitsandbytes(signed, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4  # wide dynamic range
    if not signed:
        x = x.square()  # second moments: never negative
    x[:256] = 0.0  # a zero block (all of x when n == 256)
    x[-1] = 1e-30  # tiny values
    codes, absmax = quantize_blockwise(x, signed)
    ref_codes, ref_state = bnbf.quantize_blockwise(
        x, code=bnbf.create_dynamic_map(signed=signed), blocksize=256
    )
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax, ref_state.absmax)
    out = dequantize_blockwise(codes, absmax, signed)
    assert torch.equal(out, bnbf.dequantize_blockwise(ref_codes, ref_state))


def test_quantize_writes_into_given_buffers():
    x = torch.randn(1000)
    codes = torch.empty(1000, dtype=torch.uint8)
    absmax = torch.empty(4)
    quantize_blockwise(x, True, codes=codes, absmax=absmax)
    ref_codes, ref_absmax = quantize_blockwise(x, True)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
