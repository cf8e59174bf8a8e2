"""The "eager" backend's checkpoints: recompute with the forward pass's random state.

Dynamo captures a checkpointed layer as `torch.ops.higher_order.tag_activation_checkpoint(body,
*args)`. Run eagerly, that op calls `torch.utils.checkpoint.checkpoint` with
`preserve_rng_state=False` (torch 2.13, `_higher_order_ops/wrap.py`): Inductor functionalizes the
random ops of the recompute, and AOTAutograd saves their outputs, but the eager backend has
neither. Its recompute would then draw new LoRA dropout masks, and the backward would use masks the
forward never applied (issue 15: LoRA gradients off by 0.7-0.9 relative).

This pass, run only for `backend="eager"`, points each such node at `checkpoint_keeping_rng`: the
same non-reentrant checkpoint, with the random state saved before the forward and restored for the
recompute, so that both draw the same masks.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils.checkpoint import checkpoint

from ._match import graph_modules

_TAG = torch.ops.higher_order.tag_activation_checkpoint


def checkpoint_keeping_rng(body, *args, **kwargs):
    """`tag_activation_checkpoint(body, *args, **kwargs)` as the eager path should run it."""
    context_fn = body.meta.get("_checkpoint_context_fn") if isinstance(body, fx.GraphModule) else None
    if context_fn is not None:  # a selective-checkpointing policy the model's code passed
        kwargs["context_fn"] = context_fn
    kwargs.update(use_reentrant=False, preserve_rng_state=True)
    return checkpoint(body, *args, **kwargs)


def eager_checkpoint(gm: fx.GraphModule) -> int:
    """Point every activation-checkpoint node in `gm` (and its sub-graphs) at
    `checkpoint_keeping_rng`; returns how many."""
    count = 0
    for module in graph_modules(gm):
        nodes = [n for n in module.graph.nodes if n.op == "call_function" and n.target is _TAG]
        for node in nodes:
            node.target = checkpoint_keeping_rng
        if nodes:
            module.recompile()
        count += len(nodes)
    return count
