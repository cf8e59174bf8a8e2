"""Dropout masks from a counter hash instead of Inductor's random numbers (Inductor on CPU only).

Inductor's C++ code draws each element of a dropout mask with `normalized_rand_cpu(seed, offset)`,
which builds a fresh Philox4x32 engine (10 rounds) per element, keeps one of its four outputs, and
runs in a scalar loop (torch 2.13, `torch/csrc/inductor/cpp_prefix.h`). Measured on SmolLM2-135M
(4 x 512 tokens, r=64): the LoRA inputs' masks, drawn in the forward and again in the
recompute, were 16-20% of a training step.

This pass replaces each `F.dropout(x, p, training=True)` of a CPU graph by `hash_dropout(x, p)`:
one random 32-bit seed per call (one element of Inductor's random numbers), and for element i the
mask bit `hash32(i ^ seed) >= p * 2**32` (its top 24 bits against a 24-bit threshold), with
`hash32` the integer hash below: pointwise integer arithmetic that Inductor fuses into the kernel
that reads x and vectorizes. The numerics are those of `nn.Dropout`: each element is kept with
probability 1 - p (p rounded to 24 bits, within 6e-8) and scaled by 1 / (1 - p), zero otherwise;
masks of distinct calls come from distinct seeds. The mask is a function of (seed, i), so a
checkpointed layer's recompute, which restores the random state and draws the same seed,
recomputes the forward's mask, and the partitioner may recompute it from x instead of saving the
dropped input.

CUDA graphs keep `F.dropout` (Inductor's Triton kernels draw Philox numbers in parallel).
"""

from __future__ import annotations

import math

import torch
from torch import fx

from ._match import example_value, graph_modules, is_call

_M32 = 0xFFFFFFFF
# The multiplier of a well-known 32-bit integer hash (xorshift-multiply, twice, then xorshift).
# Below 2**31, so that a 32-bit value times it stays below 2**63: int64 lanes never overflow.
_MIX = 0x45D9F3B
_BITS = 24  # the mask compares the hash's top 24 bits with round(p * 2**24)


def hash32(h: torch.Tensor) -> torch.Tensor:
    """A bijective mix of 32-bit values held in int64 (in [0, 2**32) in and out)."""
    h = ((h >> 16) ^ h) * _MIX & _M32
    h = ((h >> 16) ^ h) * _MIX & _M32
    return (h >> 16) ^ h


def keep_mask(shape, p: float, seed: torch.Tensor, device=None) -> torch.Tensor:
    """The bool mask of `hash_dropout` for a tensor of `shape` and a 0-dim int64 `seed` in
    [0, 2**32): True where the element is kept."""
    index = torch.arange(math.prod(shape), device=device, dtype=torch.int64).view(shape)
    return (hash32((index ^ seed) & _M32) >> (32 - _BITS)) >= round(p * 2**_BITS)


def hash_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """`F.dropout(x, p, training=True)` with a hash mask: a seed drawn from torch's generator."""
    seed = torch.randint(0, 2**32, (), device=x.device, dtype=torch.int64)
    return keep_mask(x.shape, p, seed, x.device) * x * (1.0 / (1.0 - p))


def _dropout_call(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(x, p) of an `F.dropout(x, p, training, inplace)` call that drops (training, out of place,
    0 < p < 1, on the CPU), else None."""
    if not is_call(node, (torch.nn.functional.dropout,)):
        return None
    names = ("input", "p", "training", "inplace")
    args = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
    p, training, inplace = args.get("p", 0.5), args.get("training", True), args.get("inplace", False)
    x = args.get("input")
    value = example_value(x) if isinstance(x, fx.Node) else None
    if not isinstance(p, float | int) or training is not True or inplace is not False:
        return None
    if not 0 < p < 1 or not isinstance(value, torch.Tensor) or value.device.type != "cpu":
        return None
    return x, float(p)


def hash_dropouts(gm: fx.GraphModule) -> int:
    """Replace every CPU training dropout in `gm` (and its sub-graphs) by `hash_dropout`; returns
    how many."""
    count = 0
    for module in graph_modules(gm):
        changed = False
        for node in list(module.graph.nodes):
            call = _dropout_call(node)
            if call is None:
                continue
            node.target, node.args, node.kwargs = hash_dropout, call, {}
            changed = True
            count += 1
        if changed:
            module.recompile()
    return count
