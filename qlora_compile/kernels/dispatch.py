"""Pick the implementation of each format primitive by device.

CUDA: Triton kernels. CPU: the native vectorized kernel (`native.py`) when it built, else the
vectorized torch path (`cpu.py`). Both CPU paths are bit-identical; tests check each one.
"""

from __future__ import annotations

import torch

from . import cpu, native


def quantize_4bit(flat: torch.Tensor, quant_type: str, blocksize: int):
    """(packed uint8 (ceil(n/2),), absmax fp32 (n_blocks,), has_nonfinite) for a flat float tensor."""
    if flat.device.type == "cpu" and native.available():
        return native.quantize_4bit(flat, quant_type, blocksize)
    return cpu.quantize_4bit(flat, quant_type, blocksize)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    quant_type: str,
    blocksize: int,
    n: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat (n,) dequantized weight of `dtype`, written into `out` (contiguous, n elements) if given."""
    if packed.device.type == "cuda":
        from . import triton_dequant

        flat = triton_dequant.dequantize(
            packed, absmax, nested_absmax, offset, quant_type, blocksize, n, dtype
        )
        return flat if out is None else out.copy_(flat)
    if packed.device.type == "cpu" and native.available():
        return native.dequantize_4bit(
            packed, absmax, nested_absmax, offset, quant_type, blocksize, n, dtype, out
        )
    absmax32 = cpu.decode_absmax(absmax, nested_absmax, offset)
    return cpu.dequantize_4bit(packed, absmax32, quant_type, blocksize, n, dtype, out)
