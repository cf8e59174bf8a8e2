"""What each rank runs (module-level, so spawned processes find it), and the one-process reference."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

import qlora_compile
from qlora_compile import distributed
from tests.models import save_tiny, tiny_model

# fp32 end to end and no dropout: the sharded run must reproduce one process's numbers; the head
# and loss unfused on both sides but in the "fused" run
SETTINGS = {"backend": "aot_eager", "lora_dropout": 0.0, "compute_dtype": torch.float32, "r": 8, "lr": 1e-3,
            "fused_loss": False}  # fmt: skip
BATCH, SEQ = 6, 16  # 6 rows: 3 per rank on 2 ranks, 2 on 3

# name -> (model overrides, compile overrides). "adamw32": intermediate_size 65, so the MLP's 65
# absmax codes split unevenly (33 + 32) and FSDP2 pads them. "paged8": 8-bit states paged out
# (a 64 KiB budget); every LoRA tensor has 8192 elements (2 x 4096 per rank), so each rank's
# 256-element state blocks are one process's blocks.
# "folder": the adamw32 model saved and converted to a 4-bit folder (`make_folder`), loaded on
# meta by every rank, each reading its rows in shard(); the one-process run loads it whole.
# "inductor": compile()'s defaults as the README's recipe runs them (backend "inductor", the fused
# head and loss, automatic dynamic shapes) but for fp32 and dropout 0 (as everywhere here), on
# batches whose sizes and lengths change (`SHAPES`).
RUNS = {
    "adamw32": ({"intermediate_size": 65}, {}),
    "folder": ({"intermediate_size": 65}, {}),
    "replicated": ({"intermediate_size": 65}, {}),  # distributed.replicate: DDP's layout
    "bf16": ({"intermediate_size": 65}, {"compute_dtype": torch.bfloat16}),  # shard(mixed_precision=bf16)
    "fused": ({"intermediate_size": 65}, {"fused_loss": True}),  # the head and loss fused, both sides
    "paged8": (
        {"hidden_size": 128, "intermediate_size": 128, "num_key_value_heads": 4},
        {"r": 64, "optim_bits": 8, "paged": True, "device_budget": 2**16, "max_grad_norm": 0.15},
    ),
    "inductor": ({}, {"backend": "inductor", "fused_loss": True}),
}
# (rows, tokens) of the "inductor" run's global batches, in turn: the second changes both, so
# Dynamo recompiles once with both sizes symbolic, and that graph serves the rest (as a loader
# padding each batch to its longest row gives them); the other runs' batches are all BATCH x SEQ
SHAPES = {"inductor": [(6, 16), (4, 24), (6, 12), (4, 20)]}
# the one-process reference's compile overrides: the "inductor" run's compiles with aot_eager (what
# compiles the reference is not under test; Inductor's fp32 kernels round within a few ulps of it),
# which spares rank 0 a third compile
REFERENCE = {"inductor": {"backend": "aot_eager"}}


def batches(steps: int, run: str = "adamw32") -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    cycle = SHAPES.get(run, [(BATCH, SEQ)])
    shapes = [cycle[i % len(cycle)] for i in range(steps)]
    ids = [torch.randint(0, 128, shape, generator=g) for shape in shapes]
    return [{"input_ids": x, "labels": x} for x in ids]


def rank_slice(batch: dict, rank: int, world: int) -> dict:
    per = len(batch["input_ids"]) // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def make_folder(out: Path) -> Path:
    """The "folder" run's model as a bitsandbytes 4-bit folder, `out/bnb4`."""
    save_tiny(out / "dense", "llama", **RUNS["folder"][0])
    qlora_compile.convert_checkpoint(out / "dense", out / "bnb4", progress=False)
    return out / "bnb4"


def new_model(distributed_: bool, run: str = "adamw32", out=None, **settings) -> torch.nn.Module:
    model_overrides, compile_overrides = RUNS[run]
    if run == "folder":
        torch.manual_seed(0)  # LoRA's draws: the same in both processes, whenever they come
        model = qlora_compile.load_quantized(Path(out) / "bnb4", device="meta" if distributed_ else "cpu")
    else:
        model = tiny_model("llama", **model_overrides)
    return qlora_compile.compile(
        model, distributed=distributed_, **{**SETTINGS, **compile_overrides, **settings}
    )


