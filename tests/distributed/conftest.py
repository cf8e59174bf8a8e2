"""One 2-rank training launch shared by the distributed tests (spawning ranks is the slow part):
both runs of `workers.RUNS`, a checkpoint of each after SAVE_AT steps, the adapters at the end."""

from __future__ import annotations

import pytest

from tests.distributed import launch, workers

STEPS, SAVE_AT = 4, 2


@pytest.fixture(scope="session")
def sharded_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    workers.make_folder(out)
    return out


@pytest.fixture(scope="session")
def sharded(sharded_out):
    """Each rank's results, by rank: {run: result}."""
    return launch.run_ranks(
        workers.train,
        world=2,
        timeout=240,
        steps=STEPS,
        runs=tuple(workers.RUNS),
        save_at=SAVE_AT,
        out=str(sharded_out),
    )
