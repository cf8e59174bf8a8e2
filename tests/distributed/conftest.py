"""The rank launches shared by the distributed tests (spawning ranks is the slow part):
- 2 ranks: both runs of `workers.RUNS`, a checkpoint of each after SAVE_AT steps, the adapters at the end;
- 3 ranks (`workers.reshard`): "adamw32" from scratch, and the 2-rank "adamw32" checkpoint resumed.

`make test` runs each test file whole in one of its pytest-xdist workers, and several files use
the launches: the first worker to need one runs it, under a lock, in a folder all workers share
(the session's base temporary folder, the parent of theirs), and saves the results there; the
others read them. Without xdist it is this process's base temporary folder."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.distributed import launch, workers

STEPS, SAVE_AT = 30, 2  # the 30 steps; each checkpoint after step 2, resumed to the end


def _root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # a worker's: <session's>/popen-gwN


def _once(tmp_path_factory, name: str, run: Callable[[Path], object]):
    """`run(shared folder)`'s result, computed by the first worker of the session that asks."""
    root = _root(tmp_path_factory)
    results = root / f"{name}-results.pt"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not results.exists():
            torch.save(run(root), results)
    return torch.load(results, weights_only=False)


def _two_ranks(root: Path) -> list:
    out = root / "dcp"
    out.mkdir(exist_ok=True)
    workers.make_folder(out)
    return launch.run_ranks(
        workers.train,
        world=2,
        timeout=480,  # Inductor compiles the "inductor" run's block (C++) on each rank
        steps=STEPS,
        runs=tuple(workers.RUNS),
        save_at=SAVE_AT,
        out=str(out),
    )


@pytest.fixture(scope="session")
def shared_launch(tmp_path_factory):
    """(the launch's output folder, each rank's results by rank: {run: result})."""
    return _root(tmp_path_factory) / "dcp", _once(tmp_path_factory, "dcp", _two_ranks)


@pytest.fixture(scope="session")
def sharded_out(shared_launch):
    return shared_launch[0]


@pytest.fixture(scope="session")
def sharded(shared_launch):
    """Each rank's results, by rank: {run: result}."""
    return shared_launch[1]


@pytest.fixture(scope="session")
def three_ranks(tmp_path_factory, sharded_out):
    """Each of 3 ranks' results (`workers.reshard`), by rank; after the 2-rank launch (its checkpoint)."""

    def run(root: Path) -> list:
        return launch.run_ranks(workers.reshard, world=3, timeout=240, steps=STEPS, out=str(sharded_out))

    return _once(tmp_path_factory, "reshard", run)


@pytest.fixture(scope="session")
def continued(sharded_out):
    """(model, result) of one process continuing the 2-rank "adamw32" checkpoint (`workers.continuation`),
    and what it logged."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("qlora_compile.distributed.checkpoint")
    logger.addHandler(handler)
    try:
        model, result = workers.continuation(STEPS, sharded_out / "adamw32")
    finally:
        logger.removeHandler(handler)
    return model, result, records
