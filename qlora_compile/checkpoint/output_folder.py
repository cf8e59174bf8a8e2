"""Every folder this package writes: atomic, sharded as `save_pretrained` shards, resumable after a kill.

- **Atomic.** A folder is written under `<out>.partial` and renamed to `<out>` once complete, so a
  killed run never leaves an `<out>` (`atomic_folder`; files added to an existing folder, such as
  an adapter's or an ONNX file beside others, go through `atomic_files`).
- **Sharded** like transformers' `save_pretrained`: one `model.safetensors`, or
  `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json` once the tensors pass
  `max_shard_size` (default 2GB, as `convert_checkpoint`'s).
- **Resumable.** A manifest in `<out>.partial` records each finished shard with its SHA-256 (and
  what the caller noted while writing it); the same run again (the same inputs, unchanged, and
  options) reuses the shards that still verify and writes the rest, so the result equals an
  uninterrupted run byte for byte. Other inputs or options start over.
- **Header first.** A shard's names, dtypes and shapes are known before its tensors are computed
  (`Entry`: a `TensorSpec` and how to get the tensor), so each tensor is written once, as it
  comes (`SafetensorsStream`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .safetensors_file import SafetensorsStream, TensorSpec, sha256_file

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MANIFEST = ".qlora-manifest.json"
DEFAULT_MAX_SHARD_SIZE = "2GB"


@dataclass(frozen=True)
class Entry:
    """One tensor of a shard: its spec, known up front, and `fill()`, called when its turn comes."""

    spec: TensorSpec
    fill: Callable[[], torch.Tensor]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> Entry:
        """A tensor already computed."""
        return cls(TensorSpec(name, tensor.dtype, tuple(tensor.shape)), lambda: tensor)


@dataclass
class Written:
    """What `OutputFolder.write_weights` wrote."""

    shards: list[str]
    reused: int
    bytes_out: int
    notes: list[Any] = field(default_factory=list)  # each item's note, in item order, reused shards' too


def shard_names(n: int) -> list[str]:
    """transformers' shard file names for `n` shards."""
    return [WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def split_shards(items: Sequence, size: Callable[[Any], int], max_bytes: int) -> list[list]:
    """`items` in order, cut into shards of at most `max_bytes` (an item larger than that alone)."""
    shards: list[list] = [[]]
    total = 0
    for item in items:
        if shards[-1] and total + size(item) > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(item)
        total += size(item)
    return shards if shards[0] else []


def fingerprint(inputs: Sequence[Path], options: dict) -> str:
    """Identifies a run: its input files (name, size, mtime), its options and our version."""
    from .. import __version__

    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in inputs]
    blob = json.dumps(
        {"files": stats, "options": options, "version": __version__}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _replace_folder(partial: Path, dst: Path) -> None:
    """`partial` renamed to `dst`; an existing `dst` goes only once the new one is in place."""
    if dst.exists():
        old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        partial.rename(dst)
        shutil.rmtree(old)
    else:
        partial.rename(dst)


@contextlib.contextmanager
def atomic_folder(dst: str | Path) -> Iterator[Path]:
    """A fresh `<dst>.partial` to write into, renamed to `dst` (replacing it) when the block succeeds,
    removed when it fails."""
    dst = Path(dst)
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _replace_folder(partial, dst)


@contextlib.contextmanager
def atomic_files(directory: str | Path, name: str) -> Iterator[Path]:
    """A fresh hidden folder (`<directory>/.<name>.partial`) to write files into; when the block
    succeeds each is moved into `directory` (created if needed) with `os.replace`: a crash leaves
    each file old or new, never half of one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        for f in sorted(partial.iterdir()):
            os.replace(f, directory / f.name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


class OutputFolder:
    """A model folder being written under `<dst>.partial`, sharded, resumable; renamed to `dst` when
    the `with` block succeeds.

    Args:
        dst: the folder to create (an existing one is replaced only once the new one is complete).
        inputs: the files the run reads (their size and mtime identify the run, with `options`).
        options: everything else that decides the output.
        max_shard_size: largest shard in bytes (sizes as the caller estimates them).
        bad_input: the exception type that means the input is bad: the partial folder is removed
            (nothing to resume). Any other exception, or a kill, leaves it for the next run.
    """

    def __init__(
        self,
        dst: str | Path,
        *,
        inputs: Sequence[Path],
        options: dict,
        max_shard_size: int,
        bad_input: type[BaseException] = ValueError,
    ):
        self.dst = Path(dst)
        self.path = self.dst.with_name(self.dst.name + ".partial")
        self.max_bytes = max_shard_size
        self._bad_input = bad_input
        self._manifest = self._load_manifest(fingerprint(inputs, options))

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            (self.path / MANIFEST).unlink()
            _replace_folder(self.path, self.dst)
        elif isinstance(error, self._bad_input):
            shutil.rmtree(self.path, ignore_errors=True)

    def _load_manifest(self, fingerprint: str) -> dict:
        """The finished shards recorded in the partial folder when it belongs to this same run; else start over."""
        path = self.path / MANIFEST
        if self.path.exists():
            try:
                manifest = json.loads(path.read_text())
                if manifest.get("fingerprint") == fingerprint:
                    return manifest
                logger.warning("%s belongs to another run: starting over", self.path)
            except (OSError, json.JSONDecodeError):
                logger.warning("%s has no readable manifest: starting over", self.path)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        manifest = {"fingerprint": fingerprint, "shards": {}}
        self._save_manifest(manifest)
        return manifest

    def _save_manifest(self, manifest: dict) -> None:
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.path / MANIFEST)

    def _record(self, name: str, record: dict) -> None:
        """A shard is complete: into the manifest (a kill after this keeps it)."""
        self._manifest["shards"][name] = record
        self._save_manifest(self._manifest)

    def _reusable(self, name: str) -> dict | None:
        record = self._manifest["shards"].get(name)
        path = self.path / name
        if record and path.is_file() and sha256_file(path) == record["sha256"]:
            return record
        return None

    def write_weights(
        self,
        items: Sequence,
        entries: Callable[[Any], tuple[list[Entry], Any]],
        *,
        size: Callable[[Any], int],
        on_item: Callable[[Any], None] = lambda item: None,
        total_parameters: int | None = None,
    ) -> Written:
        """Write `items` as the folder's safetensors shards (and the index when there are several).

        `entries(item)` gives the item's tensors and a JSON-able note (kept in the manifest, so a
        resumed run returns the notes of the shards it reuses); `size(item)` its estimated bytes,
        which cut the shards; `on_item(item)` is called once each item is written or reused. The
        entries of a whole shard are asked for first (their specs make the header), then filled in
        order: an entry computed up front stays in memory until its turn, a lazy one is computed then.
        """
        shards = split_shards(items, size, self.max_bytes)
        names = shard_names(len(shards))
        written = Written(names, 0, 0)
        weight_map = {}
        for name, shard in zip(names, shards, strict=True):
            record = self._reusable(name)
            if record is not None:
                written.reused += 1
                for item in shard:
                    on_item(item)
            else:
                record = self._write_shard(name, shard, entries, on_item)
            weight_map.update(dict.fromkeys(record["keys"], name))
            written.notes += record["notes"]
        written.bytes_out = sum((self.path / n).stat().st_size for n in names)
        if len(names) > 1:
            metadata = {"total_size": written.bytes_out}
            if total_parameters is not None:
                metadata["total_parameters"] = total_parameters
            index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
            (self.path / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return written

    def _write_shard(self, name: str, shard: list, entries, on_item) -> dict:
        planned = [(item, *entries(item)) for item in shard]
        specs = [e.spec for _, item_entries, _ in planned for e in item_entries]
        tmp = self.path / (name + ".tmp")
        stream = SafetensorsStream(tmp, specs)
        for item, item_entries, _ in planned:
            for entry in item_entries:
                stream.write(entry.spec.name, entry.fill())
            on_item(item)
        digest = stream.close()
        os.replace(tmp, self.path / name)
        record = {"sha256": digest, "keys": [s.name for s in specs], "notes": [n for _, _, n in planned]}
        self._record(name, record)
        return record