def storage(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The packed bytes and absmax codes of every 4-bit layer, whole (gathered when sharded)."""
    return {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v
        for k, v in model.state_dict().items()
        if k.endswith(("weight_packed", "weight_absmax"))
    }


def _train(
    model: torch.nn.Module,
    steps: int,
    part=lambda batch: batch,
    start: int = 0,
    save: tuple = (None, None),
    run: str = "adamw32",
) -> dict:
    """Steps `start`..`steps` of `run`; `save`: (step k, folder) to checkpoint after step k."""
    model.train()
    losses, norms, draws = [], [], None
    for i, batch in enumerate(batches(steps, run)[start:], start):
        loss = model(**part(batch)).loss
        loss.backward()
        norms.append(model.qlora.step())
        losses.append(loss.item())
        if i + 1 == save[0]:
            model.qlora.save_checkpoint(save[1])
            draws = torch.rand(4)  # what the RNG gives next: a resumed run must draw the same
    report = model.qlora.report()
    optimizer = model.qlora.optimizer
    return {
        "losses": losses,
        "norms": norms,
        "draws": draws,
        "storage": storage(model),
        "graphs": report.graphs,
        "passes": dict(report.passes),
        "compiled_blocks": report.compiled_blocks,
        "fused_loss": report.fused_loss,
        "max_grad_norm": model.qlora.config.max_grad_norm,
        "states_8bit": sum(rec.bits == 8 for rec in optimizer._records.values()),
        "page_ins": optimizer.pager.page_ins if optimizer.pager is not None else 0,
    }


def one_process(steps: int, run: str = "adamw32", adapter=None, out=None) -> dict:
    """The reference: one process, the full batch each step (its adapter saved to `adapter`),
    with `REFERENCE[run]`'s compile overrides."""
    model = new_model(False, run, out, **REFERENCE.get(run, {}))
    result = _train(model, steps, run=run)
    result["run"] = run
    result["lora"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if adapter:
        model.qlora.save_adapter(adapter)
    return result


def train(
    rank: int,
    world: int,
    steps: int,
    runs: tuple[str, ...] = ("adamw32",),
    save_at: int | None = None,
    out=None,
) -> dict:
    """Sharded training, each rank on its slice of each batch; one result per run. With `save_at`,
    a checkpoint of each run after that step (`out/<run>`), and the adapter at the end (`out/adapter-<run>`).
    Rank 0 also runs the one-process references (`reference`), in a process Dynamo has warmed up."""
    results = {run: _sharded(rank, world, steps, run, save_at, out) for run in runs}
    if rank == 0:
        adapter = lambda run: f"{out}/reference-adapter-{run}" if save_at else None  # noqa: E731
        results["reference"] = {run: one_process(steps, run, adapter(run), out) for run in runs}
    return results


def _sharded(rank: int, world: int, steps: int, run: str, save_at: int | None, out) -> dict:
    model = new_model(True, run, out)
    _distribute(run)(model)
    before = distributed.storage_bytes(model)
    save = (save_at, f"{out}/{run}") if save_at else (None, None)
    result = _train(model, steps, lambda batch: rank_slice(batch, rank, world), save=save, run=run)
    if save_at:
        model.qlora.save_adapter(f"{out}/adapter-{run}")
    result.update(
        lora=distributed.gathered_lora(model),
        bytes_before=before,
        bytes_after=distributed.storage_bytes(model),
        bytes_read=model.qlora.bytes_read,
        local_bytes=local_bytes(model),
    )
    return result


def reshard(rank: int, world: int, steps: int, out) -> dict:
    """Another world size than the shared launch's: "adamw32" trained from scratch, then the shared
    launch's "adamw32" checkpoint loaded into the same model and trained to the end ("resumed"):
    the load must replace all the state that training made (one compiled model: no recompile)."""
    model = new_model(True, "adamw32", out)
    distributed.shard(model)
    result = _train(model, steps, lambda batch: rank_slice(batch, rank, world))
    result.update(
        lora=distributed.gathered_lora(model),
        bytes_held=distributed.storage_bytes(model),
        local_bytes=local_bytes(model),
    )
    start = model.qlora.load_checkpoint(f"{out}/adamw32")
    resumed = _train(model, steps, lambda batch: rank_slice(batch, rank, world), start=start)
    resumed.update(start=start, lora=distributed.gathered_lora(model))
    return {"adamw32": result, "resumed": resumed}


def local_bytes(model: torch.nn.Module) -> dict[str, int]:
    """{name: bytes this rank holds} of every parameter (its local shard) and buffer."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    local = {n: t.to_local() if hasattr(t, "to_local") else t for n, t in tensors}
    return {n: t.numel() * t.element_size() for n, t in local.items()}


def continuation(steps: int, checkpoint) -> tuple[torch.nn.Module, dict]:
    """One process (no process group: DCP reads alone) loads a sharded run's "adamw32"
    checkpoint and trains on the whole batches to the end: (model, result)."""
    model = new_model(False, "adamw32")
    start = model.qlora.load_checkpoint(checkpoint)
    result = _train(model, steps, start=start)
    result.update(start=start, lora=distributed.gathered_lora(model))
    return model, result


def resume(rank: int, world: int, steps: int, out, runs: tuple[str, ...]) -> dict:
    """Fresh processes: each run rebuilt, sharded, loaded from `out/<run>`, trained to the end."""
    results = {}
    for run in runs:
        model = new_model(True, run, out)
        _distribute(run)(model)
        torch.manual_seed(1234 + rank)  # another RNG state than the saved one: the load must restore it
        start = model.qlora.load_checkpoint(f"{out}/{run}")
        draws = torch.rand(4)
        result = _train(model, steps, lambda batch: rank_slice(batch, rank, world), start=start, run=run)
        result.update(start=start, draws=draws, lora=distributed.gathered_lora(model))
        results[run] = result
    return results


def _distribute(run: str):
    if run == "bf16":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return lambda model: distributed.shard(
            model, mixed_precision=MixedPrecisionPolicy(param_dtype=torch.bfloat16)
        )
    return distributed.replicate if run == "replicated" else distributed.shard


def die(rank: int, world: int) -> str | None:
    """One step on both ranks, then rank 1 exits (as a killed rank does) and rank 0 steps again:
    what it raised, and how soon."""
    model = new_model(True)
    distributed.shard(model)
    model.train()
    batch = rank_slice(batches(1)[0], rank, world)
    for _ in range(2):
        start = time.monotonic()
        try:
            model(**batch).loss.backward()
            model.qlora.step()
        except RuntimeError as e:
            return f"{time.monotonic() - start:.1f} s: {e}"
        if rank == 1:
            os._exit(3)
    return None
