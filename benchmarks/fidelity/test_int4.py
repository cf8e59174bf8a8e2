"""The reference Int4 quantizer of the fidelity benchmark (`int4.py` beside it; `make test` runs this)."""

import pytest
import torch
from int4 import quantize_int4

from qlora_compile import quantize_weight
from qlora_compile.kernels.cpu import decode_absmax, quantize_nested


def straightforward_int4(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block by block, in plain Python over blocks: codes round(x * 7 / absmax) and absmax."""
    flat = w.reshape(-1).float()
    codes, absmax = [], []
    for start in range(0, flat.numel(), blocksize):
        block = flat[start : start + blocksize]
        m = block.abs().max()
        absmax.append(m)
        codes.append(torch.round(block * (7 / m)) if m > 0 else torch.zeros_like(block))
    return torch.cat(codes), torch.stack(absmax)


@pytest.mark.parametrize("shape", [(48, 64), (7, 50), (1000,)])  # partial last block in the last two
def test_round_trip_matches_straightforward(shape):
    w = torch.randn(shape, dtype=torch.bfloat16)
    w.view(-1)[:64] = 0  # a zero block
    codes, absmax = straightforward_int4(w, 64)
    qw = quantize_int4(w, blocksize=64, double_quant=False)
    assert torch.equal(qw.codes.float(), codes)
    assert torch.equal(qw.absmax, absmax)
    assert qw.codes.abs().max() <= 7 and qw.codes.min() >= -7
    scale = absmax.repeat_interleave(64)[: w.numel()]
    assert torch.equal(qw.dequantize(), ((codes / 7) * scale).view(shape))
    assert (qw.dequantize() - w.float()).abs().max() <= absmax.max() / 14 * (1 + 1e-6)  # half a step


def test_double_quant_decodes_absmax_like_the_4bit_format():
    w = torch.randn(96, 512)
    qw = quantize_int4(w, double_quant=True)
    plain = quantize_int4(w, double_quant=False)
    assert torch.equal(qw.codes, plain.codes)  # codes come from the exact absmax
    codes, nested, offset = quantize_nested(plain.absmax)
    assert torch.equal(qw.absmax, codes) and torch.equal(qw.nested_absmax, nested)
    scale = decode_absmax(codes, nested, offset).repeat_interleave(64)
    assert torch.equal(qw.dequantize(), ((plain.codes.float() / 7) * scale).view(96, 512))
    nf4 = quantize_weight(w, quant_type="nf4", double_quant=True)
    assert qw.storage_bits() == nf4.nbytes * 8  # the same 4.127 bits per parameter as NF4 + DQ


def test_error_ordering_on_gaussian_weights():
    """NF4 is the best 4-bit type for normally distributed weights; symmetric Int4 (15 levels) sits
    between NF4 and bitsandbytes' FP4, whose code spends levels near zero (0 and 0.0052)."""
    w = torch.randn(512, 512)
    mse = {
        t: (quantize_weight(w, quant_type=t).dequantize() - w).pow(2).mean() for t in ("nf4", "fp4", "int4")
    }
    assert mse["nf4"] < 0.8 * mse["int4"] and mse["int4"] < 0.85 * mse["fp4"]
