"""DCP checkpoints of a 2-rank sharded run: a resume in fresh processes reproduces the
uninterrupted run bit for bit (losses, norms, LoRA weights, RNG), for 32-bit states and for paged
8-bit ones; the rank-0 PEFT adapter equals one process's."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import launch, workers
from tests.distributed.conftest import SAVE_AT, STEPS

RUNS = ("adamw32", "paged8", "replicated")  # "folder" trains as adamw32 does, from a folder loaded by rows


@pytest.fixture(scope="module")
def resumed(sharded_out, sharded):
    """Fresh ranks resuming from the shared launch's checkpoints (taken after SAVE_AT steps)."""
    return launch.run_ranks(
        workers.resume, world=2, timeout=240, steps=STEPS, out=str(sharded_out), runs=RUNS
    )


@pytest.mark.parametrize("run", RUNS)
def test_resume_is_bit_identical(sharded_out, sharded, resumed, run):
    runs = tuple(workers.RUNS)  # every run of the shared launch saved a checkpoint and an adapter
    names = [
        "bnb4",
        "dense",
        *runs,
        *(f"adapter-{r}" for r in runs),
        *(f"reference-adapter-{r}" for r in runs),
    ]
    assert sorted(p.name for p in sharded_out.iterdir()) == sorted(names)  # no .partial left
    for w, r in zip(sharded, resumed, strict=True):
        w, r = w[run], r[run]
        assert r["start"] == SAVE_AT
        assert r["losses"] == w["losses"][SAVE_AT:]  # exactly
        assert r["norms"] == w["norms"][SAVE_AT:]
        assert torch.equal(r["draws"], w["draws"])
        assert r["lora"].keys() == w["lora"].keys()
        for name in w["lora"]:
            assert torch.equal(r["lora"][name], w["lora"][name]), name
    assert sharded[0][run]["losses"][SAVE_AT:] != sharded[0][run]["losses"][:SAVE_AT]


def test_rank0_adapter_equals_one_process(sharded_out, sharded):
    ours, reference = sharded_out / "adapter-adamw32", sharded_out / "reference-adapter-adamw32"
    want = load_file(reference / "adapter_model.safetensors")
    got = load_file(ours / "adapter_model.safetensors")
    assert got.keys() == want.keys() and len(want) == 28
    for key in want:  # the sharded run's weights are a few ulps off one process's (test_shard)
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)
    assert (ours / "adapter_config.json").read_text() == (reference / "adapter_config.json").read_text()
    for key in want:  # written from the gathered weights at the end of the run
        name = key.removeprefix("base_model.model.")
        torch.testing.assert_close(got[key], sharded[0]["adamw32"]["lora"][name], rtol=0, atol=0)


def test_a_2_rank_checkpoint_resumes_in_one_process(continued, sharded, tmp_path):
    """World size 2 -> 1: DCP reshards the LoRA weights and 32-bit states; one process on the
    whole batch continues as the 2 ranks did (within the ulps of test_shard)."""
    model, result, logged = continued
    assert result["start"] == SAVE_AT
    assert any("RNG states not restored" in m for m in logged)
    ranks = [r["adamw32"] for r in sharded]
    mean = [sum(r["losses"][i] for r in ranks) / 2 for i in range(SAVE_AT, STEPS)]
    assert result["losses"] == pytest.approx(mean, abs=2e-6)
    assert result["norms"] == pytest.approx(ranks[0]["norms"][SAVE_AT:], abs=2e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), ranks[0]["lora"][name], rtol=0, atol=1e-5)
    # and one process saves and loads its own checkpoints (DCP without a process group)
    model.qlora.save_checkpoint(tmp_path / "one")
    fresh = workers.new_model(False, "adamw32")
    assert fresh.qlora.load_checkpoint(tmp_path / "one") == STEPS
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
    theirs, ours = fresh.qlora.optimizer.state_dict(), model.qlora.optimizer.state_dict()
    assert theirs["state"].keys() == ours["state"].keys() and len(ours["state"]) == 28
    for i, entry in ours["state"].items():
        assert all(torch.equal(entry[k], theirs["state"][i][k]) for k in entry), i
