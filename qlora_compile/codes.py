"""Code tables of the bitsandbytes 4-bit and 8-bit formats.

Facts copied from bitsandbytes 0.50 (values, orderings, rounding); the code is ours. Every table is
a CPU fp32 tensor built once; callers move it to their device.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch

from .errors import InvalidArgumentError

QuantType = Literal["nf4", "fp4", "int4"]
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4", "int4")
# The 4-bit types bitsandbytes (and so its checkpoints, transformers and ONNX Runtime) knows.
BNB_QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # double quantization groups absmax values in blocks of 256

# NF4: quantiles of N(0, 1) normalised to [-1, 1]; index = 4-bit value, ascending.
_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, divided by its max (12) in fp32.
# Entry 8 (sign bit set, zero) is +0.0 as in bitsandbytes, whose table writes the int `-0`: the
# quant_map bytes it serializes hold +0 there.
_FP4_RAW = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
# Int4 (the paper's third data type; not a bitsandbytes type): symmetric absmax, the 4-bit value
# q + 7 stores q / 7 for q in -7..7. The 16th entry repeats +1.0 last, so the midpoint between the
# two is 1.0 itself: scaled values are clamped to [-1, 1] and a tie goes to the lower code, so that
# slot is never chosen (a value of exactly +absmax stores 14). 15 levels, symmetric around 0.
INT4_LEVELS = 7
_INT4 = [q / INT4_LEVELS for q in range(-INT4_LEVELS, INT4_LEVELS + 1)] + [1.0]


@functools.cache
def code4(quant_type: str) -> torch.Tensor:
    """The 16-entry fp32 code table of `quant_type`, indexed by the 4-bit value."""
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type == "fp4":
        raw = torch.tensor(_FP4_RAW, dtype=torch.float32)
        return raw / raw.abs().max()
    if quant_type == "int4":
        return torch.tensor(_INT4, dtype=torch.float32)  # q / 7 in float64, rounded once to fp32
    raise InvalidArgumentError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


@functools.cache
def bucket_bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision thresholds for quantizing to `quant_type`.

    Returns `(bounds, nibble)`: a scaled value `x` falls in bucket `b = #(bounds < x)` (a tie goes
    to the lower bucket) and is stored as the 4-bit value `nibble[b]`. The bounds are fp32
    midpoints of the sorted code. FP4 holds +0 and -0; a stable sort puts +0 first, so values
    <= 0 near zero store +0 and small positive values store -0, as bitsandbytes does.
    """
    code = code4(quant_type)
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    return bounds, order.to(torch.uint8)


@functools.cache
def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic code (`create_dynamic_map(signed)`): 256 sorted fp32 values.

    Signed (nested absmax, AdamW8bit's first moment): seven exponent ranges 1e-6 .. 1, each with
    the midpoints of 2**i + 1 evenly spaced points in [0.1, 1] on both sides of zero; then 0 and 1.
    Unsigned (AdamW8bit's second moment, never negative): no sign bit, so twice as many fractions
    per range (2**(i + 1) + 1 points), positive only.
    """
    max_exponent_bits, non_sign_bits = 7, 7 if signed else 8
    data: list[float] = []
    for i in range(max_exponent_bits):
        n_fraction = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, n_fraction, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@functools.cache
def dynamic_lut(signed: bool = True) -> torch.Tensor:
    """65536-entry uint8 table from a fixed-point position in [-1, 1] to the nearest 8-bit code of
    `dynamic_map(signed)`.

    bitsandbytes' CPU quantizer maps a normalised value `v` to the slot
    `int((v + 1) * 0.5 * 65535 + 0.5)` and reads the code from this table; we reproduce the table
    exactly (fp32 slot centres, fp32 midpoints, first midpoint not below the centre).
    """
    code = dynamic_map(signed).numpy()
    mid = np.float32(0.5) * (code[:-1] + code[1:])
    slots = np.arange(65536, dtype=np.float32)
    centres = np.float32(-1.0) + (np.float32(2.0) * slots) / np.float32(65535)
    return torch.from_numpy(np.searchsorted(mid, centres, side="left").astype(np.uint8))
