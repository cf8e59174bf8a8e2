"""Blockwise 8-bit dynamic quantization of optimizer states (bitsandbytes' CPU semantics).

AdamW8bit keeps each state in blocks of 256 elements: one fp32 absmax per block and one uint8 code
per element. The first moment uses the signed dynamic map (`qlora_compile.codes.dynamic_map`), the
second moment, never negative, the unsigned one (`dynamic_map(signed=False)`, bitsandbytes'
`create_dynamic_map(signed=False)`).

Quantization follows bitsandbytes' CPU kernel bit for bit: `x * (1 / absmax)` in fp32, clamped to
[-1, 1], goes to the fixed-point slot `int((v + 1) * 0.5 * 65535 + 0.5)` of a 65536-entry table
that holds the code nearest to each slot's centre (`qlora_compile.codes.dynamic_lut`, the table
the nested absmax of the 4-bit format uses too). A block of zeros stores absmax 0 and code 0.
We use the same table on every device, so results do not depend on where a state lives.
"""

from __future__ import annotations

import functools

import torch

from ..codes import dynamic_lut, dynamic_map

BLOCK = 256  # elements per absmax block


@functools.cache
def _on(device: torch.device, signed: bool, what: str) -> torch.Tensor:
    table = dynamic_lut(signed) if what == "lut" else dynamic_map(signed)
    return table.to(device)


def lookup_table(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    return _on(torch.device(device), signed, "lut")


def quantize_blockwise(
    x: torch.Tensor, signed: bool, codes: torch.Tensor | None = None, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize fp32 `x` (flat) in blocks of 256; writes into `codes` / `absmax` when given.

    Returns `(codes uint8 (n,), absmax fp32 (ceil(n / 256),))`.
    """
    n = x.numel()
    pad = -n % BLOCK
    blocks = torch.nn.functional.pad(x.reshape(-1), (0, pad)) if pad else x.reshape(-1)
    blocks = blocks.view(-1, BLOCK)
    am = blocks.abs().amax(dim=1)
    normed = blocks * (1.0 / am).unsqueeze(1)
    normed = normed.clamp_(-1.0, 1.0).nan_to_num_(-1.0)  # 0 / 0 in a zero block -> code 0
    slot = normed.add_(1.0).mul_(0.5).mul_(65535.0).add_(0.5).to(torch.int32)  # truncates, as the C cast
    q = lookup_table(signed, x.device).index_select(0, slot.view(-1)[:n])  # much faster than [ ]
    if codes is None:
        codes = q
    else:
        codes.copy_(q)
    if absmax is None:
        absmax = am
    else:
        absmax.copy_(am)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 values `code[q] * absmax[i // 256]` (flat), as bitsandbytes computes them."""
    n = codes.numel()
    values = _on(codes.device, signed, "code").index_select(0, codes.reshape(-1).int())
    pad = -n % BLOCK
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    return (values.view(-1, BLOCK) * absmax.unsqueeze(1)).view(-1)[:n]
