"""Reading and writing safetensors files one tensor at a time.

Reading goes through safetensors' own `safe_open` (a memory map): a tensor is read in slices of
rows, and each tensor gets its own handle, closed after it, so the mapped pages of the tensors
already read leave the process. The header is also checked here against the file size, so a
truncated file is reported before any work.

Writing is our own, because `safetensors.torch.save_file` first turns every tensor into a Python
`bytes` copy: `write_file` writes the header, then each tensor's memory as it is (no copy), and
returns the SHA-256 of the file, computed on the way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names -> torch dtypes (those torch can hold)
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read (truncated, corrupt header)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives, read from a file's header."""

    name: str
    file: Path
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> list[TensorInfo]:
    """The tensors of a safetensors file, in file order; raises SafetensorsError if it is damaged."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{path}: corrupt or truncated safetensors header (header size {n}, file {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    infos, end = [], 0
    for name, entry in header.items():
        try:
            start, stop = entry["data_offsets"]
            info = TensorInfo(name, path, entry["dtype"], tuple(int(s) for s in entry["shape"]), stop - start)
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        infos.append((start, info))
        end = max(end, stop)
    if 8 + n + end != size:
        raise SafetensorsError(
            f"{path}: truncated or corrupt safetensors file: the header describes {8 + n + end} bytes, "
            f"the file has {size}"
        )
    return [info for _, info in sorted(infos, key=lambda x: x[0])]


def row_chunks(info: TensorInfo, max_elements: int, multiple: int = 1):
    """(start, stop) ranges along dim 0 of about `max_elements` elements each, a multiple of `multiple` rows."""
    rows = info.shape[0] if info.shape else 1
    per_row = max(1, info.numel // max(rows, 1))
    step = max(1, max_elements // per_row)
    step = max(multiple, step - step % multiple)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def encode_header(tensors: dict[str, dict], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header (padded to 8 bytes) of a safetensors file whose
    tensors are `{name: {"dtype", "shape", "data_offsets"}}`, in file order."""
    raw = json.dumps(
        {"__metadata__": metadata or {"format": "pt"}, **tensors}, separators=(",", ":")
    ).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_file(
    path: Path, entries: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> str:
    """Write `entries` (in order) as a safetensors file at `path`, fsync it; returns its SHA-256."""
    header: dict = {}
    offset = 0
    flats = []
    for name, t in entries:
        t = t.detach().contiguous()
        if t.dtype not in NAMES:
            raise TypeError(f"cannot write {name!r}: dtype {t.dtype} is not supported")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        flats.append(t)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        raw = encode_header(header, metadata)
        f.write(raw)
        digest.update(raw)
        for t in flats:
            if t.numel() == 0:
                continue
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            f.write(view)
            digest.update(view)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def write_streaming(
    path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], fill, chunk_bytes: int = 1 << 24
) -> None:
    """Write a safetensors file whose tensors are produced slice by slice: `fill(name, start, count)`
    returns the flat elements [start, start + count) of tensor `name`, or None for zeros (left as
    a hole in a sparse file: nothing is written). Memory: one slice."""
    header: dict = {}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    with open(path, "wb") as f:
        f.write(encode_header(header))
        for name, dtype, shape in specs:
            n, step = math.prod(shape), max(1, chunk_bytes // dtype.itemsize)
            for start in range(0, n, step):
                part = fill(name, start, min(step, n - start))
                if part is None:
                    f.seek(min(step, n - start) * dtype.itemsize, os.SEEK_CUR)
                    continue
                f.write(memoryview(part.to(dtype).contiguous().view(torch.uint8).numpy()))
        f.truncate()  # the file ends after the last tensor even when it is a hole


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


class SafetensorsWriter:
    """Writes one .safetensors file tensor by tensor, holding one tensor at a time in memory.

    The tensors' bytes go to a side file as they come; `close()` writes the header, appends the
    bytes, and renames the result into place.
    """

    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path = path
        self._data_path = path.with_name(path.name + ".data.partial")
        self._data = open(self._data_path, "wb")  # noqa: SIM115 (closed in close())
        self._header: dict[str, dict] = {}
        self._metadata = metadata
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"duplicate tensor name {name!r}")
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in NAMES:
            raise TypeError(f"cannot write {name!r}: dtype {t.dtype} is not supported")
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._data.write(data)
        self._header[name] = {
            "dtype": NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self._offset, self._offset + len(data)],
        }
        self._offset += len(data)

    def close(self) -> None:
        self._data.close()
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "wb") as out, open(self._data_path, "rb") as data:
            out.write(encode_header(self._header, self._metadata))
            shutil.copyfileobj(data, out, 16 << 20)
        os.remove(self._data_path)
        os.replace(partial, self.path)
