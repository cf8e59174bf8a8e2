"""`QuantizedWeight`: bitsandbytes' 4-bit storage format (NF4/FP4, optional double quantization).

The bytes are bitsandbytes 0.50's own: a checkpoint written here loads in transformers +
bitsandbytes, and a bitsandbytes checkpoint loads here. See DESIGN.md, "The storage format".
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace

import torch

from .codes import BLOCKSIZES, BNB_QUANT_TYPES, NESTED_BLOCKSIZE, QUANT_TYPES, code4, dynamic_map
from .dtypes import FLOAT_DTYPES, check_float_dtype, dtype_name
from .errors import InvalidArgumentError, InvalidFolderError, UnsupportedError
from .kernels import cpu as _torch_kernels
from .kernels import dispatch, ops, ops_cat, ops_experts  # noqa: F401  (registers torch.ops.qlora)

_MAX_REPORTED = 5
logger = logging.getLogger(__name__)
# A 4-bit weight `<m>.weight`'s JSON state is the entry `<m>.weight<QUANT_STATE><quant_type>` (the
# only place this key is spelled: `to_bnb` writes it, `from_bnb` and `ModelFolder.bnb_groups` find it).
QUANT_STATE = ".quant_state.bitsandbytes__"


@dataclass
class QuantizedWeight:
    """A weight in bitsandbytes' 4-bit format.

    Attributes:
        packed: (ceil(n / 2), 1) uint8, two codes per byte, first element in the high nibble.
        absmax: (n_blocks,) uint8 codes when double-quantized, else fp32 absmax per block.
        quant_type: "nf4" or "fp4".
        blocksize: elements per block along the flattened (row-major) weight.
        shape: shape of the original weight.
        dtype: dtype of the original weight, the default dequantize dtype.
        nested_absmax: (ceil(n_blocks / 256),) fp32 when double-quantized, else None.
        offset: 0-dim fp32 mean of the absmax values when double-quantized, else None.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    quant_type: str
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held by this weight's own tensors (the shared code tables are not counted)."""
        tensors = (self.packed, self.absmax, self.nested_absmax, self.offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def absmax_fp32(self) -> torch.Tensor:
        """Decoded fp32 absmax per block (undoes double quantization)."""
        return _torch_kernels.decode_absmax(self.absmax, self.nested_absmax, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense tensor of `dtype` (default: the original dtype).

        Equal, bit for bit, to `bitsandbytes.functional.dequantize_4bit`.
        """
        dtype = self.dtype if dtype is None else dtype
        check_float_dtype(dtype, "dequantize dtype")
        flat = dispatch.dequantize_4bit(
            self.packed, self.absmax, self.nested_absmax, self.offset,
            self.quant_type, self.blocksize, self.numel, dtype,
        )  # fmt: skip
        return flat.view(self.shape)

    def op_args(self) -> tuple:
        """The tensors and constants the `torch.ops.qlora` ops take after their first input."""
        return (self.packed, self.absmax, self.nested_absmax, self.offset)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W.T + bias` through `torch.ops.qlora.linear` (differentiable in x and bias)."""
        return torch.ops.qlora.linear(
            x, *self.op_args(), bias, self.quant_type, self.blocksize, list(self.shape)
        )

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy whose tensors live on `device`."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            nested_absmax=move(self.nested_absmax),
            offset=move(self.offset),
        )

    def quant_state_json(self) -> dict:
        """The JSON part of bitsandbytes' packed quant state (key order matters for the bytes)."""
        state = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.double_quant:
            state["nested_blocksize"] = NESTED_BLOCKSIZE
            state["nested_dtype"] = "float32"
            state["nested_offset"] = self.offset.item()
        return state

    def to_bnb(self, prefix: str) -> dict[str, torch.Tensor]:
        """The safetensors entries bitsandbytes writes for a module named `prefix`.

        Keys: `<prefix>.weight`, `.weight.absmax`, `.weight.quant_map`, and when double-quantized
        `.weight.nested_absmax`, `.weight.nested_quant_map`; then
        `.weight.quant_state.bitsandbytes__<quant_type>` (the JSON state as uint8 bytes).

        Raises:
            NotImplementedError: an "int4" weight (bitsandbytes has no such type: nothing could
                read the entries back).
        """
        check_bnb_quant_type(self.quant_type, "a bitsandbytes 4-bit checkpoint")
        key = f"{prefix}.weight" if prefix else "weight"
        out = {
            key: self.packed,
            f"{key}.absmax": self.absmax,
            f"{key}.quant_map": code4(self.quant_type).to(self.device),
        }
        if self.double_quant:
            out[f"{key}.nested_absmax"] = self.nested_absmax
            out[f"{key}.nested_quant_map"] = dynamic_map().to(self.device)
        state = json.dumps(self.quant_state_json()).encode("utf-8")
        out[f"{key}{QUANT_STATE}{self.quant_type}"] = torch.tensor(list(state), dtype=torch.uint8)
        return out

    @classmethod
    def from_bnb(cls, tensors: dict[str, torch.Tensor], prefix: str) -> QuantizedWeight:
        """Read the entries `to_bnb(prefix)` writes (or bitsandbytes / transformers wrote)."""
        return _from_bnb(tensors, f"{prefix}.weight" if prefix else "weight")


def quantize_weight(
    w: torch.Tensor, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> QuantizedWeight:
    """Quantize `w` to bitsandbytes' 4-bit format, byte for byte as `bitsandbytes.functional.quantize_4bit`.

    Args:
        w: fp32, fp16 or bf16 tensor of any shape (flattened row-major into blocks).
        quant_type: "nf4" (NormalFloat, the QLoRA default) or "fp4".
        blocksize: elements per absmax block, a power of two from 32 to 4096.
        double_quant: also quantize the absmax values (8-bit, blocks of 256): 4.127 bits per
            parameter instead of 4.5 at blocksize 64.

    Raises:
        TypeError: `w` is not a tensor, or not fp32/fp16/bf16.
        ValueError: `w` is empty, holds NaN or Inf (the message counts them and names the first
            positions), or `quant_type` / `blocksize` is not supported.
    """
    _check_input(w, quant_type, blocksize)
    flat = w.detach().reshape(-1)
    packed, absmax, nonfinite = dispatch.quantize_4bit(flat, quant_type, blocksize)
    if nonfinite:
        _raise_nonfinite(w)
    qw = QuantizedWeight(packed.view(-1, 1), absmax, quant_type, blocksize, w.shape, w.dtype)
    if double_quant:
        codes, nested_absmax, offset = _torch_kernels.quantize_nested(absmax)
        qw = replace(qw, absmax=codes, nested_absmax=nested_absmax, offset=offset)
        if not bool(torch.isfinite(offset)):
            logger.warning(
                "double quantization overflowed for a weight of shape %s (mean absmax is %s): "
                "the statistics cannot be stored in fp32; use double_quant=False",
                tuple(w.shape), offset.item(),
            )  # fmt: skip
    return qw


def check_bnb_quant_type(quant_type: str, what: str) -> None:
    """Refuse a 4-bit type that bitsandbytes' format cannot hold (Int4) where `what` is written."""
    if quant_type not in BNB_QUANT_TYPES:
        raise UnsupportedError(
            f"{what} holds bitsandbytes' 4-bit types {BNB_QUANT_TYPES} only, not {quant_type!r}: bitsandbytes "
            "(and transformers, vLLM, ONNX Runtime's MatMulBnb4) has no Int4 code; train or export with nf4 or fp4"
        )


def _raise_nonfinite(w: torch.Tensor) -> None:
    """Count and locate NaN/Inf (a second pass, taken only when the quantizer saw one)."""
    bad = ~torch.isfinite(w.detach())
    count = int(bad.sum())
    where = [tuple(i.tolist()) for i in bad.nonzero()[:_MAX_REPORTED]]
    nan, inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
    raise InvalidArgumentError(
        f"weight of shape {tuple(w.shape)} holds {count} non-finite value(s) "
        f"({nan} NaN, {inf} Inf); first at index {', '.join(map(str, where))}"
    )


def _check_input(w: torch.Tensor, quant_type: str, blocksize: int) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(w).__name__}")
    check_float_dtype(w.dtype, "weight dtype")
    if w.numel() == 0:
        raise InvalidArgumentError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    if quant_type not in QUANT_TYPES:
        raise InvalidArgumentError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise InvalidArgumentError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def _from_bnb(tensors: dict[str, torch.Tensor], key: str) -> QuantizedWeight:
    def need(name: str) -> torch.Tensor:
        if name not in tensors:
            raise InvalidFolderError(f"missing bitsandbytes entry {name!r}")
        return tensors[name]

    states = [k for k in tensors if k.startswith(f"{key}{QUANT_STATE}")]
    if len(states) != 1:
        raise InvalidFolderError(f"expected one '{key}{QUANT_STATE}*' entry, found {states}")
    state = json.loads(bytes(tensors[states[0]].tolist()).decode("utf-8"))
    quant_type, blocksize = state["quant_type"], int(state["blocksize"])
    if quant_type not in BNB_QUANT_TYPES or blocksize not in BLOCKSIZES:
        raise InvalidFolderError(f"{states[0]}: unsupported quant_type/blocksize {quant_type}/{blocksize}")
    if state["dtype"] not in FLOAT_DTYPES:
        raise InvalidFolderError(f"{states[0]}: unsupported dtype {state['dtype']!r}")
    shape = torch.Size(state["shape"])
    n = math.prod(shape)
    packed, absmax = need(key), need(f"{key}.absmax")
    if packed.dtype != torch.uint8:  # quant_storage other than uint8: same bytes
        packed = packed.contiguous().view(torch.uint8)
    if packed.numel() != (n + 1) // 2 or absmax.numel() != -(-n // blocksize):
        raise InvalidFolderError(
            f"{key}: sizes do not match shape {list(shape)} at blocksize {blocksize}: "
            f"{packed.numel()} packed bytes, {absmax.numel()} absmax values"
        )
    qw = QuantizedWeight(
        packed.reshape(-1, 1), absmax, quant_type, blocksize, shape, FLOAT_DTYPES[state["dtype"]]
    )
    if "nested_offset" not in state:
        return replace(qw, absmax=absmax.float())
    nested = need(f"{key}.nested_absmax").float()
    offset = torch.tensor(
        state["nested_offset"], dtype=torch.float32, device=nested.device
    )  # real on meta loads
    if absmax.dtype != torch.uint8 or nested.numel() != -(-absmax.numel() // NESTED_BLOCKSIZE):
        raise InvalidFolderError(f"{key}: nested statistics do not match {absmax.numel()} blocks")
    return replace(qw, nested_absmax=nested, offset=offset)
