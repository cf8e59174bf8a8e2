"""Paged AdamW optimizers (32-bit and 8-bit states) and step-in-backward hooks."""

from .adamw import PagedAdamW, PagedAdamW8bit, load_optimizer, save_optimizer, state_nbytes_for
from .hooks import StepInBackward, step_in_backward
from .pager import Pager

__all__ = [
    "PagedAdamW",
    "PagedAdamW8bit",
    "Pager",
    "StepInBackward",
    "load_optimizer",
    "save_optimizer",
    "state_nbytes_for",
    "step_in_backward",
]
