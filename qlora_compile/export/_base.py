"""Reading a base model folder and a LoRA adapter for export, tensor by tensor; writing outputs.

A base folder is either a 16-bit Hugging Face folder (each target linear is quantized here exactly
as `qlora_compile.compile` quantizes it) or a bitsandbytes 4-bit folder (config.json carries
`quantization_config`; each quantized linear is a group of `<module>.weight*` entries, rebuilt with
`QuantizedWeight.from_bnb`). Tensors are read one at a time through `safetensors.safe_open`.

Modules an adapter trains in full (`modules_to_save`) stay dense in every export, with the
adapter's tensors in place of the base's: a 16-bit base does not quantize them; a bitsandbytes
base's 4-bit entries for them are dropped, the adapter giving their dense weight.

MoE expert weights (`checkpoint/_experts.py`) are read one expert at a time too: from the
per-expert (or 3-D) tensors of a 16-bit folder, quantized as `compile` does, or from our 4-bit
layout (`<experts module>.<e>.<param>.weight*`, what `convert_checkpoint` writes).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..adapters import AdapterFolder
from ..checkpoint._experts import ExpertWeight, expert_weights, quantized_experts, save_layout
from ..checkpoint._model import linear_kinds, model_class
from ..codes import BLOCKSIZES, QUANT_TYPES
from ..dtypes import FLOAT_DTYPES
from ..errors import InvalidArgumentError, InvalidFolderError, MissingFileError
from ..format import QuantizedWeight, quantize_weight
from ..pipeline import inside

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_DTYPES = FLOAT_DTYPES
_STATE_KEY = re.compile(r"^(.*)\.weight\.quant_state\.bitsandbytes__(nf4|fp4)$")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """None / "auto" (keep each tensor's dtype) or one of float32, float16, bfloat16."""
    if name is None or name == "auto" or isinstance(name, torch.dtype):
        return None if name == "auto" else name
    if name not in _DTYPES:
        raise InvalidArgumentError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class QuantOptions:
    """How a 16-bit base is quantized (ignored for a bitsandbytes base, which carries its own)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise InvalidArgumentError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise InvalidArgumentError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")


def empty_model(config, device: str = "meta"):
    """The model with uninitialized weights (on `device`: "meta" allocates nothing)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    cls = model_class(config)
    with no_init_weights(), torch.device(device):
        model = cls(config)
    return model.eval()


class BaseModel:
    """A base model folder: its config, its tensors by name, and which linears are quantized.

    Args:
        directory: a 16-bit HF folder or a bitsandbytes 4-bit folder (safetensors only).
        options: quantization of a 16-bit base's target linears (compile's defaults).
        modules_to_save: modules kept dense (their weights come from an adapter), as compile's
            `modules_to_save`; None: compile's default (the task head of a classifier).
    """

    def __init__(
        self,
        directory: str | Path,
        options: QuantOptions | None = None,
        modules_to_save: list[str] | None = None,
    ):
        import transformers

        self.dir = Path(directory)
        self.options = options or QuantOptions()
        self.modules_to_save = modules_to_save
        if not (self.dir / "config.json").exists():
            raise MissingFileError(f"{self.dir / 'config.json'} does not exist (not a model folder)")
        self.config_dict = json.loads((self.dir / "config.json").read_text())
        qc = self.config_dict.get("quantization_config")
        self.bnb = qc is not None
        if self.bnb and not (qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit")):
            raise InvalidFolderError(
                f"{self.dir}: only bitsandbytes 4-bit quantized folders are supported, got {qc}"
            )
        self.config = transformers.AutoConfig.from_pretrained(self.dir)
        if hasattr(self.config, "quantization_config"):
            del self.config.quantization_config
        self.files = self._weight_files()
        self._where: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for f in self.files:
            with safe_open(str(f), "pt") as st:
                for k in st.keys():  # noqa: SIM118 (safe_open objects are not iterable)
                    self._where[k] = f
                    shapes[k] = tuple(st.get_slice(k).get_shape())
        self.skeleton = empty_model(self.config)
        self.quantized = self._find_quantized()  # module name -> its weight keys (bnb base)
        self.expert_groups: dict[str, list[str]] = {}  # bnb base: one expert's 4-bit prefix -> its keys
        self.experts = self._find_experts(shapes)  # "<module>.<param>" -> ExpertWeight
        self.linears, self.conv1d, self.head = self._linear_modules()
        # 4-bit entries of modules trained in full: dropped, `<module>.weight` then comes dense from the adapter
        self.dequantized = {m: keys for m, keys in self.quantized.items() if inside(m, self.saved)}
        self.quantized = {m: keys for m, keys in self.quantized.items() if m not in self.dequantized}
        if not self.bnb:
            missing = [m for m in self.linears if f"{m}.weight" not in self._where]
            if missing:
                raise InvalidFolderError(f"{self.dir}: no weight for module(s) {missing[:5]}")
            self.quantized = {m: [f"{m}.weight"] for m in self.linears}

    def _weight_files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [self.dir / f for f in dict.fromkeys(weight_map.values())]
        single = self.dir / "model.safetensors"
        if single.exists():
            return [single]
        raise MissingFileError(f"{self.dir}: no {' or '.join(_WEIGHT_FILES)} (only safetensors are read)")

    def _find_quantized(self) -> dict[str, list[str]]:
        if not self.bnb:
            return {}
        groups: dict[str, list[str]] = {}
        for key in self._where:
            m = _STATE_KEY.match(key)
            if m:
                groups[m.group(1)] = []
        for key in self._where:
            prefix = key.rsplit(".weight", 1)[0]
            if prefix in groups and (key == f"{prefix}.weight" or key.startswith(f"{prefix}.weight.")):
                groups[prefix].append(key)
        if not groups:
            raise InvalidFolderError(
                f"{self.dir}: config.json has quantization_config but no 4-bit weights were found"
            )
        return groups

    def _find_experts(self, shapes: dict) -> dict[str, ExpertWeight]:
        from ..config import QLoRAConfig
        from ..experts import is_experts
        from ..pipeline import select_targets

        found = quantized_experts(self.skeleton, list(self.quantized)) if self.bnb else {}
        for _, by_expert in found.values():
            self.expert_groups.update({p: self.quantized.pop(p) for p in by_expert.values()})
        self.quantized_experts = {name: by_expert for name, (_, by_expert) in found.items()}
        experts = {name: weight for name, (weight, _) in found.items()}
        # dense experts (a 16-bit base; transformers + bitsandbytes leaves them dense): compile quantizes them
        selected = {n for n, m in select_targets(self.skeleton, QLoRAConfig()) if is_experts(m)}
        grouped = {k for keys in self.expert_groups.values() for k in keys}
        dense = expert_weights(self.skeleton, [k for k in self._where if k not in grouped], shapes)
        experts.update({n: w for n, w in dense.items() if w.module in selected and n not in experts})
        return experts

    def _linear_modules(self) -> tuple[list[str], set[str], set[str]]:
        """(linears compile() would quantize, which of the model's linears are Conv1D, output head names)."""
        from ..config import QLoRAConfig
        from ..experts import is_experts
        from ..pipeline import _output_head, saved_modules, select_targets

        model = self.skeleton
        config = QLoRAConfig(modules_to_save=self.modules_to_save)
        # a bitsandbytes base without an adapter stays as its file has it (no dense weights for a 4-bit head)
        self.saved = [] if self.bnb and self.modules_to_save is None else saved_modules(model, config)
        head = _output_head(model)
        heads = {n for n, m in model.named_modules() if m is head and head is not None}
        kinds = linear_kinds()
        conv1d = {
            n for n, m in model.named_modules() if isinstance(m, kinds) and not isinstance(m, torch.nn.Linear)
        }
        self.all_linears = [n for n, m in model.named_modules() if isinstance(m, kinds)]
        if self.bnb:
            return list(self.quantized), conv1d, heads
        return [n for n, m in select_targets(model, config) if not is_experts(m)], conv1d, heads

    def keys(self) -> list[str]:
        return list(self._where)

    def tensor(self, key: str) -> torch.Tensor:
        with safe_open(str(self._where[key]), "pt") as st:
            return st.get_tensor(key)

    def raw_entries(self, module: str) -> dict[str, torch.Tensor]:
        """A bnb base's stored entries of one quantized module (or one expert's 4-bit prefix), as read."""
        keys = self.quantized[module] if module in self.quantized else self.expert_groups[module]
        return {k: self.tensor(k) for k in keys}

    def expert_weight(self, name: str, expert: int) -> QuantizedWeight:
        """Expert `expert`'s 4-bit (out_features, in_features) matrix of the expert weight `name`."""
        weight = self.experts[name]
        if name in self.quantized_experts:
            prefix = self.quantized_experts[name][expert]
            return QuantizedWeight.from_bnb(self.raw_entries(prefix), prefix)
        matrix = weight.matrix(expert, lambda k, e: self.tensor(k) if e is None else self._slice(k, e))
        o = self.options
        return quantize_weight(
            matrix, quant_type=o.quant_type, blocksize=o.blocksize, double_quant=o.double_quant
        )

    def _slice(self, key: str, index: int) -> torch.Tensor:
        with safe_open(str(self._where[key]), "pt") as st:
            return st.get_slice(key)[index]

    def save_layout(self, name: str) -> ExpertWeight:
        """The keys a 16-bit folder holds `name` under: this base's own (dense), else transformers'."""
        weight = self.experts[name]
        return save_layout(self.skeleton, weight) if name in self.quantized_experts else weight

    def expert_lora_prefixes(self) -> set[str]:
        """Every PEFT key prefix LoRA on the base's expert weights could have (`<module>`,
        `<module>.base_layer`, ...: one more `.base_layer` per other wrapped parameter)."""
        params = [w.module for w in self.experts.values()]
        return {m + ".base_layer" * d for m in set(params) for d in range(params.count(m))}

    def quantized_weight(self, module: str) -> QuantizedWeight:
        """The 4-bit weight of a target linear, in (out_features, in_features) layout."""
        if self.bnb:
            return QuantizedWeight.from_bnb(self.raw_entries(module), module)
        w = self.tensor(f"{module}.weight")
        if module in self.conv1d:
            w = w.t()
        o = self.options
        return quantize_weight(w, quant_type=o.quant_type, blocksize=o.blocksize, double_quant=o.double_quant)

    def items(self) -> Iterator[tuple[str, str]]:
        """("quantized", module), ("experts", "<module>.<param>") or ("dense", key), in the files'
        order, each quantized module and expert weight once; a dropped 4-bit module of
        `modules_to_save` as ("dense", "<module>.weight")."""
        owner = {k: ("quantized", m) for m, keys in self.quantized.items() for k in keys}
        for name, weight in self.experts.items():
            if name in self.quantized_experts:
                keys = [k for p in self.quantized_experts[name].values() for k in self.expert_groups[p]]
            else:
                keys = weight.source_keys()
            owner.update(dict.fromkeys(keys, ("experts", name)))
        dropped = {k for m, keys in self.dequantized.items() for k in keys if k != f"{m}.weight"}
        seen = set()
        for key in self._where:
            if key in dropped:
                continue
            item = owner.get(key, ("dense", key))
            if item not in seen:
                seen.add(item)
                yield item


def check_fits(adapter: AdapterFolder, base: BaseModel) -> None:
    """Every adapter module is a linear of the base (4-bit, or kept dense), with matching shapes; its
    expert LoRA (`target_parameters`) is where PEFT puts it for the base's expert weights, with their
    shapes; every tensor of a module trained in full replaces a base tensor of its shape (a dropped
    4-bit weight's: (out, in))."""
    problems = adapter.shape_problems(lambda m: _out_in(base, m), unknown="{} is not a linear of the base")
    problems += adapter.expert_problems(base.skeleton, base.experts)
    saved = adapter.saved_tensors()
    problems += [
        f"missing {m}.weight (modules_to_save, 4-bit in the base)"
        for m in base.dequantized
        if f"{m}.weight" not in saved
    ]
    for key, t in saved.items():
        module = key.removesuffix(".weight")
        if module in base.dequantized:
            shape = _out_in(base, module)
        elif key in base._where:
            with safe_open(str(base._where[key]), "pt") as st:
                shape = tuple(st.get_slice(key).get_shape())
        else:
            problems.append(f"{key} (modules_to_save) is not a tensor of the base")
            continue
        if tuple(t.shape) != tuple(shape):
            problems.append(f"{key} (modules_to_save): shape {tuple(t.shape)} != the base's {tuple(shape)}")
    if problems:
        raise InvalidFolderError(
            f"adapter {adapter.dir} does not fit base {base.dir}: " + "; ".join(problems[:10])
        )


def dense_tensor(base: BaseModel, adapter: AdapterFolder | None, key: str) -> torch.Tensor:
    """A dense entry of the output: the adapter's for a module trained in full (modules_to_save);
    the weight of a linear kept dense with LoRA on it, merged (`W + scaling * B @ A`, in fp32,
    back to W's dtype); else the base's."""
    saved = adapter.saved_tensors() if adapter is not None else {}
    if key in saved:
        return saved[key]
    w = base.tensor(key)
    module = key.removesuffix(".weight")
    if adapter is None or not key.endswith(".weight") or module not in adapter.pairs:
        return w
    delta = adapter.delta(module)
    return (w.float() + (delta.t() if module in base.conv1d else delta)).to(w.dtype)


def _out_in(base: BaseModel, module: str) -> tuple[int, int] | None:
    """(out, in) of a linear's weight, 4-bit or dense; None if `module` is not a linear of the base."""
    if module not in base.quantized and module not in base.dequantized:
        if module not in base.all_linears or f"{module}.weight" not in base._where:
            return None
        with safe_open(str(base._where[f"{module}.weight"]), "pt") as st:
            shape = tuple(st.get_slice(f"{module}.weight").get_shape())
        return shape[::-1] if module in base.conv1d else shape
    if base.bnb:
        keys = base.quantized.get(module) or base.dequantized[module]
        state_key = next(k for k in keys if ".quant_state." in k)
        shape = json.loads(bytes(base.tensor(state_key).tolist()).decode())["shape"]
        return tuple(shape)
    with safe_open(str(base._where[f"{module}.weight"]), "pt") as st:
        shape = tuple(st.get_slice(f"{module}.weight").get_shape())
    return shape[::-1] if module in base.conv1d else shape


@contextlib.contextmanager
def output_folder(out: str | Path) -> Iterator[Path]:
    """A fresh `<out>.partial` folder to write into, renamed to `out` when the block succeeds."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    partial.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def copy_side_files(base: BaseModel, out: Path) -> None:
    """Tokenizer, generation config and other small files; not the weights, not config.json."""
    from ..checkpoint.convert import copy_extras

    copy_extras(base.dir, out)
