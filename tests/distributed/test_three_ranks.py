"""FSDP2 on 3 gloo ranks (one launch, `workers.reshard`): training equals one process, each rank
holds a third of the 4-bit bytes, and the 2-rank launch's DCP checkpoint resumes on 3 ranks as
one process continues it (DCP reshards the LoRA weights and 32-bit states from 2 shards to 3)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.conftest import SAVE_AT, STEPS

# fp32, and the ranks' mean sums the tokens' losses in another order than one process: a few ulps
# of a loss near 4.8 (one ulp: 4.8e-7); the issue asks for 1e-5 and 1e-6 after a resharded resume
TOL, RESHARD_TOL = 1e-5, 1e-6


def _mean(ranks: list[dict], key: str = "losses") -> list[float]:
    return [sum(r[key][i] for r in ranks) / len(ranks) for i in range(len(ranks[0][key]))]


def test_3_ranks_train_as_one_process(three_ranks, sharded):
    ranks, ref = [r["adamw32"] for r in three_ranks], sharded[0]["reference"]["adamw32"]
    assert _mean(ranks) == pytest.approx(ref["losses"], abs=TOL)
    assert len({tuple(r["losses"]) for r in ranks}) == 3  # each rank trained on its own third
    for r in ranks:
        assert r["norms"] == pytest.approx(ref["norms"], abs=TOL)  # clipped each step by the global norm
        assert min(r["norms"]) > r["max_grad_norm"]
        assert r["graphs"] == ref["graphs"] == 1 and r["passes"] == ref["passes"]
    for name, want in ref["lora"].items():
        torch.testing.assert_close(ranks[0]["lora"][name], want, rtol=0, atol=1e-5)
        assert all(torch.equal(r["lora"][name], ranks[0]["lora"][name]) for r in ranks)


def test_each_of_3_ranks_holds_a_third_of_the_4bit_bytes(three_ranks, sharded):
    ranks, ref = [r["adamw32"] for r in three_ranks], sharded[0]["reference"]["adamw32"]
    total = sum(t.numel() * t.element_size() for t in ref["storage"].values())
    held = [r["bytes_held"][0] for r in ranks]
    assert sum(held) == total and all(r["bytes_held"][1] == total for r in ranks)
    # FSDP2 gives each of the first ranks ceil(rows / 3) rows of a tensor: under one 1-byte row per tensor more
    assert max(held) <= total / 3 + len(ref["storage"])
    assert min(held) >= total / 3 - 2 * len(ref["storage"])
    for r in ranks:  # gathered after training: one process's bytes
        for name, want in ref["storage"].items():
            assert torch.equal(r["storage"][name], want), name


def test_a_2_rank_checkpoint_resumes_on_3_ranks(three_ranks, sharded, continued):
    """World size 2 -> 3, against one process continuing the same checkpoint on the whole batch."""
    ranks, cont = [r["resumed"] for r in three_ranks], continued[1]
    assert [r["start"] for r in ranks] == [SAVE_AT] * 3
    assert len(cont["losses"]) == STEPS - SAVE_AT
    assert _mean(ranks) == pytest.approx(cont["losses"], abs=RESHARD_TOL)
    for r in ranks:
        assert r["norms"] == pytest.approx(cont["norms"], abs=RESHARD_TOL)
    two = [r["adamw32"] for r in sharded]  # and as the 2 ranks went on from there
    assert _mean(ranks) == pytest.approx(_mean(two)[SAVE_AT:], abs=RESHARD_TOL)
    for name, want in cont["lora"].items():
        torch.testing.assert_close(ranks[0]["lora"][name], want, rtol=0, atol=1e-5)
