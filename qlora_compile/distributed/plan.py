"""Per-rank memory of a sharded run, for `qlora-compile plan --world-size N [--cpu-offload]`.

What `shard` gives each of N ranks, on the compiled-shaped meta model the planner builds:
- Every parameter is a DTensor sharded along dim 0: FSDP2 cuts it as `torch.chunk` does, so the
  first ranks hold ceil(rows / N) rows and rank 0 holds the most (the plan is rank 0's). That
  covers the 4-bit packed bytes and absmax codes (`storage_to_parameters` makes them parameters),
  LoRA, embeddings, the output head and norms. Buffers stay whole on every rank: the small fp32
  statistics (nested absmax, offsets, code tables) and 4-bit MoE experts.
- LoRA gradients and optimizer states are those of the local chunks (`PagedAdamW` steps the
  local shard; whether a tensor gets 8-bit states depends on its whole size).
- All-gather buffers: a block is gathered whole for its forward and again for its backward
  (`reshard_after_forward`), and FSDP2 prefetches the next one: two blocks at a time. The root
  (embeddings, output head, final norm) stays gathered from its forward to its backward.
- Activations are one process's at the per-rank batch.
With `cpu_offload`, the sharded parameters, their gradients and the optimizer states live in host
memory; the device holds what is gathered, the activations and the dequantize workspace.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..modules import QuantizedLinear
from .shard import _SHARDED_STORAGE


def is_sharded(module: nn.Module, name: str, t: torch.Tensor) -> bool:
    """Does `shard` shard this tensor of `module` (a parameter, or 4-bit storage it makes one)?"""
    if isinstance(t, nn.Parameter):
        return t.dim() > 0
    storage = isinstance(module, QuantizedLinear) and name in _SHARDED_STORAGE
    return storage and not t.is_floating_point() and t.dim() > 0


def rank0_numel(t: torch.Tensor, world: int) -> int:
    """Elements of rank 0's dim-0 chunk of `t` over `world` ranks."""
    rows = t.shape[0]
    return -(-rows // world) * (t.numel() // rows) if rows else 0


def _sharded_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s sharded tensors, whole (what gathering it allocates)."""
    return sum(
        t.numel() * t.element_size()
        for sub in module.modules()
        for name, t in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
        if is_sharded(sub, name, t)
    )


def gathered_bytes(model: nn.Module, blocks: list[nn.Module]) -> dict[str, int]:
    """{"blocks": two of the largest block gathered, "root": the root's own sharded tensors
    (embeddings, head, final norm) gathered}, in bytes."""
    in_blocks = {id(p) for b in blocks for p in [*b.parameters(), *b.buffers()]}
    root = sum(
        t.numel() * t.element_size()
        for sub in model.modules()
        for name, t in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
        if id(t) not in in_blocks and is_sharded(sub, name, t)
    )
    return {"blocks": 2 * max((_sharded_bytes(b) for b in blocks), default=0), "root": root}


def check_world_size(world_size: int) -> None:
    if world_size < 1:
        raise InvalidArgumentError(f"--world-size must be at least 1, got {world_size}")


def per_rank(t: torch.Tensor, module: nn.Module, name: str, world: int, offload: bool = False) -> int:
    """Device bytes rank 0 holds of `t`: its chunk when sharded (none with `offload`: host
    memory), all of it otherwise."""
    if not is_sharded(module, name, t):
        return t.numel() * t.element_size()
    return 0 if offload else rank0_numel(t, world) * t.element_size()
