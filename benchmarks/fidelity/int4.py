"""A reference symmetric absmax Int4 quantizer, written independently of the library's Int4.

The library stores Int4 as a third 4-bit code table (`quantize_weight(w, quant_type="int4")`,
`qlora_compile.codes`), chosen by the same kernels as NF4 and FP4; this straightforward version is
its oracle (`tests/test_int4.py`) and the Int4 of the pre-training fidelity table (`run.py`):

- blocks of `blocksize` elements along the flattened (row-major) weight, as the 4-bit format;
- absmax per block in fp32; a value `x` is stored as the integer `q = round(x * 7 / absmax)` in
  -7..7 (round half to even, 15 levels: symmetric, so -8 is unused), and reads back as
  `(q / 7) * absmax` in fp32;
- the library picks the nearest code by thresholds on `x * (1 / absmax)` in fp32, a tie going to
  the lower code as bitsandbytes does for NF4/FP4: the codes agree everywhere except at values
  exactly halfway between two levels (`x * 7 / absmax = k + 0.5`), where the two rules may pick
  the two neighbours (0.17% of bf16 Gaussian weights, none of fp32 ones in `tests/test_int4.py`);
- with `double_quant=True` the absmax values are double-quantized exactly as the 4-bit format
  does it (`kernels.cpu.quantize_nested`: 8-bit dynamic codes in blocks of 256 around their mean),
  and the values are read back with the decoded absmax. Codes are chosen with the exact absmax,
  as bitsandbytes does for NF4/FP4.

Storage cost is the same as NF4/FP4: 4 bits per value plus the absmax statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora_compile.kernels.cpu import decode_absmax, quantize_nested

INT4_LEVELS = 7  # codes -7..7, scaled by absmax / 7


@dataclass
class Int4Weight:
    """Int4 codes (one int8 per value, unpacked: this is a reference) and their statistics."""

    codes: torch.Tensor  # (n,) int8 in -7..7
    absmax: torch.Tensor  # (n_blocks,) fp32, or uint8 codes when double-quantized
    blocksize: int
    shape: torch.Size
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def storage_bits(self) -> int:
        """Bits this weight would take packed: 4 per value plus the statistics."""
        bits = 4 * self.codes.numel() + self.absmax.numel() * self.absmax.element_size() * 8
        if self.double_quant:
            bits += 32 * self.nested_absmax.numel() + 32
        return bits

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`(codes / 7) * absmax` in fp32 (absmax decoded first when nested), cast once to `dtype`:
        the code value times absmax, as the 4-bit format reads any code."""
        absmax = decode_absmax(self.absmax, self.nested_absmax, self.offset)
        n = self.codes.numel()
        scale = absmax.repeat_interleave(self.blocksize)[:n]
        return ((self.codes.float() / INT4_LEVELS) * scale).to(dtype).view(self.shape)


def quantize_int4(w: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True) -> Int4Weight:
    """Symmetric absmax Int4 of `w` (any float dtype and shape), blocks along the flat index."""
    if not w.dtype.is_floating_point or w.numel() == 0:
        raise ValueError(f"expected a non-empty float tensor, got {w.dtype} of shape {tuple(w.shape)}")
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = padded.abs().amax(dim=1)
    scale = torch.where(absmax > 0, INT4_LEVELS / absmax, torch.zeros_like(absmax))
    codes = torch.round(padded * scale.unsqueeze(1)).clamp_(-INT4_LEVELS, INT4_LEVELS)
    qw = Int4Weight(codes.to(torch.int8).view(-1)[:n].contiguous(), absmax, blocksize, w.shape)
    if double_quant:
        qw.absmax, qw.nested_absmax, qw.offset = quantize_nested(absmax)
    return qw
