"""`qlora-compile train` under `torchrun`: the process group, each rank's rows, sums over ranks.

`torchrun --nproc_per_node=N -m qlora_compile.tools.cli train CONFIG.yaml` starts N processes with
RANK, LOCAL_RANK and WORLD_SIZE set; each runs the same job. `batch_size` is per rank, as
Trainer's `per_device_train_batch_size`: the job draws global micro-batches of `batch_size x N`
rows in the order one process with that batch size would, and rank r trains rows r, r + N, ... of
each. Every rank's loss is its label tokens' sum divided by the step's global count over N, so
FSDP2's gradient average over ranks is one process's gradient on the whole global batch.

Without WORLD_SIZE (or with 1) everything here is a no-op: `SINGLE`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..errors import QLoRAError, UnsupportedError
from .data import IGNORE

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank `rank` of `world`; `owned`: the job created the group."""

    rank: int = 0
    world: int = 1
    owned: bool = False

    @property
    def main(self) -> bool:
        """Rank 0 writes what there is one of: metrics, plots, report, adapter, exports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = Ranks()


def world_from_env() -> int:
    """WORLD_SIZE as torchrun (or `accelerate launch`) sets it; 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device: torch.device) -> Ranks:
    """Join the job torchrun started (creating the default process group unless one exists: gloo
    on the CPU, nccl on CUDA, this rank's LOCAL_RANK device); SINGLE when there is one process."""
    import torch.distributed as dist

    if world_from_env() == 1:
        return SINGLE
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        check_launch(backend)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), owned)
    logger.info("rank %d of %d (%s)", ranks.rank, ranks.world, dist.get_backend())
    return ranks


# what torchrun (or `accelerate launch`) sets for each rank: env:// rendezvous reads them
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_launch(backend: str) -> None:
    """Raise UnsupportedError, in one line, when this process cannot join a `backend` job: a torch
    without torch.distributed or without that backend, or WORLD_SIZE set without the rest of what
    a launcher sets (a command started by hand, not by torchrun)."""
    import torch.distributed as dist

    world = os.environ.get("WORLD_SIZE")
    if not dist.is_available():
        raise UnsupportedError(f"WORLD_SIZE={world}, but this torch build has no torch.distributed")
    available = {"gloo": dist.is_gloo_available, "nccl": dist.is_nccl_available}[backend]()
    if not available:
        raise UnsupportedError(
            f"WORLD_SIZE={world}, but this torch build has no {backend} backend for torch.distributed "
            f"({'the CPU' if backend == 'gloo' else 'CUDA'} needs it)"
        )
    missing = [v for v in LAUNCH_VARIABLES if not os.environ.get(v)]
    if missing:
        raise UnsupportedError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            "start the job with torchrun --nproc_per_node=N (or unset WORLD_SIZE to train in one process)"
        )


def leave(ranks: Ranks) -> None:
    """Wait for every rank, then end the process group if the job created it (a gloo rank that
    leaves without the barrier can abort at exit)."""
    import torch.distributed as dist

    if ranks.distributed:
        dist.barrier()
        if ranks.owned:
            dist.destroy_process_group()


def rank0_first(ranks: Ranks, fn: Callable[[], T]) -> T:
    """`fn()` on rank 0, then on the others (which then find rank 0's caches: the tokenized data).
    An error of ours on rank 0 is raised on every rank, with its message, instead of leaving
    them waiting."""
    if not ranks.distributed:
        return fn()
    import torch.distributed as dist

    error, result = None, None
    if ranks.main:
        try:
            result = fn()
        except QLoRAError as e:
            error = e
    box = [None if error is None else (type(error), str(error))]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        kind, message = box[0]
        raise error if error is not None else kind(message)
    return result if ranks.main else fn()


def my_rows(batch: dict, ranks: Ranks) -> dict:
    """Rows rank, rank + world, ... of a collated batch. A rank left without rows (the last
    micro-batch of an epoch can be short) gets row 0 with every label ignored: it must still run
    the forward and backward (FSDP2 gathers and reduces in them), and adds nothing."""
    if not ranks.distributed:
        return batch
    rows = batch["input_ids"].shape[0]
    if ranks.rank < rows:
        pick = slice(ranks.rank, None, ranks.world)
        return {k: v[pick] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out["labels"] = torch.full_like(out["labels"], IGNORE)
    return out


def sum_over_ranks(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Each value summed over the ranks (in float64)."""
    if not ranks.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def agreed_signal(signum: int | None, ranks: Ranks, device: torch.device) -> int | None:
    """The signal any rank was stopped by (the largest number; None: none), the same on every rank,
    so that all stop after the same step and save the same checkpoint."""
    if not ranks.distributed:
        return signum
    import torch.distributed as dist

    t = torch.tensor([signum or 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t) or None
