"""Graph passes run by qlora_compile's torch.compile backend, one pass per file.

- `fuse_lora`: base product + LoRA branch -> one `qlora::lora_linear` node.
- `fuse_shared_input`: products that read the same input (q/k/v, gate/up) -> one node.
- `choose_kernel`: fix each product's kernel from its shape and device.

`make_backend` runs them in that order on every graph Dynamo captures (sub-graphs included),
adds their counts to the compile report, then hands the graph to Inductor / aot_eager / eager
(for eager, after `eager_checkpoint`: checkpointed layers recompute with the forward's random
state; for Inductor, after `hash_dropouts`: CPU dropout masks from a counter hash instead of
Inductor's per-element Philox engines). With `activation_memory_budget`, AOTAutograd partitions
under that budget (for aot_eager through Dynamo's `aot_eager_decomp_partition`, which partitions
as Inductor does).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import fx

from .choose_kernel import choose_kernel
from .eager_checkpoint import eager_checkpoint
from .fuse_lora import fuse_lora
from .fuse_shared_input import fuse_shared_input
from .hash_dropout import hash_dropouts

__all__ = ["choose_kernel", "fuse_lora", "fuse_shared_input", "make_backend", "run_passes"]


def run_passes(gm: fx.GraphModule, after: Callable[[str], None] | None = None) -> Counter:
    """Run every pass on `gm` in order; returns the rewrite counts by name ("fuse_lora",
    "fuse_shared_input", "kernel:<name>"). `after(pass_name)`, if given, is called after each pass
    (`qlora_compile.inspect` records there which pass made which node)."""
    counts: Counter = Counter()
    for name, run in (("fuse_lora", fuse_lora), ("fuse_shared_input", fuse_shared_input)):
        counts[name] += run(gm)
        if after is not None:
            after(name)
    for kernel, n in choose_kernel(gm).items():
        counts[f"kernel:{kernel}"] += n
    if after is not None:
        after("choose_kernel")
    return counts


def make_backend(config, report):
    """A torch.compile backend that runs our passes, records counts in `report`, then compiles."""

    def backend(gm: fx.GraphModule, example_inputs):
        counts = run_passes(gm)
        report.graphs += 1
        for name, n in counts.items():
            report.passes[name] = report.passes.get(name, 0) + n
        if config.backend == "eager":
            eager_checkpoint(gm)
            return gm.forward
        if config.backend == "inductor" and (n := hash_dropouts(gm)):
            report.passes["hash_dropout"] = report.passes.get("hash_dropout", 0) + n
        budget = config.activation_memory_budget
        if budget is None:
            return torch._dynamo.lookup_backend(config.backend)(gm, example_inputs)
        # aot_eager saves every activation (its partitioner has no budget); this one partitions
        # by min-cut, as Inductor does, under the budget
        name = "aot_eager_decomp_partition" if config.backend == "aot_eager" else config.backend
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return torch._dynamo.lookup_backend(name)(gm, example_inputs)

    return backend
