"""What each rank runs (module-level, so spawned processes find it), and the one-process reference."""

from __future__ import annotations

import torch

import qlora_compile
from qlora_compile import distributed
from tests.models import tiny_model

# fp32 end to end and no dropout: the sharded run must reproduce one process's numbers
SETTINGS = {"backend": "aot_eager", "lora_dropout": 0.0, "compute_dtype": torch.float32, "r": 8, "lr": 1e-3}
BATCH, SEQ = 4, 16


def batches(steps: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 128, (BATCH, SEQ), generator=g) for _ in range(steps)]
    return [{"input_ids": x, "labels": x} for x in ids]


def rank_slice(batch: dict, rank: int, world: int) -> dict:
    per = BATCH // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def new_model(distributed_: bool, **settings) -> torch.nn.Module:
    # intermediate_size 65: the MLP's 65 absmax codes split unevenly (33 + 32), so FSDP2 pads them
    model = tiny_model("llama", intermediate_size=65)
    return qlora_compile.compile(model, distributed=distributed_, **{**SETTINGS, **settings})


def one_process(steps: int, **settings) -> dict:
    """The reference: one process, the full batch each step."""
    model = new_model(False, **settings)
    model.train()
    losses, norms = [], []
    for batch in batches(steps):
        loss = model(**batch).loss
        loss.backward()
        norms.append(model.qlora.step())
        losses.append(loss.item())
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    report = model.qlora.report()
    return {
        "losses": losses,
        "norms": norms,
        "lora": lora,
        "storage": storage(model),
        "graphs": report.graphs,
        "passes": dict(report.passes),
    }


def storage(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The packed bytes and absmax codes of every 4-bit layer, whole (gathered when sharded)."""
    return {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v
        for k, v in model.state_dict().items()
        if k.endswith(("weight_packed", "weight_absmax"))
    }


def train(rank: int, world: int, steps: int, **settings) -> dict:
    """Sharded training on this rank's slice of each batch."""
    model = new_model(True, **settings)
    distributed.shard(model)
    before = distributed.storage_bytes(model)
    model.train()
    losses, norms = [], []
    for batch in batches(steps):
        loss = model(**rank_slice(batch, rank, world)).loss
        loss.backward()
        norms.append(model.qlora.step())
        losses.append(loss.item())
    report = model.qlora.report()
    return {
        "losses": losses,
        "norms": norms,
        "lora": distributed.gathered_lora(model),
        "bytes_before": before,
        "bytes_after": distributed.storage_bytes(model),
        "storage": storage(model),
        "graphs": report.graphs,
        "passes": dict(report.passes),
        "compiled_blocks": report.compiled_blocks,
    }
