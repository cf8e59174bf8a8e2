"""The floating dtypes the 4-bit format dequantizes to and computes in, by the names users write.

One table for the whole package: `QLoRAConfig.compute_dtype`, the kernels' output dtypes, the
bitsandbytes quant state's `"dtype"` field, and every `--dtype` / `--compute-dtype` option.
"""

from __future__ import annotations

import torch

from .errors import InvalidArgumentError

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16 (the name bitsandbytes' quant state and config.json use)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """One of FLOAT_DTYPES from its name ("bfloat16", or "torch.bfloat16" as configs write it).

    Raises:
        InvalidArgumentError: any other name or dtype; the message names `what` and the allowed names.
    """
    key = dtype_name(name) if isinstance(name, torch.dtype) else str(name).removeprefix("torch.")
    if key not in FLOAT_DTYPES:
        raise InvalidArgumentError(f"{what} must be one of {', '.join(FLOAT_DTYPES)}, got {name!r}")
    return FLOAT_DTYPES[key]


def check_float_dtype(dtype: torch.dtype, what: str) -> None:
    """Raises TypeError unless `dtype` is one of FLOAT_DTYPES (`what` names it in the message)."""
    if dtype not in FLOAT_DTYPES.values():
        names = ", ".join(str(d) for d in FLOAT_DTYPES.values())
        raise TypeError(f"{what} must be one of {names}; got {dtype}")
