"""LoRA adapters in PEFT's on-disk format.

`save_adapter(model, dir)` writes `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, which
`peft.PeftModel.from_pretrained(base, dir)` loads. `AdapterFolder(dir)` is the one reader of that
format (ours or PEFT's): `load_adapter` and the exports (`qlora_compile.export`) both use it, so
both give each module PEFT's rank and scaling: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with
`use_rslora`, with `r` and `lora_alpha` per module from `rank_pattern` / `alpha_pattern`.

Modules trained in full (`modules_to_save`, the task head of a classifier) are saved as PEFT saves
them: `adapter_config.json` lists them in `modules_to_save`, and `adapter_model.safetensors` holds
each one's whole state dict under `base_model.model.<module path>.<key>` (PEFT strips its
wrapper's `modules_to_save.<adapter name>.` from the keys).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint.output_folder import atomic_files
from .errors import InvalidArgumentError, InvalidConfigError, InvalidFolderError, MissingFileError
from .experts import matches
from .lora import LoRALayer, lora_scaling

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT's key, optionally with an adapter name (`.lora_A.default.weight`): (module, "A" or "B").
_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")
# Initializations that change the base weights (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ): such an
# adapter only fits the modified base, unless PEFT converted it to plain LoRA when saving.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# (config option, is it set?, why it is refused): what plain LoRA on a frozen base cannot express.
_UNSUPPORTED = (
    ("use_dora", bool, "DoRA adds a learned magnitude per output feature"),
    ("lora_bias", bool, "lora_B has a bias"),
    ("bias", lambda v: v not in (None, "none"), "it trains the base layers' biases"),
    ("use_qalora", bool, "QA-LoRA pools the LoRA input"),
    ("layer_replication", bool, "it duplicates base layers"),
    ("trainable_token_indices", bool, "it trains embedding rows"),
    ("alora_invocation_tokens", bool, "activated LoRA depends on the input tokens"),
    ("arrow_config", bool, "Arrow routes between several adapters"),
    (
        "init_lora_weights",
        lambda v: isinstance(v, str) and v.lower().startswith(_BASE_CHANGING_INITS),
        "this initialization changed the base weights (save it with PEFT's "
        "path_initial_model_for_weight_conversion to get a plain LoRA adapter)",
    ),
)


def _match_pattern(patterns: dict, module: str, default):
    """PEFT's `get_pattern_key`: the first key `k` (a regex) with `(.*\\.)?(k)$` matching the
    module's full name gives its value; else the default."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class AdapterFolder:
    """A PEFT-format LoRA adapter folder (ours or PEFT's), read and validated.

    Attributes:
        dir: the folder.
        config: adapter_config.json as read.
        use_rslora: scale by lora_alpha / sqrt(r) instead of lora_alpha / r.
        pairs: module name -> {"A": (r, in_features), "B": (out_features, r)} tensors as stored.
        parameter_tensors: `<module>.lora_A.weight` / `.lora_B.weight` -> tensor, for the modules
            in `parameter_modules` (LoRA on 3-D expert weights, PEFT's `target_parameters`).
        saved: module name -> its state dict as stored, for the modules trained in full
            (`modules_to_save`: the outermost module whose name matches an entry, as PEFT's
            target_modules names match; entries the file has no tensors for are ignored, as PEFT
            ignores "score" on a model whose head is "classifier").

    Args:
        directory: the adapter folder.
        parameter_modules: PEFT key prefixes (`<module>` or `<module>.base_layer...`) of LoRA on
            parameters rather than linear modules; their tensors are kept apart, unchecked here
            (the model's experts check them). An adapter with `target_parameters` needs them.

    Raises:
        FileNotFoundError: adapter_config.json or adapter_model.safetensors is missing.
        ValueError: not a LoRA adapter, an option plain LoRA cannot express (DoRA, lora_bias, ...),
            entries other than lora_A / lora_B outside modules_to_save, or a rank that is not the config's.
    """

    def __init__(self, directory: str | Path, parameter_modules: Collection[str] | None = None):
        self.dir = Path(directory)
        self._parameter_modules = set(parameter_modules or ())
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (self.dir / name).exists():
                raise MissingFileError(f"{self.dir / name} does not exist (not a LoRA adapter folder)")
        self.config = json.loads((self.dir / CONFIG_NAME).read_text())
        self._check_config()
        targets = self.config.get("target_parameters")
        if targets and parameter_modules is None:
            raise InvalidConfigError(
                f"{self.dir}: target_parameters={targets!r} (LoRA on MoE experts) needs the model's "
                "experts modules (parameter_modules) to be read"
            )
        if targets and not parameter_modules:
            raise InvalidConfigError(
                f"{self.dir}: target_parameters={targets!r} (LoRA on MoE experts) match no expert "
                "weight of the model (with LoRA)"
            )
        self.parameter_tensors: dict[str, torch.Tensor] = {}
        self.saved: dict[str, dict[str, torch.Tensor]] = {}
        self.use_rslora = bool(self.config.get("use_rslora", False))
        self.pairs = self._read_weights()
        self._check_ranks()

    @property
    def files(self) -> list[Path]:
        """The folder's two files (config and weights)."""
        return [self.dir / CONFIG_NAME, self.dir / WEIGHTS_NAME]

    def _check_config(self) -> None:
        peft_type = self.config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise InvalidConfigError(
                f"{self.dir}: only LoRA adapters are supported, got peft_type {peft_type!r}"
            )
        for option, is_set, why in _UNSUPPORTED:
            value = self.config.get(option)
            if value is not None and is_set(value):
                raise InvalidConfigError(
                    f"{self.dir}: {option}={value!r} is not supported ({why}); only plain LoRA "
                    "adapters (use_rslora, rank_pattern and alpha_pattern allowed) can be read"
                )
        for option in ("r", "lora_alpha"):
            if option not in self.config:
                raise InvalidConfigError(f"{self.dir}: {CONFIG_NAME} has no {option!r}")

    def _saved_module(self, key: str) -> str | None:
        """The outermost prefix of `key` (a tensor's path) that modules_to_save names, or None."""
        names = self.config.get("modules_to_save") or ()
        parts = key.split(".")
        return next((p for i in range(1, len(parts)) if matches(p := ".".join(parts[:i]), names)), None)

    def _read_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        unknown, twice = [], []
        with safe_open(str(self.dir / WEIGHTS_NAME), "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open objects are not iterable)
                module = self._saved_module(key.removeprefix(_PREFIX))
                if module is not None:
                    inner = key.removeprefix(_PREFIX)[len(module) + 1 :]
                    self.saved.setdefault(module, {})[inner] = st.get_tensor(key)
                    continue
                m = _KEY.match(key)
                if m is None:
                    unknown.append(key)
                    continue
                if m.group(1) in self._parameter_modules:
                    self.parameter_tensors[f"{m.group(1)}.lora_{m.group(2)}.weight"] = st.get_tensor(key)
                    continue
                pair = pairs.setdefault(m.group(1), {})
                if m.group(2) in pair:
                    twice.append(key)
                pair[m.group(2)] = st.get_tensor(key)
        if unknown:
            raise InvalidFolderError(
                f"{self.dir}: unsupported adapter entries {unknown[:5]} (only lora_A/lora_B, and the "
                "modules that modules_to_save names)"
            )
        if twice:
            raise InvalidFolderError(
                f"{self.dir}: entries {twice[:5]} repeat a module (several adapters in one file?)"
            )
        half = [m for m, p in pairs.items() if set(p) != {"A", "B"}]
        if half:
            raise InvalidFolderError(f"{self.dir}: modules {half[:5]} lack lora_A or lora_B")
        if not pairs and not self.parameter_tensors and not self.saved:
            raise InvalidFolderError(f"{self.dir}: the adapter holds no LoRA weights")
        return pairs

    def _check_ranks(self) -> None:
        problems = []
        for module, p in self.pairs.items():
            a, b, r = p["A"], p["B"], self.rank(module)
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
                problems.append(f"{module}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} for rank {r}")
        if problems:
            raise InvalidFolderError(
                f"{self.dir}: tensors do not have the config's ranks: " + "; ".join(problems[:10])
            )

    def shape_problems(self, shape_of, unknown: str) -> list[str]:
        """What keeps the adapter from a target: `shape_of(module)` gives the (out, in) of the
        module's weight, or None when the target has no such module (reported as
        `unknown.format(module)`); a module whose `lora_B @ lora_A` is not that shape is reported."""
        problems = []
        for module, p in self.pairs.items():
            shape = shape_of(module)
            if shape is None:
                problems.append(unknown.format(module))
                continue
            a, b = p["A"], p["B"]
            if (b.shape[0], a.shape[1]) != tuple(shape):
                problems.append(
                    f"{module}: lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)} does not give the weight's "
                    f"{tuple(shape)}"
                )
        return problems

    def modules(self) -> list[str]:
        return list(self.pairs)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the modules trained in full, by its full key (`<module>.<key>`)."""
        return {f"{m}.{k}": t for m, tensors in self.saved.items() for k, t in tensors.items()}

    def rank(self, module: str) -> int:
        """r of `module`: its rank_pattern entry, else the config's r."""
        return _match_pattern(self.config.get("rank_pattern"), module, self.config["r"])

    def alpha(self, module: str) -> float:
        """lora_alpha of `module`: its alpha_pattern entry, else the config's lora_alpha."""
        return _match_pattern(self.config.get("alpha_pattern"), module, self.config["lora_alpha"])

    def scaling(self, module: str) -> float:
        """PEFT's scaling of `module`'s branch: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return lora_scaling(self.rank(module), self.alpha(module), self.use_rslora)

    def delta(self, module: str) -> torch.Tensor:
        """scaling * B @ A in fp32, (out_features, in_features)."""
        a, b = self.pairs[module]["A"].float(), self.pairs[module]["B"].float()
        return (b @ a) * self.scaling(module)

    # ---- LoRA on expert weights (PEFT's `ParamWrapper`; the scale is the config's, as load_adapter sets it) ----
    def expert_prefixes(self, model: nn.Module, names: Collection[str]) -> dict[str, str]:
        """{"<module>.<param>": PEFT key prefix} of the expert weights among `names` that the config's
        `target_parameters` name, nested as PEFT nests them over `model`'s experts modules."""
        from .experts import expert_parameters, matches, peft_prefixes

        targets, out = self.config.get("target_parameters") or [], {}
        for module in dict.fromkeys(n.rpartition(".")[0] for n in names):
            params = expert_parameters(model.get_submodule(module))
            adapted = [p for p in params if matches(f"{module}.{p}", targets)]
            out.update(
                {
                    f"{module}.{p}": k
                    for p, k in peft_prefixes(module, adapted).items()
                    if f"{module}.{p}" in names
                }
            )
        return out

    def expert_problems(self, model: nn.Module, experts: dict) -> list[str]:
        """What keeps the expert LoRA from `experts` ({"<module>.<param>": ExpertWeight}): missing,
        unexpected or misshapen `lora_A` (r * E, in) / `lora_B` (out, r * E)."""
        prefixes = self.expert_prefixes(model, experts)
        if self.config.get("target_parameters") and not prefixes:
            return [
                f"target_parameters {self.config['target_parameters']} match no expert weight of the base"
            ]
        problems, expected = [], set()
        for name, prefix in prefixes.items():
            e, (out_f, in_f) = experts[name].num_experts, experts[name].shape
            r_e = e * self.config["r"]
            for ab, shape in (("A", (r_e, in_f)), ("B", (out_f, r_e))):
                key = f"{prefix}.lora_{ab}.weight"
                expected.add(key)
                t = self.parameter_tensors.get(key)
                if t is None:
                    problems.append(f"{name}: missing {key}")
                elif tuple(t.shape) != shape:
                    problems.append(f"{name}: {key} has shape {tuple(t.shape)}, expected {shape}")
        problems += [f"unexpected {k}" for k in sorted(self.parameter_tensors.keys() - expected)]
        return problems

    def expert_delta(self, prefix: str, expert: int, num_experts: int) -> torch.Tensor:
        """scaling * B_e @ A_e in fp32, (out_features, in_features), of expert `expert`."""
        from .experts import lora_factors

        a, b = lora_factors(
            self.parameter_tensors[f"{prefix}.lora_A.weight"].float(),
            self.parameter_tensors[f"{prefix}.lora_B.weight"].float(),
            num_experts,
        )
        return (b[expert] @ a[expert]) * lora_scaling(
            self.config["r"], self.config["lora_alpha"], self.use_rslora
        )


def _layers(model: nn.Module) -> dict[str, LoRALayer]:
    """The LoRA layers: `QLoRALinear` (4-bit base) and `LoRALinear` (a linear kept dense)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}
    if not layers:
        raise InvalidArgumentError("the model has no QLoRA layers: run qlora_compile.compile(model) first")
    return layers


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS")):
        if name.endswith(suffix):
            return task
    return None


def _scale_config(layers: dict[str, LoRALayer]) -> dict:
    """r, lora_alpha and use_rslora, with rank_pattern / alpha_pattern for the layers that differ
    from the most common value (each pattern anchored to one full module name)."""
    rslora = {layer.use_rslora for layer in layers.values()}
    if len(rslora) > 1:
        raise InvalidArgumentError("some layers use rsLoRA and others do not: PEFT's format cannot say so")
    for name, layer in layers.items():
        expected = lora_scaling(layer.r, layer.lora_alpha, layer.use_rslora)
        if abs(layer.scaling - expected) > 1e-12 * abs(expected):
            raise InvalidArgumentError(
                f"{name}: scaling {layer.scaling} is not PEFT's {expected} for r={layer.r}, "
                f"lora_alpha={layer.lora_alpha}: set it with set_scale"
            )
    config: dict = {"use_rslora": rslora.pop()}
    for key, pattern, attr in (("r", "rank_pattern", "r"), ("lora_alpha", "alpha_pattern", "lora_alpha")):
        values = {name: getattr(layer, attr) for name, layer in layers.items()}
        default = Counter(values.values()).most_common(1)[0][0]
        config[key] = default
        config[pattern] = {f"^{re.escape(n)}": v for n, v in values.items() if v != default}
    return config


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the model's LoRA adapters in PEFT's format into `directory` (created if needed).

    Layers with another rank or lora_alpha than the most common one get `rank_pattern` /
    `alpha_pattern` entries (`^<full module name>`), so PEFT rebuilds every layer as it is here.
    The modules the model trains in full (`model.qlora.modules_to_save`) are written whole, with
    their full paths in the config's `modules_to_save`.
    """
    layers = _layers(model)
    directory = Path(directory)
    first = next(iter(layers.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = _whole(layer.lora_A.weight)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = _whole(layer.lora_B.weight)
    saved = _saved(model)
    for name, module in saved.items():  # the whole state dict, as PEFT's ModulesToSaveWrapper saves it
        tensors.update({f"{_PREFIX}{name}.{k}": _whole(t) for k, t in module.state_dict().items()})
    scale = _scale_config(layers)
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": scale["r"],
        "lora_alpha": scale["lora_alpha"],
        "rank_pattern": scale["rank_pattern"],
        "alpha_pattern": scale["alpha_pattern"],
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "bias": "none",
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values()),
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": sorted(saved) or None,
        "use_rslora": scale["use_rslora"],
        "use_dora": False,
    }
    _add_expert_adapters(model, tensors, config)
    if getattr(getattr(model, "qlora", None), "mesh", None) is not None and torch.distributed.get_rank() != 0:
        return directory  # sharded (qlora_compile.distributed): every rank gathered, rank 0 writes
    # every tensor is in memory: safetensors' own writer (no copy since 0.8, see `SafetensorsStream`)
    with atomic_files(directory, "adapter") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return directory


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `t`, gathered whole if it is a sharded DTensor (a collective: every rank calls it)."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).contiguous().cpu()


def _saved(model: nn.Module) -> dict[str, nn.Module]:
    """The modules the model trains in full (compile's modules_to_save), by full name."""
    names = getattr(getattr(model, "qlora", None), "modules_to_save", None) or []
    return {n: model.get_submodule(n) for n in names}


def _saved_problems(adapter: AdapterFolder, saved: dict[str, nn.Module]) -> list[str]:
    problems = [
        f"{n} is trained in full here but not in the adapter (modules_to_save)"
        for n in sorted(saved.keys() - adapter.saved)
    ]
    for name, tensors in adapter.saved.items():
        if name not in saved:
            problems.append(
                f"{name}: the adapter trains it in full (modules_to_save), the model does not "
                f"(compile with modules_to_save={sorted(adapter.saved)})"
            )
            continue
        state = saved[name].state_dict()
        problems += [f"missing {name}.{k}" for k in sorted(state.keys() - tensors.keys())]
        problems += [f"unexpected {name}.{k}" for k in sorted(tensors.keys() - state.keys())]
        problems += [
            f"{name}.{k}: shape {tuple(t.shape)} != {tuple(state[k].shape)}"
            for k, t in tensors.items()
            if k in state and t.shape != state[k].shape
        ]
    return problems


def _fit_problems(adapter: AdapterFolder, layers: dict[str, LoRALayer]) -> list[str]:
    problems = [f"missing {n}.lora_{ab}.weight" for n in sorted(layers.keys() - adapter.pairs) for ab in "AB"]
    return problems + adapter.shape_problems(
        lambda n: (layers[n].out_features, layers[n].in_features) if n in layers else None,
        unknown="{} is not a QLoRA layer of the model",
    )


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load adapters written by `save_adapter` or by PEFT into the model's QLoRA layers.

    Each layer takes the adapter's rank, lora_alpha and rsLoRA setting (PEFT's rules, with
    `rank_pattern` / `alpha_pattern`), so it computes what PEFT computes with that adapter. A layer
    whose rank differs gets new `lora_A` / `lora_B` parameters at the adapter's rank: then
    `model.qlora.optimizer` is dropped and rebuilt over the new parameters on its next use (an
    optimizer you built yourself over the old ones must be rebuilt too). Dropout stays the model's
    (a training setting; the adapter's `lora_dropout` is not applied). The modules the model trains
    in full (`modules_to_save`) take the adapter's tensors, in place; the adapter must have exactly
    those modules.

    Raises:
        FileNotFoundError: the folder lacks adapter_config.json or adapter_model.safetensors.
        ValueError: an unsupported adapter (see `AdapterFolder`), or modules and shapes that do not
            match the model (all mismatches are listed).
    """
    from .experts import peft_lora_parameters

    expert_modules = {key.rsplit(".lora_", 1)[0] for key in peft_lora_parameters(model)}
    adapter = AdapterFolder(directory, parameter_modules=expert_modules)
    layers = _layers(model)
    tensors = dict(adapter.parameter_tensors)
    experts = _load_expert_adapters(model, tensors, adapter.config)  # takes the experts' keys out
    saved = _saved(model)
    problems = _fit_problems(adapter, layers) + _saved_problems(adapter, saved)
    problems += [f"unexpected {k}" for k in sorted(tensors)] + experts.problems
    if problems:
        raise InvalidFolderError(
            f"adapter in {adapter.dir} does not fit the model: " + "; ".join(problems[:10])
        )
    resized = []
    r, alpha = adapter.config["r"], adapter.config["lora_alpha"]
    experts.apply(alpha, lora_scaling(r, alpha, adapter.use_rslora))
    with torch.no_grad():
        for name, layer in layers.items():
            if layer.set_rank(adapter.rank(name)):
                resized.append(name)
            layer.set_scale(adapter.alpha(name), adapter.use_rslora)
            layer.lora_A.weight.copy_(adapter.pairs[name]["A"])
            layer.lora_B.weight.copy_(adapter.pairs[name]["B"])
        for name, module in saved.items():  # in place: the optimizer keeps its parameters
            module.load_state_dict(adapter.saved[name])
    handle = getattr(model, "qlora", None)
    if resized and handle is not None:
        logger.info("load_adapter: %d layers took a new rank; rebuilding model.qlora.optimizer", len(resized))
        handle.reset_optimizer()
    return model


# ---- LoRA on 3-D expert weights (PEFT's `target_parameters`, `ParamWrapper` keys) ----
def _add_expert_adapters(model: nn.Module, tensors: dict, config: dict) -> None:
    """Add the experts' LoRA tensors under PEFT's keys, and `target_parameters` to the config."""
    from .experts import adapted_experts, peft_lora_parameters

    params = peft_lora_parameters(model)
    if not params:
        return
    tensors.update({f"{_PREFIX}{k}": p.detach().contiguous().cpu() for k, p in params.items()})
    config["target_parameters"] = sorted({key.rsplit(".", 1)[-1] for key in adapted_experts(model)})


@dataclass
class _ExpertAdapters:
    problems: list[str]
    pairs: list[tuple[nn.Parameter, torch.Tensor]]
    layers: list

    def apply(self, lora_alpha: float, scaling: float) -> None:
        with torch.no_grad():
            for param, tensor in self.pairs:
                param.copy_(tensor)
        for layer in self.layers:
            layer.lora_alpha, layer.scaling = lora_alpha, scaling


def _load_expert_adapters(model: nn.Module, tensors: dict, config: dict) -> _ExpertAdapters:
    """Match (and remove from `tensors`) the experts' LoRA keys; list every mismatch."""
    from .experts import adapted_experts, peft_lora_parameters

    params = peft_lora_parameters(model)
    problems = [f"missing {k}" for k in sorted(params.keys() - tensors.keys())]
    if config.get("target_parameters") and not params:
        problems.append(
            f"target_parameters {config['target_parameters']}: the model has no experts with LoRA"
        )
    pairs = []
    for key, param in params.items():
        t = tensors.pop(key, None)
        if t is not None and t.shape != param.shape:
            problems.append(f"{key}: shape {tuple(t.shape)} != {tuple(param.shape)}")
        elif t is not None:
            pairs.append((param, t))
    return _ExpertAdapters(problems, pairs, list(adapted_experts(model).values()))
