"""The base model of an export: a `ModelFolder` seen as `compile` would train on it, read tensor by tensor.

A base folder is either a 16-bit Hugging Face folder (each target linear is quantized here exactly
as `qlora_compile.compile` quantizes it) or a bitsandbytes 4-bit folder (config.json carries
`quantization_config`; each quantized linear is a group of `<module>.weight*` entries, rebuilt with
`QuantizedWeight.from_bnb`). Tensors are read one at a time (`ModelFolder`); the adapter is read by
`AdapterFolder` and the output written by `OutputFolder`.

Modules an adapter trains in full (`modules_to_save`) stay dense in every export, with the
adapter's tensors in place of the base's: a 16-bit base does not quantize them; a bitsandbytes
base's 4-bit entries for them are dropped, the adapter giving their dense weight.

MoE expert weights (`checkpoint/expert_layout.py`) are read one expert at a time too: from the
per-expert (or 3-D) tensors of a 16-bit folder, quantized as `compile` does, or from our 4-bit
layout (`<experts module>.<e>.<param>.weight*`, what `convert_checkpoint` writes).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import AdapterFolder
from ..checkpoint import model_folder
from ..checkpoint.expert_layout import ExpertWeight, expert_weights, quantized_experts, save_layout
from ..checkpoint.model_folder import ModelFolder
from ..checkpoint.output_folder import Entry, OutputFolder, Written
from ..checkpoint.safetensors_file import DTYPES, TensorSpec
from ..checkpoint.skeleton import linear_kinds, model_class
from ..codes import BLOCKSIZES, QUANT_TYPES
from ..dtypes import FLOAT_DTYPES
from ..errors import InvalidArgumentError, InvalidFolderError
from ..format import QUANT_STATE, QuantizedWeight, quantize_weight
from ..pipeline import inside

logger = logging.getLogger(__name__)
_DTYPES = FLOAT_DTYPES


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """None / "auto" (keep each tensor's dtype) or one of float32, float16, bfloat16."""
    if name is None or name == "auto" or isinstance(name, torch.dtype):
        return None if name == "auto" else name
    if name not in _DTYPES:
        raise InvalidArgumentError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


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

        self.folder = ModelFolder(directory)
        self.dir = self.folder.path
        self.options = options or QuantOptions()
        self.modules_to_save = modules_to_save
        self.config_dict = self.folder.config_dict
        self.bnb = self.folder.quantization is not None
        if self.bnb:
            self.folder.check_bnb_4bit()
        self.config = self.folder.config()
        if hasattr(self.config, "quantization_config"):
            del self.config.quantization_config
        self.files = self.folder.files
        self.infos = self.folder.infos  # key -> TensorInfo
        shapes = self.folder.shapes
        self.skeleton = empty_model(self.config)
        self.quantized = self._find_quantized()  # module name -> its weight keys (bnb base)
        self.expert_groups: dict[str, list[str]] = {}  # bnb base: one expert's 4-bit prefix -> its keys
        self.experts = self._find_experts(shapes)  # "<module>.<param>" -> ExpertWeight
        self.linears, self.conv1d, self.head = self._linear_modules()
        # 4-bit entries of modules trained in full: dropped, `<module>.weight` then comes dense from the adapter
        self.dequantized = {m: keys for m, keys in self.quantized.items() if inside(m, self.saved)}
        self.quantized = {m: keys for m, keys in self.quantized.items() if m not in self.dequantized}
        if not self.bnb:
            missing = [m for m in self.linears if f"{m}.weight" not in self.infos]
            if missing:
                raise InvalidFolderError(f"{self.dir}: no weight for module(s) {missing[:5]}")
            self.quantized = {m: [f"{m}.weight"] for m in self.linears}

    def _find_quantized(self) -> dict[str, list[str]]:
        if not self.bnb:
            return {}
        groups = self.folder.bnb_groups()
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
        dense = expert_weights(self.skeleton, [k for k in self.infos if k not in grouped], shapes)
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
        return list(self.infos)

    def tensor(self, key: str) -> torch.Tensor:
        return self.folder.tensor(key)

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
        return model_folder.read(self.infos[key], index, index + 1)[0]

    def quant_state(self, module: str) -> dict:
        """A bnb base's quant state of a 4-bit module (its JSON entry: shape, dtype, blocksize, ...)."""
        keys = self.quantized.get(module) or self.dequantized[module]
        state_key = next(k for k in keys if QUANT_STATE in k)
        return json.loads(bytes(self.tensor(state_key).tolist()).decode())

    def weight_dtype(self, module: str) -> torch.dtype:
        """The dtype of a target linear's 4-bit weight (`QuantizedWeight.dtype`): a 16-bit base's stored one."""
        if self.bnb:
            return getattr(torch, self.quant_state(module)["dtype"].removeprefix("torch."))
        return DTYPES[self.infos[f"{module}.weight"].dtype]

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
        for key in self.infos:
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
    problems = adapter.shape_problems(lambda m: out_in(base, m), unknown="{} is not a linear of the base")
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
            shape = out_in(base, module)
        elif key in base.infos:
            shape = base.infos[key].shape
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


def out_in(base: BaseModel, module: str) -> tuple[int, int] | None:
    """(out, in) of a linear's weight, 4-bit or dense; None if `module` is not a linear of the base."""
    if module not in base.quantized and module not in base.dequantized:
        if module not in base.all_linears or f"{module}.weight" not in base.infos:
            return None
    elif base.bnb:
        return tuple(base.quant_state(module)["shape"])
    shape = base.infos[f"{module}.weight"].shape
    return shape[::-1] if module in base.conv1d else shape


def cast_dtype(dtype: torch.dtype, to: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor stored in `dtype` is written in, `to` applying to floating tensors only."""
    return to if to is not None and dtype.is_floating_point else dtype


def dense_entry(base: BaseModel, adapter: AdapterFolder | None, key: str, dtype: torch.dtype | None) -> Entry:
    """A dense entry of the output (`dense_tensor`, cast to `dtype`): the adapter's tensors are in
    memory already; the base's are read when the entry is written."""
    saved = adapter.saved_tensors() if adapter is not None else {}
    if key in saved:
        return Entry.of(key, saved[key].to(cast_dtype(saved[key].dtype, dtype)))
    info = base.infos[key]
    to = cast_dtype(DTYPES[info.dtype], dtype)
    return Entry(TensorSpec(key, to, info.shape), lambda: dense_tensor(base, adapter, key).to(to))


def estimated_bytes(base: BaseModel, kind: str, name: str, itemsize: float) -> int:
    """About how many bytes an item of `BaseModel.items()` takes in the output, at `itemsize` bytes
    per element of its weights (dense tensors at their stored size): what cuts the shards."""
    if kind == "dense":
        info = base.infos.get(name)
        return info.nbytes if info is not None else 0
    if kind == "experts":
        weight = base.experts[name]
        return int(weight.num_experts * weight.shape[0] * weight.shape[1] * itemsize)
    out_f, in_f = out_in(base, name)
    return int(out_f * in_f * itemsize)


def write_export(
    base: BaseModel,
    adapter: AdapterFolder | None,
    out: str | Path,
    entries,
    *,
    size,
    finish,
    options: dict,
    max_shard_size: int | str,
    progress: bool,
) -> Written:
    """Write `base.items()` into the folder `out` through an `OutputFolder` (sharded, resumable),
    then `finish(folder path, Written)` (config.json and the rest), with a tqdm bar when `progress`."""
    from tqdm import tqdm

    from ..checkpoint.convert import parse_size

    items = list(base.items())
    inputs = [*base.files, base.dir / "config.json"]
    if adapter is not None:
        inputs += adapter.files
    bar = tqdm(total=len(items), unit="tensor", desc=f"export {options['format']}", file=sys.stderr,
               disable=not progress)  # fmt: skip
    max_bytes = parse_size(max_shard_size)
    with bar, OutputFolder(out, inputs=inputs, options={**options, "max_shard_size": max_bytes},
                           max_shard_size=max_bytes) as folder:  # fmt: skip
        written = folder.write_weights(items, entries, size=size, on_item=lambda _: bar.update())
        finish(folder.path, written)
        base.folder.copy_extras(folder.path)
    logger.info(
        "%s: %d linear layers and %d expert weights, %d shard(s) (%d reused)",
        out, len(base.quantized), len(base.experts), len(written.shards), written.reused,
    )  # fmt: skip
    return written
