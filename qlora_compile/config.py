"""`QLoRAConfig`: every knob of `qlora_compile.compile`, with the paper's defaults."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from .codes import BLOCKSIZES, QUANT_TYPES

FilterFn = Callable[[nn.Module, str], bool]
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class QLoRAConfig:
    """Configuration of `qlora_compile.compile` (defaults from Dettmers et al., 2023).

    Attributes:
        quant_type: 4-bit data type of the frozen base weights, "nf4" or "fp4".
        blocksize: elements per absmax block, a power of two from 32 to 4096.
        double_quant: quantize the absmax values too (4.127 instead of 4.5 bits per parameter).
        compute_dtype: dtype the base matmul runs in (inputs are cast to it, outputs cast back).
        r: LoRA rank.
        lora_alpha: LoRA scaling numerator; the branch is scaled by lora_alpha / r.
        lora_dropout: dropout on the LoRA branch's input.
        target_modules: "all-linear" (every nn.Linear and transformers Conv1D except the output
            head), a list of module names (the last component, as "q_proj", or a full path), or a
            `filter_fn(module, fqn) -> bool`.
        gradient_checkpointing: turn on the model's own (Hugging Face, non-reentrant) checkpointing.
        lr, weight_decay, max_grad_norm: optimizer settings for `model.qlora.optimizer`.
        paged: page optimizer states out of device memory (with the paged optimizer).
        optim_bits: 32 or 8-bit optimizer states.
        backend: what compiles the graph after our passes: "inductor", "aot_eager" or "eager".
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    r: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: str | Sequence[str] | FilterFn = "all-linear"
    gradient_checkpointing: bool = True
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    paged: bool = True
    optim_bits: int = 32
    backend: str = "inductor"

    def __post_init__(self) -> None:
        _one_of("quant_type", self.quant_type, QUANT_TYPES)
        _one_of("blocksize", self.blocksize, BLOCKSIZES)
        _one_of("compute_dtype", self.compute_dtype, _COMPUTE_DTYPES)
        _one_of("optim_bits", self.optim_bits, (32, 8))
        _one_of("backend", self.backend, _BACKENDS)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != "all-linear":
                raise ValueError(
                    f"target_modules must be 'all-linear', a list of names or a filter_fn; got {targets!r}"
                )
        elif not callable(targets):
            if not all(isinstance(t, str) for t in targets) or not targets:
                raise ValueError(f"target_modules list must hold module names, got {targets!r}")
            object.__setattr__(self, "target_modules", tuple(targets))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def with_overrides(self, **overrides) -> QLoRAConfig:
        """A copy with some fields changed (unknown names raise TypeError listing the known ones)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown QLoRAConfig field(s) {unknown}; known: {sorted(known)}")
        return replace(self, **overrides)


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
