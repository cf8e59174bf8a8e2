"""`TrainConfig`: every field of `qlora-compile train`, from a YAML file, `--key value` overrides, or both.

A YAML config is a mapping of these fields; the `QLoRAConfig` fields sit under `qlora:` (`qlora.r`
on the command line). Values given on the command line are read as YAML scalars (`--qlora.r 8` is
an int, `--train_on_inputs true` a bool, `--data [a.jsonl, b.jsonl]` a list). A key that is not a
field is refused with the closest field named.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..config import QLoRAConfig
from ..dtypes import FLOAT_DTYPES, dtype_name, parse_dtype
from ..errors import InvalidArgumentError, InvalidConfigError, MissingFileError

FORMATS = ("auto", "chat", "instruction", "completion", "text")
SCHEDULES = ("constant", "linear", "cosine")
OVERFLOW = ("truncate", "drop")
EXPORTS = ("none", "merged", "nf4")
# Fields a resumed run may change: they decide what is written and how often, not what is computed.
RESUMABLE_CHANGES = ("output_dir", "save_every", "save_total_limit", "log_every", "export", "tensorboard",
                     "device")  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """What `qlora-compile train` runs. Every field is a YAML key and a `--key value` option.

    Attributes:
        model: a 16-bit Hugging Face model folder, or a bitsandbytes 4-bit folder (used as stored).
        data: training data: a .jsonl/.json/.csv/.parquet file, a `save_to_disk` folder, or a list.
        format: "auto" (from the columns), "chat", "instruction", "completion" or "text".
        eval_data: held-out data (same kinds as `data`); or `eval_split` of the training data.
        eval_split: fraction of `data` held out for evaluation when `eval_data` is not given.
        system_prompt: a system message put first in chat-template renderings of instruction and
            completion records (chat records bring their own).
        max_length: tokens per example at most; `overflow` says what happens to longer ones.
        overflow: "truncate" (keep the first max_length tokens) or "drop" (leave the example out).
        train_on_inputs: loss on every token; default: on the answers only (-100 on prompts).
        batch_size: examples per micro-batch (padded to the batch's longest).
        grad_accum: micro-batches per optimizer step; the loss is averaged over their tokens.
        group_by_length: batch examples of similar length (shuffled mega-batches, sorted inside).
        packing: concatenate examples into rows of up to max_length tokens, attention kept inside
            each example (see `pack.py` for which models).
        schedule: learning-rate schedule after warmup: "constant" (QLoRA's), "linear" or "cosine".
        warmup_steps: linear warmup steps; 0: `warmup_ratio` of the total steps.
        warmup_ratio: warmup as a fraction of the total steps (rounded up).
        max_steps: optimizer steps to run; 0: `epochs` passes over the data.
        epochs: passes over the training data when max_steps is 0.
        eval_every: evaluate (loss and perplexity) every N steps; 0: only before and after.
        seed: seeds Python, NumPy and torch (LoRA initialization, dropout, data order).
        output_dir: where metrics, checkpoints, the adapter, plots and the report go.
        save_every: write a checkpoint every N steps (0: only when stopped by a signal).
        save_total_limit: checkpoints kept (the oldest are removed); 0: all.
        log_every: one metrics line every N steps (the mean loss over them).
        dtype: dtype of the dense weights when loading a 16-bit model folder.
        device: where to train: "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:N".
        export: after training, "merged" (16-bit folder) or "nf4" (4-bit folder) with the adapter merged.
        tensorboard: also log to TensorBoard (needs the `tensorboard` package).
        qlora: every `QLoRAConfig` field (rank, dropout, lr, optimizer, backend...).
    """

    model: str = ""
    data: str | list[str] = ""
    format: str = "auto"
    eval_data: str | list[str] | None = None
    eval_split: float = 0.0
    system_prompt: str | None = None
    max_length: int = 1024
    overflow: str = "truncate"
    train_on_inputs: bool = False
    batch_size: int = 4
    grad_accum: int = 1
    group_by_length: bool = True
    packing: bool = False
    schedule: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.03
    max_steps: int = 0
    epochs: int = 1
    eval_every: int = 0
    seed: int = 0
    output_dir: str = "train_out"
    save_every: int = 0
    save_total_limit: int = 0
    log_every: int = 1
    dtype: str = "bfloat16"
    device: str = "auto"
    export: str = "none"
    tensorboard: bool = False
    qlora: QLoRAConfig = field(default_factory=QLoRAConfig)

    def __post_init__(self) -> None:
        _check_types(self)
        if not self.model:
            raise InvalidConfigError("model is required: a Hugging Face model folder")
        if not self.data:
            raise InvalidConfigError("data is required: a data file, a save_to_disk folder, or a list")
        for name, allowed in (("format", FORMATS), ("overflow", OVERFLOW), ("schedule", SCHEDULES),
                              ("export", EXPORTS), ("dtype", tuple(FLOAT_DTYPES))):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise InvalidConfigError(
                    f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}"
                )
        for name in ("max_length", "batch_size", "grad_accum", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise InvalidConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "max_steps", "eval_every", "save_every", "save_total_limit"):
            if getattr(self, name) < 0:
                raise InvalidConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.eval_split < 1.0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise InvalidConfigError("eval_split and warmup_ratio must be fractions in [0, 1)")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise InvalidConfigError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.eval_data and self.eval_split:
            raise InvalidConfigError("give eval_data or eval_split, not both")
        if self.grad_accum > 1 and self.qlora.step_in_backward:
            raise InvalidConfigError(
                "qlora.step_in_backward steps inside every backward: it cannot accumulate gradients (grad_accum > 1)"
            )
        _check_export(self.export, self.qlora.quant_type)

    @property
    def data_files(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data)

    @property
    def eval_files(self) -> list[str]:
        if not self.eval_data:
            return []
        return [self.eval_data] if isinstance(self.eval_data, str) else list(self.eval_data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: `compute_dtype` as its name, a filter function as its repr."""
        out = asdict(self)
        out["qlora"] = {k: _plain(v) for k, v in out["qlora"].items()}
        return out

    def identity(self) -> dict[str, Any]:
        """The fields that decide what training computes (a resume must match them): data paths
        made absolute; the model not by its path but by its files (`checkpoints.model_identity`)."""
        out = {k: v for k, v in self.to_dict().items() if k not in (*RESUMABLE_CHANGES, "model")}
        out["data"] = [str(Path(p).resolve()) for p in self.data_files]
        out["eval_data"] = [str(Path(p).resolve()) for p in self.eval_files]
        return out


def _check_export(export: str, quant_type: str) -> None:
    """Refused before training: exports that cannot hold what the run trained. Both exports merge
    the adapter onto the base quantized with the run's quant_type: a 16-bit LoRA run has no 4-bit
    base to merge onto, and bitsandbytes' format (nf4 export) has no Int4."""
    if export != "none" and quant_type == "none":
        raise InvalidConfigError(
            f"export {export} merges onto a 4-bit base; a 16-bit LoRA run (qlora.quant_type none) is not "
            "exported: use export none and merge the adapter with PEFT (merge_and_unload)"
        )
    if export == "nf4" and quant_type == "int4":
        raise InvalidConfigError(
            "export nf4 writes bitsandbytes' format, which has no Int4: use export merged"
        )


def _plain(value):
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if callable(value):
        return repr(value)
    return list(value) if isinstance(value, tuple) else value


# ---- types --------------------------------------------------------------------------------------

_INT, _FLOAT, _BOOL, _STR = "int", "float", "bool", "str"
# What each annotation accepts; YAML gives ints for floats ("lr: 1"), which are fine.
_KINDS = {"int": _INT, "float": _FLOAT, "bool": _BOOL, "str": _STR, "str | None": _STR + "?",
          "str | list[str]": "paths", "str | list[str] | None": "paths?"}  # fmt: skip


def _check_types(cfg: TrainConfig) -> None:
    for f in fields(cfg):
        kind = _KINDS.get(str(f.type))
        if kind is None:
            continue
        value = getattr(cfg, f.name)
        if kind.endswith("?"):
            if value is None:
                continue
            kind = kind[:-1]
        if not _is_kind(value, kind):
            want = {"paths": "a path or a list of paths", _INT: "an int"}.get(kind, f"a {kind}")
            raise InvalidConfigError(f"{f.name} must be {want}, got {value!r}")
        if kind == _FLOAT:
            object.__setattr__(cfg, f.name, float(value))


def _is_kind(value, kind: str) -> bool:
    if kind == "paths":
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    if kind == _FLOAT:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {_BOOL: bool, _STR: str}[kind])


# ---- building one from YAML and overrides -------------------------------------------------------


def field_names() -> list[str]:
    """Every settable key: the TrainConfig fields and `qlora.<QLoRAConfig field>`."""
    top = [f.name for f in fields(TrainConfig) if f.name != "qlora"]
    return top + [f"qlora.{f.name}" for f in fields(QLoRAConfig)]


def closest(key: str) -> str:
    """' (did you mean X?)' for an unknown key, or ''."""
    names = field_names()
    tail = [n for n in names if n.rpartition(".")[2] == key.rpartition(".")[2]]
    near = tail or difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else ""


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--qlora.r", "8", "--seed=3"]` -> {"qlora.r": 8, "seed": 3}; values as YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise InvalidArgumentError(f"expected --key value, got {arg!r}")
        key, eq, text = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise InvalidArgumentError(f"--{key} needs a value")
            text, i = args[i + 1], i + 1
        key = key.replace("-", "_")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            out[key] = text  # not YAML: the text as given
        i += 1
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a flat {dotted key: value} mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InvalidConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise InvalidConfigError(f"{path}: a YAML mapping of config fields is expected")
    flat = {}
    for key, value in data.items():
        if key == "qlora" and isinstance(value, dict):
            flat.update({f"qlora.{k}": v for k, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def _float_fields() -> set[str]:
    top = {f.name for f in fields(TrainConfig) if "float" in str(f.type)}
    return top | {f"qlora.{f.name}" for f in fields(QLoRAConfig) if "float" in str(f.type)}


def _number(key: str, value):
    """PyYAML reads `1e-3` (no dot) as text: a float field takes it as the number it spells."""
    if isinstance(value, str) and key in _float_fields():
        try:
            return float(value)
        except ValueError:
            raise InvalidConfigError(f"{key} must be a number, got {value!r}") from None
    return value


def build_config(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from flat dotted keys (YAML, then overrides on top)."""
    known = set(field_names())
    for key in values:
        if key not in known:
            raise InvalidConfigError(f"unknown config key {key!r}{closest(key)}")
    values = {k: _number(k, v) for k, v in values.items()}
    top = {k: v for k, v in values.items() if not k.startswith("qlora.")}
    qlora = {k.removeprefix("qlora."): v for k, v in values.items() if k.startswith("qlora.")}
    for name in ("compute_dtype", "lora_compute_dtype"):
        if qlora.get(name) is not None:
            qlora[name] = parse_dtype(qlora[name], f"qlora.{name}")
    try:
        top["qlora"] = QLoRAConfig(**qlora)
    except TypeError as e:  # a value of the wrong kind deep inside QLoRAConfig's checks
        raise InvalidConfigError(f"qlora: {e}") from None
    return TrainConfig(**top)


def load_config(path: str | Path | None, overrides: list[str] | dict[str, Any] = ()) -> TrainConfig:
    """The YAML file at `path` (if any) with the overrides on top."""
    values = read_yaml(path) if path is not None else {}
    extra = parse_overrides(list(overrides)) if isinstance(overrides, list | tuple) else dict(overrides)
    return build_config({**values, **extra})
