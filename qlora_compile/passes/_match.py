"""Small helpers shared by the passes: node predicates and sub-graph traversal."""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
from torch import fx

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
ADD_TARGETS = (operator.add, torch.add)
MUL_TARGETS = (operator.mul, torch.mul)


def is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_op(node, packet) -> bool:
    """Is `node` a call of `torch.ops.<ns>.<op>` (the packet or its .default overload)?"""
    return (
        isinstance(node, fx.Node) and node.op == "call_function" and node.target in (packet, packet.default)
    )


def through_to(node):
    """The input of a `.to(...)` call (a dtype cast in the traced code), else the node itself."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to":
        return node.args[0]
    return node


def graph_modules(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """`gm` and every GraphModule below it (activation checkpointing puts layers in sub-graphs)."""
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            yield module


def example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))
