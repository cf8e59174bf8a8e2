"""Step-in-backward: each parameter steps as soon as its gradient is accumulated, then drops it.

`step_in_backward(model, optimizer)` registers `register_post_accumulate_grad_hook` on every
trainable parameter: the hook steps that parameter alone (`optimizer.step_param(p)`) and sets
`p.grad = None`, so at most about one parameter's gradient is alive at a time instead of all.

Global-norm clipping needs every gradient before the first step, which this mode never has: asking
for it raises. `per_parameter=True` clips each gradient to `max_grad_norm` on its own (a different
rule, chosen explicitly). Each backward is one optimizer step: no gradient accumulation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


class StepInBackward:
    """Handle of the registered hooks: `remove()`; `grad_norm()` returns and resets the global
    norm of the gradients seen since the last call (before any per-parameter clipping)."""

    def __init__(self, params, optimizer, max_grad_norm: float | None, per_parameter: bool):
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.per_parameter = per_parameter
        self._sq = 0.0
        self.steps = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if self.max_grad_norm is not None:  # torch's clip_grad_norm_, on this parameter alone
            norm = float(torch.nn.utils.clip_grad_norm_(p, self.max_grad_norm))
        else:
            norm = float(torch.nn.utils.get_total_norm([p.grad]))
        self._sq += norm * norm
        self.optimizer.step_param(p)
        p.grad = None
        self.steps += 1

    def grad_norm(self) -> float:
        norm, self._sq = math.sqrt(self._sq), 0.0
        return norm

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def step_in_backward(
    model: nn.Module | Iterable[torch.Tensor],
    optimizer,
    *,
    max_grad_norm: float | None = None,
    per_parameter: bool = False,
) -> StepInBackward:
    """Make `optimizer` step each trainable parameter of `model` inside backward.

    Args:
        model: a module (its parameters with requires_grad) or an iterable of parameters; each must
            belong to `optimizer`.
        optimizer: a `PagedAdamW` / `PagedAdamW8bit` (anything with `step_param(p)`).
        max_grad_norm: clip gradients; only with `per_parameter=True`.
        per_parameter: clip each parameter's gradient to `max_grad_norm` on its own.

    Raises:
        ValueError: `max_grad_norm` without `per_parameter=True` (global-norm clipping needs all
            gradients before any step), or a parameter the optimizer does not hold.
    """
    if max_grad_norm is not None and not per_parameter:
        raise ValueError(
            "step-in-backward steps each parameter before the other gradients exist, so clipping by "
            "the global norm is impossible; pass per_parameter=True to clip each gradient to "
            "max_grad_norm on its own, or max_grad_norm=None"
        )
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm!r}")
    if not hasattr(optimizer, "step_param"):
        raise TypeError(
            f"{type(optimizer).__name__} cannot step one parameter; use qlora_compile.optim.PagedAdamW"
        )
    params = model.parameters() if isinstance(model, nn.Module) else model
    params = [p for p in params if p.requires_grad]
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not params or any(id(p) not in held for p in params):
        raise ValueError("every trainable parameter must belong to the optimizer (and there must be one)")
    return StepInBackward(params, optimizer, max_grad_norm if per_parameter else None, per_parameter)
