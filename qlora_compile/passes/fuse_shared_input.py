"""Fuse QLoRA products that read the same input (q/k/v, gate/up) into one `qlora::lora_linear_cat`.

Matches `qlora::lora_linear` nodes (made by fuse_lora) with the same base input (up to equal
dtype casts), scaling, 4-bit format, in_features and output dtype. LoRA inputs are shared when they
are equal casts (no dropout) and kept one per member otherwise (each dropout has its own mask). Produces one `lora_linear_cat` node whose
output holds the members' outputs side by side, and a `narrow` per member in its place.
Keeps: values and gradients (the op computes each member exactly as before); groups whose members
mix biased and unbiased products, or whose inputs are defined after the first member, stay
unfused. A member whose output is `.view`ed in a way a last-dim slice cannot serve gets a
`.contiguous()` copy first.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._match import example_value, graph_modules, is_op


def _canonical(node):
    """Casts of one value to one dtype compare equal: each QLoRALinear casts its input itself."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to":
        return ("to", _canonical(node.args[0]), node.args[1:], tuple(sorted(node.kwargs.items())))
    return node


def _key(node: fx.Node):
    x, _, _, _, nested, _, bias, _, _, scaling, quant_type, blocksize, shape, out_dtype = node.args[:14]
    return (_canonical(x), scaling, quant_type, blocksize, shape[1], out_dtype, nested is None, bias is None)


_HOISTABLE = {("call_method", "to"), ("call_function", torch.nn.functional.dropout)}


def _hoist(node: fx.Node, before: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Make `node` come before `before`, moving it (and what it needs) up if it is a cast or a
    dropout of values that are already there. False if that is not possible."""
    if order[node] < order[before]:
        return True
    if (node.op, node.target) not in _HOISTABLE:
        return False
    if not all(_hoist(a, before, order) for a in node.all_input_nodes):
        return False
    before.prepend(node)
    order[node] = order[before] - 0.5  # still before `before`, after what was there
    return True


def _inputs_ready(members: list[fx.Node], order: dict[fx.Node, int]) -> bool:
    """Everything the fused node reads (the first member's base input, every member's LoRA input
    and weights) defined before the first member, hoisting casts and dropouts where needed."""
    first = members[0]
    needed = [first.args[0]] + [a for m in members for a in m.all_input_nodes if a is not m.args[0]]
    return all(_hoist(a, first, order) for a in dict.fromkeys(needed))


def _view_safe(member: fx.Node, user: fx.Node) -> bool:
    """Can `user` (a .view of member's output) take a last-dim slice of a wider tensor?"""
    if not (user.op == "call_method" and user.target == "view"):
        return True
    src, out = example_value(member), example_value(user)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) or out.dim() < src.dim():
        return False
    return all(
        statically_known_true(a == b) for a, b in zip(out.shape[: src.dim() - 1], src.shape[:-1], strict=True)
    )


def _fuse(graph: fx.Graph, members: list[fx.Node]) -> None:
    args = [m.args for m in members]
    first = members[0]
    x, _, _, _, nested, _, bias, _, _, scaling, quant_type, blocksize, shape, out_dtype = first.args[:14]
    widths = [a[12][0] for a in args]
    lora_inputs = [a[1] for a in args]
    if len({_canonical(t) for t in lora_inputs}) == 1:  # no dropout: one shared LoRA input
        lora_inputs = lora_inputs[:1]
    with graph.inserting_before(first):
        bias_cat = None if bias is None else graph.call_function(torch.cat, ([a[6] for a in args],))
        stats = ([], []) if nested is None else ([a[4] for a in args], [a[5] for a in args])
        fused = graph.call_function(
            torch.ops.qlora.lora_linear_cat.default,
            (x, lora_inputs, [a[2] for a in args], [a[3] for a in args], *stats, bias_cat, [a[7] for a in args],
             [a[8] for a in args], scaling, quant_type, blocksize, widths, shape[1], out_dtype, "auto"),
        )  # fmt: skip
        start = 0
        for member, width in zip(members, widths, strict=True):
            piece = graph.call_function(torch.narrow, (fused, -1, start, width))
            if not all(_view_safe(member, u) for u in member.users):
                piece = graph.call_method("contiguous", (piece,))
            piece.meta.update(member.meta)
            member.replace_all_uses_with(piece)
            start += width
    for member in members:
        graph.erase_node(member)


def fuse_shared_input(gm: fx.GraphModule) -> int:
    """Fuse each group of products sharing an input in `gm` and its sub-graphs; returns the number
    of products that were merged into a group."""
    merged = 0
    for module in graph_modules(gm):
        graph = module.graph
        groups: dict[tuple, list[fx.Node]] = defaultdict(list)
        for node in graph.nodes:
            if is_op(node, torch.ops.qlora.lora_linear) and len(node.args) >= 14:
                groups[_key(node)].append(node)
        order = {n: i for i, n in enumerate(graph.nodes)}
        fused_here = 0
        for members in groups.values():
            if len(members) < 2 or not _inputs_ready(members, order):
                continue
            _fuse(graph, members)
            fused_here += len(members)
        if fused_here:
            graph.eliminate_dead_code()  # the other members' casts of the shared input
            graph.lint()
            module.recompile()
        merged += fused_here
    return merged
