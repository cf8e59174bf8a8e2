"""One 2-rank training launch shared by the distributed tests (spawning ranks is the slow part):
both runs of `workers.RUNS`, a checkpoint of each after SAVE_AT steps, the adapters at the end.

`make test` runs each test file whole in one of its pytest-xdist workers, and three files use
the launch: the first worker to need it runs it, under a lock, in a folder all workers share (the
session's base temporary folder, the parent of theirs), and saves the results there; the others
read them. Without xdist it is this process's base temporary folder."""

from __future__ import annotations

import fcntl
import os

import pytest
import torch

from tests.distributed import launch, workers

STEPS, SAVE_AT = 4, 2


@pytest.fixture(scope="session")
def shared_launch(tmp_path_factory):
    """(the launch's output folder, each rank's results by rank: {run: result})."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's base is <session's>/popen-gwN
        root = root.parent
    out, results = root / "dcp", root / "dcp-results.pt"
    with open(root / "dcp.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not results.exists():
            out.mkdir(exist_ok=True)
            workers.make_folder(out)
            ranks = launch.run_ranks(
                workers.train, world=2, timeout=240, steps=STEPS, runs=tuple(workers.RUNS),
                save_at=SAVE_AT, out=str(out),
            )  # fmt: skip
            torch.save(ranks, results)
    return out, torch.load(results, weights_only=False)


@pytest.fixture(scope="session")
def sharded_out(shared_launch):
    return shared_launch[0]


@pytest.fixture(scope="session")
def sharded(shared_launch):
    """Each rank's results, by rank: {run: result}."""
    return shared_launch[1]
