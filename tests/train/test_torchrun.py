"""`torchrun --nproc_per_node=2 -m qlora_compile.tools.cli train`: 2 gloo ranks with `batch_size` 2
each equal one process with `batch_size` 4 (losses, gradient norms, eval losses within 1e-5 in fp32,
gradient accumulation and the eval split included); rank 0 alone writes metrics, report, plot and
adapter; checkpoints go through DCP and a resume reproduces the run bit for bit.

The command as the README gives it: `train`'s defaults (Inductor, C++ on this CPU; symbolic sizes
from the first step; the fused head and loss; batches of the examples' own lengths), but for fp32
(the model's dtype and the 4-bit products' compute dtype, bf16 by default) and dropout 0, which
make the runs comparable. The one-process reference runs eager.

The data split leaves 20 training examples, a multiple of the global micro-batch (2 ranks x 2), so
that every rank's batch has 2 rows: a 1-row batch (the end of an epoch of 18) would compile two more
graphs per rank, one for the batch size 1 that Dynamo specializes, one for the attention mask that
transformers drops when nothing is padded, and a resumed launch would compile them again (65-88 s).
With it, the resumed launch finds every graph in Inductor's cache and its run is bit for bit."""

import json
import subprocess
import sys

import pytest
import torch.distributed
from safetensors.torch import load_file

from qlora_compile.tools import cli

STEPS = 4
EVAL_SPLIT = "0.167"  # 4 of the 24 examples held out, 20 left to train on
# fp32; the ranks' losses are summed in float64 over ranks, one process sums the tokens in another
# order, and Inductor's kernels round otherwise than eager: a few ulps of a loss near 11
TOL = 1e-5


def argv(model, data_file, out, batch_size: int, *extra) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data_file), "--output_dir", str(out),
            "--dtype", "float32", "--qlora.compute_dtype", "float32", "--qlora.r", "8", "--qlora.lr", "1e-3",
            "--qlora.lora_dropout", "0.0", "--max_steps", str(STEPS), "--batch_size", str(batch_size),
            "--grad_accum", "2", "--eval_split", EVAL_SPLIT, "--eval_every", "2", "--save_every", "2",
            "--no-progress", *extra]  # fmt: skip


def torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return subprocess.run(
        [*cmd, "-m", "qlora_compile.tools.cli", *args], capture_output=True, text=True, timeout=300
    )


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def series(out, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows(out) if key in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_lm, chat_jsonl):
    """(one process with batch_size 4, 2 ranks with batch_size 2): their output folders."""
    root = tmp_path_factory.mktemp("torchrun")
    # the reference: one process, eager (what it compiles is not under test here; Inductor in fp32
    # computes within a few ulps of it)
    assert cli.main(argv(tiny_lm, chat_jsonl, root / "one", 4, "--qlora.backend", "eager")) == 0
    proc = torchrun(*argv(tiny_lm, chat_jsonl, root / "two", 2))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "one", root / "two"


def test_2_ranks_train_as_one_process_with_the_global_batch(runs):
    one, two = runs
    for key in ("loss", "grad_norm", "eval_loss"):
        got, want = series(two, key), series(one, key)
        assert [s for s, _ in got] == [s for s, _ in want] and len(want) >= 2, key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=TOL), key
    assert series(two, "lr") == series(one, "lr") and series(two, "tokens") == series(one, "tokens")
    ours, theirs = (load_file(f / "adapter" / "adapter_model.safetensors") for f in runs)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert (ours[key] - theirs[key]).abs().max() < 1e-5, key
    assert any(t.abs().sum() > 0 for k, t in ours.items() if "lora_B" in k)  # it trained


def test_rank_0_writes_the_outputs_once(runs):
    _, two = runs
    report = json.loads((two / "report.json").read_text())
    assert report["steps"] == STEPS and report["loss_last"] == series(two, "loss")[-1][1]
    assert len(rows(two)) == len({json.dumps(r, sort_keys=True) for r in rows(two)})  # each line once
    assert (two / "loss.png").is_file() and (two / "adapter" / "adapter_config.json").is_file()
    for step in (2, 4):  # DCP's sharded state instead of optimizer.safetensors
        ckpt = two / f"checkpoint-{step}"
        assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "optimizer.safetensors").exists()
        assert json.loads((ckpt / "run.json").read_text())["world_size"] == 2
    assert not list(two.glob("*.partial"))


def test_a_2_rank_checkpoint_resumes_bit_for_bit(runs, tiny_lm, chat_jsonl, tmp_path, capsys):
    _, two = runs
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(two) if r["step"] <= 2))
    ckpt = str(two / "checkpoint-2")
    # in one process: refused with one line, before anything is written
    assert cli.main(argv(tiny_lm, chat_jsonl, out, 2, "--resume", ckpt)) == 2
    assert "trained on 2 rank(s), this run has 1" in capsys.readouterr().err
    proc = torchrun(*argv(tiny_lm, chat_jsonl, out, 2, "--resume", ckpt))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for key in ("loss", "grad_norm", "eval_loss", "lr"):
        assert series(out, key) == series(two, key), key


def test_an_error_on_rank_0_ends_every_rank_with_one_line(tiny_lm, tmp_path):
    """Rank 0 checks and tokenizes the data first (the others then read its caches): its error is
    every rank's, said once per rank, and no rank waits for the others (the timeout would fail it)."""
    proc = torchrun(*argv(tiny_lm, tmp_path / "missing.jsonl", tmp_path / "out", 2))
    assert proc.returncode != 0
    for rank in range(2):
        line = (
            f"qlora-compile train (rank {rank} of 2): data file {tmp_path / 'missing.jsonl'} does not exist"
        )
        assert line in proc.stderr, proc.stderr[-3000:]
    assert "unexpected error" not in proc.stderr  # ours on every rank, not a collective's failure
    assert not (tmp_path / "out").exists()


def test_a_launch_without_torchrun_is_one_line(tiny_lm, chat_jsonl, tmp_path, monkeypatch, capsys):
    """WORLD_SIZE without what torchrun sets with it, or a torch without gloo: one line on the
    rank, exit 2, before anything is read or written (no rendezvous left waiting)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(argv(tiny_lm, chat_jsonl, tmp_path / "out", 2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "qlora-compile train (rank 0 of 2): WORLD_SIZE=2 is set but MASTER_ADDR, MASTER_PORT are not: start the "
        "job with torchrun --nproc_per_node=N (or unset WORLD_SIZE to train in one process)"
    ]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(torch.distributed, "is_gloo_available", lambda: False)
    assert cli.main(argv(tiny_lm, chat_jsonl, tmp_path / "out", 2)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "qlora-compile train (rank 0 of 2): WORLD_SIZE=2, but this torch build has no gloo backend for "
        "torch.distributed (the CPU needs it)"
    ]
    assert not (tmp_path / "out").exists()
