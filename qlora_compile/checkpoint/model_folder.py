"""`ModelFolder`: a Hugging Face model folder on disk, the one reader of such folders.

Its safetensors files (one `model.safetensors`, or the shards an index names), their headers,
`config.json`, the bitsandbytes 4-bit groups (each quantized module's `<module>.weight*` entries,
found by their quant-state key), and its tensors read one at a time (whole, or in slices of rows
or columns). `convert_checkpoint`, `load_quantized` and the exports (`export/base.py`) read folders
through it; the model skeleton a folder belongs to is `skeleton.py`, its MoE expert tensors
`expert_layout.py`.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..codes import BNB_QUANT_TYPES
from ..errors import InvalidFolderError
from ..format import QUANT_STATE
from .output_folder import INDEX, WEIGHTS
from .safetensors_file import DTYPES, SafetensorsError, TensorInfo, read_header

# what `copy_extras` leaves out: weights (ours and other formats) and their indexes
_WEIGHT_FILE = re.compile(
    r".*\.(safetensors|bin|pt|pth|h5|msgpack|ckpt|gguf)$|.*\.(safetensors|bin)\.index\.json$"
)


class ConversionError(InvalidFolderError):
    """Bad input: a model folder that cannot be read or converted (the CLI prints it on one line
    and exits with code 2)."""


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of the model folder `path`, in the index's order."""
    if not path.exists():
        raise ConversionError(f"{path}: no such folder")
    if not path.is_dir():
        raise ConversionError(f"{path}: not a folder (expected a Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path}: not a Hugging Face model folder (no config.json)")
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{path / INDEX}: corrupt index ({e})") from None
        files = list(dict.fromkeys(weight_map.values()))
        for name in files:
            if not (path / name).is_file():
                raise ConversionError(f"{path}: shard {name} named by {INDEX} is missing")
        return [path / name for name in files]
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    raise ConversionError(f"{path}: no {WEIGHTS} or {INDEX} (only safetensors checkpoints are read)")


class ModelFolder:
    """A Hugging Face model folder (16-bit or bitsandbytes 4-bit), read lazily.

    Attributes:
        path: the folder.
        files: its safetensors files.
        config_dict: config.json as stored.

    Raises:
        ConversionError: not a folder, no config.json, no safetensors weights, a shard missing.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = weight_files(self.path)
        try:
            self.config_dict = json.loads((self.path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(
                f"{self.path}: not a Hugging Face model folder: config.json cannot be read ({e})"
            ) from None

    @functools.cached_property
    def infos(self) -> dict[str, TensorInfo]:
        """Every tensor by name, from the headers, in file order (a truncated file raises here)."""
        out = {}
        for f in self.files:
            try:
                out.update({i.name: i for i in read_header(f)})
            except SafetensorsError as e:
                raise ConversionError(str(e)) from None
        return out

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self.infos.items()}

    def config(self):
        """The transformers config (a fresh object each call)."""
        import transformers

        try:
            return transformers.AutoConfig.from_pretrained(str(self.path))
        except Exception as e:  # noqa: BLE001  (transformers raises many kinds for a bad config.json)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConversionError(
                f"{self.path}: not a Hugging Face model folder: config.json cannot be read ({first})"
            ) from None

    @property
    def quantization(self) -> dict | None:
        """config.json's quantization_config, or None."""
        return self.config_dict.get("quantization_config")

    def check_bnb_4bit(self) -> dict:
        """The quantization_config of a bitsandbytes 4-bit folder; ConversionError for anything else."""
        qc = self.quantization or {}
        if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
            raise ConversionError(
                f"{self.path}: not a bitsandbytes 4-bit checkpoint (config.json quantization_config: {qc or None})"
            )
        return qc

    def bnb_groups(self, keys=None) -> dict[str, list[str]]:
        """{module: its stored 4-bit entries (`<module>.weight`, `.weight.absmax`, ...)} of every module
        with a bitsandbytes quant state among `keys` (default: the folder's tensors)."""
        keys = list(self.infos) if keys is None else list(keys)
        split = [k.partition(".weight" + QUANT_STATE) for k in keys]
        groups = {
            module: [] for module, state, quant_type in split if state and quant_type in BNB_QUANT_TYPES
        }
        for key in keys:
            prefix = key.rsplit(".weight", 1)[0]
            if prefix in groups and (key == f"{prefix}.weight" or key.startswith(f"{prefix}.weight.")):
                groups[prefix].append(key)
        return groups

    def tensor(self, key: str) -> torch.Tensor:
        """Tensor `key`, whole."""
        return read(self.infos[key])

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, in file order (one handle per file)."""
        from safetensors import SafetensorError, safe_open

        tensors = {}
        for path in self.files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open objects are not iterable)
                        tensors[key] = f.get_tensor(key)
            except SafetensorError as e:
                raise ConversionError(f"{path}: cannot read ({e})") from None
        return tensors

    def read_meta(self, real: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor of its shape and dtype (from the headers, nothing read),
        except those `real(key)` picks, read whole."""
        return {
            key: read(info) if real(key) else torch.empty(info.shape, dtype=DTYPES[info.dtype], device="meta")
            for key, info in self.infos.items()
        }

    def copy_extras(self, dst: Path) -> None:
        """Tokenizer files, generation_config.json and other small files into `dst` (no weights, no
        config.json, no hidden files)."""
        for path in sorted(self.path.iterdir()):
            if path.name.startswith(".") or path.name == "config.json" or _WEIGHT_FILE.match(path.name):
                continue
            if path.is_dir():
                shutil.copytree(
                    path,
                    dst / path.name,
                    ignore=lambda d, names: [n for n in names if _WEIGHT_FILE.match(n) or n.startswith(".")],
                )
            elif path.is_file():
                shutil.copy2(path, dst / path.name)


def read(info: TensorInfo, start: int | None = None, stop: int | None = None, columns: bool = False):
    """Rows (or columns) [start, stop) of a tensor, the whole tensor when `start` is None.

    Each call maps the file and unmaps it on return: the pages read would otherwise stay in the
    process's resident set until the handle closes (a whole tensor's worth per tensor).
    """
    from safetensors import safe_open

    with safe_open(str(info.file), framework="pt") as f:
        if start is None:
            return f.get_tensor(info.name)
        sl = f.get_slice(info.name)
        return sl[:, start:stop] if columns else sl[start:stop]
