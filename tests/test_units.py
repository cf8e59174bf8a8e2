"""Sizes as users write them: one rule for --gpu-memory, --optim-budget and --max-shard-size."""

import pytest

from qlora_compile.errors import InvalidArgumentError
from qlora_compile.units import parse_size


@pytest.mark.parametrize(
    "text, expected",
    [("48GB", 48 * 10**9), ("48GiB", 48 * 2**30), ("48 gib", 48 * 2**30), ("1.5TB", 15 * 10**11),
     ("512MiB", 512 * 2**20), ("100B", 100), ("2gb", 2 * 10**9), (" 60KB ", 60_000), (4096, 4096)],
)  # fmt: skip
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [("48", "a unit is required"), ("48G", "unknown unit 'G'"), ("48GX", "unknown unit 'GX'"),
     ("lots", "not a number with a unit"), ("-1GB", "not a number with a unit"), (-1, "at least 0 bytes")],
)  # fmt: skip
def test_parse_size_errors(text, message):
    with pytest.raises(InvalidArgumentError, match=message):
        parse_size(text)
    with pytest.raises(ValueError):  # what callers caught before
        parse_size(text)


def test_the_option_is_named():
    with pytest.raises(InvalidArgumentError, match=r"^--max-shard-size '2': a unit is required"):
        parse_size("2", "--max-shard-size")
