"""DCP checkpoints of a 2-rank sharded run: a resume in fresh processes reproduces the
uninterrupted run bit for bit (losses, norms, LoRA weights, RNG), for 32-bit states and for paged
8-bit ones; the rank-0 PEFT adapter equals one process's."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import launch, workers

STEPS, SAVE_AT = 4, 2
RUNS = tuple(workers.RUNS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    whole = launch.run_ranks(
        workers.train, world=2, timeout=240, steps=STEPS, runs=RUNS, save_at=SAVE_AT, out=str(out)
    )
    resumed = launch.run_ranks(workers.resume, world=2, timeout=240, steps=STEPS, out=str(out), runs=RUNS)
    return out, whole, resumed


@pytest.mark.parametrize("run", RUNS)
def test_resume_is_bit_identical(runs, run):
    out, whole, resumed = runs
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*RUNS, *(f"adapter-{r}" for r in RUNS)]
    )  # no .partial
    for w, r in zip(whole, resumed, strict=True):
        w, r = w[run], r[run]
        assert r["start"] == SAVE_AT
        assert r["losses"] == w["losses"][SAVE_AT:]  # exactly
        assert r["norms"] == w["norms"][SAVE_AT:]
        assert torch.equal(r["draws"], w["draws"])
        assert r["lora"].keys() == w["lora"].keys()
        for name in w["lora"]:
            assert torch.equal(r["lora"][name], w["lora"][name]), name
    assert whole[0][run]["losses"][SAVE_AT:] != whole[0][run]["losses"][:SAVE_AT]


def test_rank0_adapter_equals_one_process(runs, tmp_path):
    out, whole, _ = runs
    workers.one_process_adapter(STEPS, tmp_path)
    want = load_file(tmp_path / "adapter_model.safetensors")
    got = load_file(out / "adapter-adamw32" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and len(want) == 28
    for key in want:  # the sharded run's weights are a few ulps off one process's (test_shard)
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=2e-6)
    assert (out / "adapter-adamw32" / "adapter_config.json").read_text() == (
        tmp_path / "adapter_config.json"
    ).read_text()
    for key in want:  # written from the gathered weights of the end of the run
        name = key.removeprefix("base_model.model.")
        torch.testing.assert_close(got[key], whole[0]["adamw32"]["lora"][name], rtol=0, atol=0)
