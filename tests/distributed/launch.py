"""Run a function on N gloo ranks in spawned processes, with a deadline, and collect what each returns.

    results = run_ranks(workers.train, world=2, timeout=120, steps=3)

Each rank initializes the default process group (gloo, a free local port), calls
`fn(rank, world, **kwargs)`, waits at a barrier (a gloo rank can abort at exit without one), and
saves the result with `torch.save`. A rank that raises, dies or outlives the deadline fails the
caller with its traceback; the ranks still running are killed (they would wait on the dead one).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world: int, port: int, out: str, kwargs: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        result = fn(rank, world, **kwargs)
        torch.save(result, Path(out) / f"{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (Path(out) / f"{rank}.err").write_text(traceback.format_exc())
        raise


def run_ranks(fn, world: int, *, timeout: float = 120, failing: bool = False, **kwargs) -> list:
    """`fn(rank, world, **kwargs)` on `world` ranks; their results, by rank. `fn` must be a
    module-level function (spawn pickles it by name). `failing`: a launch expected to fail
    (within the deadline still): [(exit code, traceback or None, result or None)] by rank."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        port = _free_port()
        procs = [
            ctx.Process(target=_rank_main, args=(fn, rank, world, port, out, kwargs)) for rank in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0))
        late = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        out = Path(out)
        if failing and not late:
            return [
                (p.exitcode, _read(out / f"{r}.err", Path.read_text), _read(out / f"{r}.pt", _load))
                for r, p in enumerate(procs)
            ]
        errors = [
            f"rank {r}:\n{(out / f'{r}.err').read_text()}"
            for r in range(world)
            if (out / f"{r}.err").exists()
        ]
        assert not errors, "\n".join(errors)
        assert not late, f"ranks {late} still running after {timeout} s (killed)"
        codes = [p.exitcode for p in procs]
        assert codes == [0] * world, f"exit codes {codes}"
        return [_load(out / f"{rank}.pt") for rank in range(world)]


def _load(path: Path):
    return torch.load(path, weights_only=False)


def _read(path: Path, read):
    return read(path) if path.exists() else None
