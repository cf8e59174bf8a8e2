"""bitsandbytes as a test oracle: its quantize/dequantize and its packed state dict."""

from __future__ import annotations

import copy
import logging

import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import bitsandbytes.functional as bnbf  # noqa: E402


def quantize(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool):
    """(packed, QuantState, {key: tensor} as bitsandbytes serialises a module's weight)."""
    packed, state = bnbf.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    entries = {"weight": packed}
    entries.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return packed, state, entries


def dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantize of the flattened weight, reshaped.

    bitsandbytes 0.50.2's native CPU kernel indexes absmax per row for 2-D shapes, so it returns
    wrong values when a row is not a whole number of blocks (e.g. (96, 160) at blocksize 64: its
    own round trip errs by 0.11 where the flat path errs by 0.023). Its flat path follows the
    format (blocks along the flat index), so that is the oracle.
    """
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([state.shape.numel()])
    return bnbf.dequantize_4bit(packed, flat_state).view(state.shape)
