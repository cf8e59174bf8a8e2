"""Choose the kernel of each 4-bit product from its shape and device.

Matches every `qlora::linear`, `qlora::lora_linear` and `qlora::lora_linear_cat` node whose input
has a static number of rows.
Produces the same call with its `impl` argument fixed: on CUDA "gemv" for one row, "fused" below
1024 rows, "dequant_matmul" above; on CPU "dequant_matmul" (dequantize into a workspace, then BLAS).
Keeps: nodes with a symbolic row count stay "auto" and choose per call at run time.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx

from ._match import example_value, graph_modules, is_op

# position of `impl` (the kernel) in each op
_KERNEL_ARG = {"linear": 9, "lora_linear": 14, "lora_linear_cat": 15}


def _rows(x: torch.Tensor) -> int | None:
    rows = 1
    for size in x.shape[:-1]:
        if not isinstance(size, int):
            return None
        rows *= size
    return rows


def _choose(x: torch.Tensor) -> str | None:
    rows = _rows(x)
    if rows is None:
        return None
    if x.device.type != "cuda":
        return "dequant_matmul"
    from ..kernels.triton_matmul import choose

    return choose(rows)


def choose_kernel(gm: fx.GraphModule) -> Counter:
    """Fix the kernel of each 4-bit product node; returns a count per chosen kernel."""
    counts: Counter = Counter()
    for module in graph_modules(gm):
        changed = False
        for node in module.graph.nodes:
            name = next((n for n in _KERNEL_ARG if is_op(node, getattr(torch.ops.qlora, n))), None)
            if name is None:
                continue
            x = example_value(node.args[0])
            kernel = _choose(x) if isinstance(x, torch.Tensor) else None
            if kernel is None:
                counts["auto"] += 1
                continue
            position = _KERNEL_ARG[name]
            assert len(node.args) >= position, node.format_node()  # every argument before impl is given
            node.args = (*node.args[:position], kernel)
            counts[kernel] += 1
            changed = True
        if changed:
            module.recompile()
    return counts
