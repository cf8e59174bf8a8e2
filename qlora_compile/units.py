"""Sizes in bytes as users write them: "48GB", "48GiB", "500 MB", "1.5TB".

One rule for every option that takes a size (`plan --gpu-memory`, `--optim-budget`,
`convert --max-shard-size`): a number and a unit, decimal (B, KB, MB, GB, TB: powers of 10, as
transformers' `max_shard_size` and disk vendors count) or binary (KiB, MiB, GiB, TiB: powers of 2),
any case. A bare number is refused as a string (48 what?); an int is taken as bytes.
"""

from __future__ import annotations

import re

from .errors import InvalidArgumentError

UNITS: dict[str, int] = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(size: int | str, what: str = "size") -> int:
    """Bytes in `size`: an int (bytes), or a number with a unit ("48GB" = 48 * 10**9, "48GiB" = 48 * 2**30).
    `what` names the size in error messages (an option: "--gpu-memory").

    Raises:
        InvalidArgumentError: no number, no unit, an unknown unit, or a negative int.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 0:
            raise InvalidArgumentError(f"{what} must be at least 0 bytes, got {size}")
        return size
    match = _SIZE.fullmatch(str(size))
    if match is None:
        raise InvalidArgumentError(f"{what} {size!r} is not a number with a unit, such as 48GB or 48GiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in UNITS:
        hint = "a unit is required" if not unit else f"unknown unit {match.group(2)!r}"
        raise InvalidArgumentError(
            f"{what} {size!r}: {hint}; use B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB"
        )
    return int(number * UNITS[unit])
