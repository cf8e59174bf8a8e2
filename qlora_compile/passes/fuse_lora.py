"""Fuse each QLoRA layer's base product and LoRA branch into one `qlora::lora_linear` node.

Matches (in Dynamo's torch-level graph, as QLoRALinear.forward traces):

    base = qlora.linear(x, W..., bias, quant_type, blocksize, shape)
    lora = linear(linear(xl, A), B) * scaling            # xl: dropout(x.to(adapter dtype))
    out  = base.to(dtype) + lora.to(dtype)               # either operand order, casts optional

Produces `out = qlora.lora_linear(x, xl, W..., bias, A, B, scaling, quant_type, blocksize, shape,
dtype)`. Keeps: values (the op computes the same expression), the dropout node (xl is still
computed where it was), and any intermediate that has other users (then the layer is left alone).
"""

from __future__ import annotations

import torch
from torch import fx

from ._match import (
    ADD_TARGETS,
    LINEAR_TARGETS,
    MUL_TARGETS,
    example_value,
    graph_modules,
    is_call,
    is_op,
    through_to,
)


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def _match_lora(node):
    """(mul, linear_B, linear_A, xl, A, B, scaling) for `linear(linear(xl, A), B) * s`, else None."""
    if not is_call(node, MUL_TARGETS):
        return None
    lin_b, scaling = node.args if isinstance(node.args[0], fx.Node) else node.args[::-1]
    if not isinstance(scaling, (int, float)) or not is_call(lin_b, LINEAR_TARGETS):
        return None
    lin_a, lora_B = lin_b.args[:2]
    if (len(lin_b.args) > 2 and lin_b.args[2] is not None) or not is_call(lin_a, LINEAR_TARGETS):
        return None
    xl, lora_A = lin_a.args[:2]
    if len(lin_a.args) > 2 and lin_a.args[2] is not None:
        return None
    return node, lin_b, lin_a, xl, lora_A, lora_B, float(scaling)


def _match(add: fx.Node):
    if not is_call(add, ADD_TARGETS) or len(add.args) != 2:
        return None
    for left, right in (add.args, add.args[::-1]):
        base, lora = through_to(left), _match_lora(through_to(right))
        if lora is None or not is_op(base, torch.ops.qlora.linear):
            continue
        chain = [left, right, base, *lora[:3]]
        users = [add, add, left, right, lora[0], lora[1]]
        if all(n is u or _only_user(n, u) for n, u in zip(chain, users, strict=True)):
            return base, lora, chain
    return None


def fuse_lora(gm: fx.GraphModule) -> int:
    """Rewrite every matched QLoRA layer in `gm` and its sub-graphs; returns how many."""
    count = 0
    for module in graph_modules(gm):
        graph = module.graph
        for add in list(graph.nodes):
            found = _match(add)
            if found is None:
                continue
            base, (_, _, _, xl, lora_A, lora_B, scaling), chain = found
            x, packed, absmax, nested, offset, bias, quant_type, blocksize, shape = base.args[:9]
            value = example_value(add)
            with graph.inserting_before(add):
                fused = graph.call_function(
                    torch.ops.qlora.lora_linear.default,
                    (x, xl, packed, absmax, nested, offset, bias, lora_A, lora_B, scaling,
                     quant_type, blocksize, shape, value.dtype),
                )  # fmt: skip
            fused.meta.update(add.meta)
            add.replace_all_uses_with(fused)
            graph.erase_node(add)
            for node in dict.fromkeys(chain):  # unique, outermost first
                if node is not x and not node.users:
                    graph.erase_node(node)
            count += 1
        if count:
            graph.lint()
            module.recompile()
    return count
