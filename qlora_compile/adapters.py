"""LoRA adapters in PEFT's on-disk format.

`save_adapter(model, dir)` writes `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, which
`peft.PeftModel.from_pretrained(base, dir)` loads; `load_adapter(model, dir)` reads the same
format (ours or PEFT's) into a compiled model's QLoRA layers, checking every key and shape.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .lora import QLoRALinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _layers(model: nn.Module) -> dict[str, QLoRALinear]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}
    if not layers:
        raise ValueError("the model has no QLoRA layers: run qlora_compile.compile(model) first")
    return layers


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS")):
        if name.endswith(suffix):
            return task
    return None


def _atomic_write(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)  # a crash leaves the old file or none, never half of one


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the model's LoRA adapters in PEFT's format into `directory` (created if needed)."""
    layers = _layers(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    first = next(iter(layers.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "bias": "none",
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values()),
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    _add_expert_adapters(model, tensors, config)
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2)))
    return directory


def _strip(key: str) -> str:
    """`<path>.lora_A.weight` from PEFT's key (which may carry an adapter name: `.lora_A.default.`)."""
    key = key.removeprefix(_PREFIX)
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load adapters written by `save_adapter` or by PEFT into the model's QLoRA layers.

    Raises:
        FileNotFoundError: the folder lacks adapter_config.json or adapter_model.safetensors.
        ValueError: rank, keys or shapes do not match the model (all mismatches are listed).
    """
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name} does not exist")
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise ValueError(
            f"{directory}: only plain LoRA adapters are supported, got {config.get('peft_type')}"
        )
    tensors = {_strip(k): v for k, v in load_file(str(directory / WEIGHTS_NAME)).items()}
    layers = _layers(model)
    experts = _load_expert_adapters(model, tensors, config)  # takes the experts' keys out of `tensors`
    expected = {f"{name}.lora_{ab}.weight" for name in layers for ab in "AB"}
    problems = [f"missing {k}" for k in sorted(expected - tensors.keys())]
    problems += [f"unexpected {k}" for k in sorted(tensors.keys() - expected)]
    for name, layer in layers.items():
        for ab, target in (("A", layer.lora_A.weight), ("B", layer.lora_B.weight)):
            t = tensors.get(f"{name}.lora_{ab}.weight")
            if t is not None and t.shape != target.shape:
                problems.append(f"{name}.lora_{ab}.weight: shape {tuple(t.shape)} != {tuple(target.shape)}")
    problems += experts.problems
    if problems:
        raise ValueError(f"adapter in {directory} does not fit the model: " + "; ".join(problems[:10]))
    scaling = config["lora_alpha"] / config["r"]
    experts.apply(config["lora_alpha"], scaling)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.weight.copy_(tensors[f"{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(tensors[f"{name}.lora_B.weight"])
            layer.lora_alpha, layer.scaling = config["lora_alpha"], scaling
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
