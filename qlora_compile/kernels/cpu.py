"""Vectorized torch implementations of the 4-bit format: quantize, nested statistics, dequantize.

These run on any device (they are plain tensor ops) and are the pure-torch references that the
native CPU kernel and the Triton kernels are tested against. Work is chunked along whole blocks,
so the extra memory is a few chunk-sized temporaries, never (n x 16) of them.
"""

from __future__ import annotations

import torch

from ..codes import NESTED_BLOCKSIZE, bucket_bounds, code4, dynamic_lut, dynamic_map

CHUNK_ELEMENTS = 1 << 20  # ~4 MB of fp32 per temporary


def _chunks(n: int, blocksize: int, chunk: int = CHUNK_ELEMENTS):
    """Yield (start, stop) element ranges that start on block boundaries."""
    step = max(blocksize, chunk - chunk % blocksize)
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _scale_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale fp32 `x` (whole blocks, then at most one partial block) into [-1, 1].

    Full blocks multiply by the fp32 reciprocal of absmax; the trailing partial block divides,
    exactly as bitsandbytes does. A zero block scales by 1/1e-38 and stays zero; a zero partial
    block stores absmax 1e-38 (bitsandbytes clamps only that one).
    """
    full = x.numel() - x.numel() % blocksize
    blocks = x[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    if full == x.numel():
        return scaled.clamp_(-1, 1).view(-1), absmax
    tail = x[full:]
    tail_max = tail.abs().amax().clamp(min=1e-38)
    absmax = torch.cat([absmax, tail_max.unsqueeze(0)])  # stored clamped, as bitsandbytes does
    scaled = torch.cat([scaled.view(-1), tail / tail_max])
    return scaled.clamp_(-1, 1), absmax


def quantize_4bit(
    flat: torch.Tensor, quant_type: str, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Blockwise 4-bit quantization of a flat float tensor.

    Args:
        flat: 1-D fp32, fp16 or bf16 tensor of n elements.
        quant_type: "nf4" or "fp4".
        blocksize: elements per absmax block.

    Returns:
        packed: (ceil(n / 2),) uint8, two codes per byte, first element in the high nibble.
        absmax: (ceil(n / blocksize),) fp32.
        has_nonfinite: whether a NaN or Inf was seen (its block's absmax is not finite).
    """
    n = flat.numel()
    bounds, nibble = (t.to(flat.device) for t in bucket_bounds(quant_type))
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    nonfinite = False
    for start, stop in _chunks(n, blocksize):
        scaled, am = _scale_blocks(flat[start:stop].float(), blocksize)
        nonfinite = nonfinite or not bool(torch.isfinite(am).all())
        absmax[start // blocksize : start // blocksize + am.numel()] = am
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))  # pairs with a stored 0.0
        q = nibble[torch.bucketize(scaled, bounds, out_int32=True)]
        packed[start // 2 : start // 2 + q.numel() // 2] = (q[0::2] << 4) | q[1::2]
    return packed, absmax, nonfinite


def quantize_nested(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of fp32 absmax values (bitsandbytes' CPU algorithm, bit for bit).

    `offset = mean(absmax)`; `absmax - offset` is quantized in blocks of 256 with the signed
    dynamic 8-bit code through bitsandbytes' 65536-slot lookup table.

    Returns:
        qabsmax: (nb,) uint8 codes; nested_absmax: (ceil(nb / 256),) fp32; offset: 0-dim fp32.
    """
    offset = absmax.mean()
    centred = absmax - offset
    nb = centred.numel()
    pad = -nb % NESTED_BLOCKSIZE
    blocks = torch.nn.functional.pad(centred, (0, pad)).view(-1, NESTED_BLOCKSIZE)
    nested_absmax = blocks.abs().amax(dim=1)
    normed = blocks * (1.0 / nested_absmax).unsqueeze(1)
    # NaN (an overflowed mean) lands in slot 0 as in bitsandbytes' float-to-int conversion
    normed = normed.clamp_(-1, 1).nan_to_num_(-1.0)
    slot = ((normed + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)  # truncates, as the C cast
    codes = dynamic_lut().to(absmax.device)[slot]
    codes = codes.masked_fill_((nested_absmax == 0).unsqueeze(1), 0)
    codes = codes.view(-1)
    # a copy when padded: a slice would keep the padded storage alive (up to 255 bytes per weight)
    return (codes[:nb].clone() if pad else codes), nested_absmax, offset


def decode_absmax(
    absmax: torch.Tensor, nested_absmax: torch.Tensor | None, offset: torch.Tensor | None
) -> torch.Tensor:
    """fp32 per-block absmax: as stored, or `code8[q] * nested_absmax[b // 256] + offset`."""
    if nested_absmax is None:
        return absmax.float()
    code = dynamic_map().to(absmax.device)
    nb = absmax.numel()
    scale = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:nb]
    return code[absmax.long()] * scale + offset  # two roundings, no fma, as bitsandbytes


def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: the two code values that one packed byte holds (high nibble first)."""
    code = code4(quant_type).to(device)
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    blocksize: int,
    n: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat (n,) tensor `code4[q[i]] * absmax[i // blocksize]` in fp32, cast once to `dtype`.

    `absmax` is the decoded fp32 absmax (see `decode_absmax`).
    """
    table = _pair_table(quant_type, packed.device)
    packed = packed.view(-1)
    out = torch.empty(n, dtype=dtype, device=packed.device) if out is None else out
    for start, stop in _chunks(n, blocksize):
        values = table[packed[start // 2 : (stop + 1) // 2].long()].view(-1)[: stop - start]
        full = (stop - start) - (stop - start) % blocksize
        b0 = start // blocksize
        blocks = values[:full].view(-1, blocksize) * absmax[b0 : b0 + full // blocksize].unsqueeze(1)
        out[start : start + full] = blocks.view(-1)
        if full < stop - start:
            out[start + full : stop] = values[full:] * absmax[b0 + full // blocksize]
    return out
