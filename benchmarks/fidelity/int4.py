"""A reference symmetric absmax Int4 quantizer, for data-type comparisons only.

Int4 is not a bitsandbytes 4-bit type and not a storage format of this library (`quantize_weight`
takes "nf4" and "fp4" only, as bitsandbytes does). It is the paper's third data type, kept beside
the fidelity benchmark (`run.py`) so that it compares NF4, FP4 and Int4 on equal terms:

- blocks of `blocksize` elements along the flattened (row-major) weight, as the 4-bit format;
- absmax per block in fp32; a value `x` is stored as the integer `q = round(x * 7 / absmax)` in
  -7..7 (round half to even, 15 levels: symmetric, so -8 is unused), and reads back as
  `q * absmax / 7`;
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
        """`codes * absmax / 7` in fp32 (absmax decoded first when nested), cast once to `dtype`."""
        absmax = decode_absmax(self.absmax, self.nested_absmax, self.offset)
        n = self.codes.numel()
        scale = (absmax / INT4_LEVELS).repeat_interleave(self.blocksize)[:n]
        return (self.codes.float() * scale).to(dtype).view(self.shape)


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
