"""Data files -> tokenized, memory-mapped Arrow datasets -> length-grouped, padded batches.

Files are read by Hugging Face `datasets` (JSONL/JSON/CSV/Parquet via its builders, cached as Arrow;
a `save_to_disk` folder memory-mapped as it is) and tokenized with `Dataset.map` into new cached
Arrow tables: no step holds the whole dataset in Python objects. A malformed file is named with the
line (JSONL, JSON, CSV) where it breaks; a record that cannot be encoded with its file and row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidArgumentError, InvalidConfigError, InvalidFolderError, MissingFileError
from .encode import FORMAT_COLUMNS, IGNORE, RecordError, detect_format, encode_record, has_chat_template

logger = logging.getLogger(__name__)
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model",
                   "vocab.json", "merges.txt")  # fmt: skip
ENCODING_VERSION = 1  # bump when encode.py changes what it produces: the map cache is keyed by it
# status of each example after max_length
OK, TRUNCATED, DROPPED_LONG, DROPPED_EMPTY = 0, 1, 2, 3


@dataclass
class Counts:
    """What max_length did to a dataset."""

    examples: int = 0  # records read
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_labels: int = 0  # nothing left to learn after truncation (a prompt longer than max_length)
    kept: int = 0
    tokens: int = 0  # tokens of the kept examples
    packed_rows: int | None = None  # with packing: the rows the kept examples went into


@dataclass
class Split:
    """A tokenized dataset (columns input_ids, labels, length) and its counts."""

    dataset: object  # datasets.Dataset
    counts: Counts = field(default_factory=Counts)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self.dataset.with_format("numpy")["length"], dtype=np.int64)


@contextlib.contextmanager
def quiet_datasets():
    """No progress bars or error logs from `datasets`: we report counts, and a bad file as one line."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _bad_json_line(path: Path) -> str:
    """Where a JSON or JSON-lines file stops parsing: ': line N: why', or ''."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f": line {e.lineno}: {e.msg}"
        return ""
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return f": line {number}: {e.msg}"
            if not isinstance(value, dict):
                return f": line {number}: a JSON object is expected, got {type(value).__name__}"
    return ""


def _load_file(path: Path):
    import datasets

    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise InvalidArgumentError(
            f"data file {path}: unknown type {path.suffix!r}; use .jsonl, .json, .csv, .parquet or a save_to_disk folder"
        )
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001  (datasets wraps the parser's error in its own)
        cause = e.__cause__ or e
        where = _bad_json_line(path) if builder == "json" else ""
        why = (
            where or f": {str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__}"
        )
        raise InvalidArgumentError(f"data file {path} cannot be read{why}") from None


def _load_folder(path: Path):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise InvalidFolderError(f"data folder {path} is not a datasets save_to_disk folder") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise InvalidFolderError(f"data folder {path} has splits {list(loaded)} and no 'train'")
        loaded = loaded["train"]
    return loaded


def load_rows(paths: list[str]):
    """The records of every path, in order, as one `datasets.Dataset`; and each path's (name, rows)."""
    import datasets

    parts, sources = [], []
    with quiet_datasets():
        for name in paths:
            path = Path(name)
            if not path.exists():
                raise MissingFileError(f"data file {path} does not exist")
            part = _load_folder(path) if path.is_dir() else _load_file(path)
            if len(part) == 0:
                raise InvalidArgumentError(f"data file {path} holds no records")
            parts.append(part)
            sources.append((str(path), len(part)))
        columns = [set(p.column_names) for p in parts]
        if any(c != columns[0] for c in columns):
            raise InvalidArgumentError(
                f"data files have different columns: {', '.join(f'{s}: {sorted(c)}' for (s, _), c in zip(sources, columns, strict=True))}"
            )
        rows = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return rows, sources


def where(sources: list[tuple[str, int]], index: int) -> str:
    """'file record N' (1-based) of a global row index."""
    for name, n in sources:
        if index < n:
            return f"{name} record {index + 1}"
        index -= n
    return f"record {index + 1}"


def resolve_format(fmt: str, columns: list[str], paths: list[str]) -> str:
    """The format asked for (its columns checked) or detected from the columns."""
    if fmt == "auto":
        found = detect_format(columns)
        if found is None:
            expected = "; ".join(f"{'/'.join(c)} ({n})" for n, c in FORMAT_COLUMNS.items())
            raise InvalidArgumentError(
                f"{', '.join(paths)}: cannot tell the data format from the columns {sorted(columns)}; "
                f"expected {expected}, or set format"
            )
        return found
    if fmt not in FORMAT_COLUMNS:
        raise InvalidConfigError(f"unknown format {fmt!r}; use auto, {', '.join(FORMAT_COLUMNS)}")
    missing = [c for c in FORMAT_COLUMNS[fmt] if c not in columns]
    if missing:
        raise InvalidArgumentError(
            f"{', '.join(paths)}: format {fmt!r} needs column(s) {missing}, the data has {sorted(columns)}"
        )
    return fmt


def _tokenizer_id(tokenizer) -> str:
    """What identifies a tokenizer for the map cache: its files' bytes when it has a folder."""
    digest = hashlib.sha256(f"{type(tokenizer).__name__}|{len(tokenizer)}|{tokenizer.chat_template}".encode())
    folder = Path(str(getattr(tokenizer, "name_or_path", "")))
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def tokenize(rows, sources, tokenizer, fmt: str, *, max_length: int, overflow: str,
             train_on_inputs: bool, system_prompt: str | None) -> Split:  # fmt: skip
    """Encode every record (`Dataset.map`, cached as Arrow), apply max_length, count what it did."""

    def encode(record: dict, index: int) -> dict:
        try:
            ids, labels = encode_record(tokenizer, record, fmt, train_on_inputs, system_prompt)
        except RecordError as e:
            raise RecordError(f"{where(sources, index)}: {e}") from None
        status = OK
        if len(ids) > max_length:
            if overflow == "drop":
                status = DROPPED_LONG
            else:
                ids, labels, status = ids[:max_length], labels[:max_length], TRUNCATED
        if status != DROPPED_LONG and all(t == IGNORE for t in labels[1:]):
            status = DROPPED_EMPTY
        return {"input_ids": ids, "labels": labels, "length": len(ids), "status": status}

    key = json.dumps([rows._fingerprint, fmt, max_length, overflow, train_on_inputs, system_prompt,
                      _tokenizer_id(tokenizer), ENCODING_VERSION])  # fmt: skip
    with quiet_datasets():
        encoded = rows.map(
            encode,
            with_indices=True,
            remove_columns=rows.column_names,
            new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
        )
        status = np.asarray(encoded.with_format("numpy")["status"])
        lengths = np.asarray(encoded.with_format("numpy")["length"])
        kept = encoded.filter(lambda s: s <= TRUNCATED, input_columns="status").remove_columns("status")
    by = np.bincount(status, minlength=4)
    counts = Counts(
        examples=len(rows), truncated=int(by[TRUNCATED]), dropped_too_long=int(by[DROPPED_LONG]),
        dropped_no_labels=int(by[DROPPED_EMPTY]), kept=len(kept), tokens=int(lengths[status <= TRUNCATED].sum()),
    )  # fmt: skip
    return Split(kept, counts)


def prepare(paths: list[str], tokenizer, cfg, fmt: str | None = None) -> tuple[Split, str]:
    """Load and tokenize `paths` as `cfg` (a TrainConfig) says; returns the split and the format used."""
    rows, sources = load_rows(paths)
    fmt = resolve_format(fmt or cfg.format, rows.column_names, paths)
    if fmt == "chat" and not has_chat_template(tokenizer):
        raise InvalidFolderError(
            f"model folder {cfg.model}: its tokenizer has no chat template, which the chat format needs "
            "(use format: completion or text, or a tokenizer with a chat_template)"
        )
    split = tokenize(rows, sources, tokenizer, fmt, max_length=cfg.max_length, overflow=cfg.overflow,
                     train_on_inputs=cfg.train_on_inputs, system_prompt=cfg.system_prompt)  # fmt: skip
    if len(split) == 0:
        raise InvalidArgumentError(
            f"{', '.join(paths)}: no example left after max_length={cfg.max_length} ({cfg.overflow}): "
            f"{split.counts.dropped_too_long} too long, {split.counts.dropped_no_labels} without answer tokens"
        )
    return split, fmt


def hold_out(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(train, eval): `fraction` of the examples held out, chosen with `seed`."""
    n_eval = max(1, round(len(split) * fraction))
    if n_eval >= len(split):
        raise InvalidArgumentError(f"eval_split={fraction} leaves no training example of {len(split)}")
    with quiet_datasets():
        parts = split.dataset.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return Split(parts["train"], split.counts), Split(parts["test"], Counts(kept=n_eval))


# ---- batches ------------------------------------------------------------------------------------


def epoch_order(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[int]:
    """The examples' order in `epoch`: a permutation drawn from (seed, epoch) alone, so a resumed run
    draws the same one; grouped by length as transformers' `group_by_length` does (random
    mega-batches of 50 batches, at most a quarter of the data, each sorted longest first)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if group_by_length:
        return list(get_length_grouped_indices(lengths.tolist(), batch_size, generator=generator))
    return torch.randperm(len(lengths), generator=generator).tolist()


def micro_batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(rows: dict, pad_id: int) -> dict:
    """Right-pad a batch (`Dataset[indices]`: lists per column) to its longest example.

    Packed rows (with `position_ids`) get no attention_mask, so that transformers masks attention
    by where the positions restart (`pack.py`); their padding continues as one more segment of its
    own (positions 0, 1, ...), attended by nothing real, with IGNORE labels.
    """
    ids, labels = rows["input_ids"], rows["labels"]
    n, length = len(ids), max(len(x) for x in ids)
    batch = {
        "input_ids": torch.full((n, length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((n, length), dtype=torch.long),
        "labels": torch.full((n, length), IGNORE, dtype=torch.long),
    }
    for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
        batch["input_ids"][i, : len(x)] = torch.tensor(x)
        batch["labels"][i, : len(y)] = torch.tensor(y)
        batch["attention_mask"][i, : len(x)] = 1
    if "position_ids" in rows:
        del batch["attention_mask"]
        positions = torch.arange(length).repeat(n, 1)  # the padding's own segment after each row
        for i, pos in enumerate(rows["position_ids"]):
            positions[i, : len(pos)] = torch.tensor(pos)
            positions[i, len(pos) :] -= len(pos)
        batch["position_ids"] = positions
        batch["use_cache"] = False  # transformers looks for packed rows only when there is no KV cache
    return batch


def eval_batches(split: Split, batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """The whole split, sorted by length (little padding), `batch_size` at a time."""
    order = np.argsort(split.lengths, kind="stable").tolist()
    for chunk in micro_batches(order, batch_size):
        yield collate(split.dataset[chunk], pad_id)
