"""`qlora-compile train` end to end on a 1-layer Llama with SmolLM2's tokenizer (aot_eager, fp32):
losses against a plain PyTorch loop, the schedule against transformers', a SIGKILLed and a
SIGTERMed run resumed to the same losses bit for bit, checkpoint rotation, resume mismatches."""

import json
import os
import shutil
import signal

import pytest
import torch
import transformers

import qlora_compile
from qlora_compile.tools import cli
from qlora_compile.train import data, loop, run
from qlora_compile.train.config import load_config
from tests.killed_run import killed_run
from tests.models import save_tiny
from tests.train.conftest import copy_tokenizer

STEPS = 6


def argv(model, data_file, out, *extra):
    return ["train", "--model", str(model), "--data", str(data_file), "--output_dir", str(out),
            "--qlora.backend", "aot_eager", "--dtype", "float32", "--qlora.r", "8", "--qlora.lr", "1e-3",
            "--qlora.lora_dropout", "0.1", "--max_steps", str(STEPS), "--batch_size", "3", "--grad_accum", "2",
            "--schedule", "cosine", "--warmup_steps", "2", "--eval_split", "0.25", "--eval_every", "3",
            "--save_every", "2", "--save_total_limit", "2", "--no-progress", *extra]  # fmt: skip


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def computed(out) -> list[tuple]:
    """What must not change when a run is interrupted and resumed (not the timings)."""
    return [
        (r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"), r.get("eval_loss")) for r in rows(out)
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_lm, chat_jsonl):
    out = tmp_path_factory.mktemp("run") / "out"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert cli.main(argv(tiny_lm, chat_jsonl, out, "--export", "merged", "--tensorboard", "true")) == 0
    # batch and sequence sizes dynamic from step 1: one graph for batches of every length
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    return out


def test_outputs(uninterrupted):
    out = uninterrupted
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == STEPS and report["format"] == "chat" and report["resumed_from"] is None
    assert report["train_examples"] + report["eval_examples"] == 24 and report["eval_examples"] == 6
    assert report["data"] == {"examples": 24, "truncated": 0, "dropped_too_long": 0, "dropped_no_labels": 0,
                              "kept": 24, "tokens": report["data"]["tokens"], "packed_rows": None}  # fmt: skip
    assert report["tokens"] > 0 and report["tokens_per_s"] > 0 and report["peak_rss_bytes"] > 2**20
    steps = [r for r in rows(out) if "loss" in r]
    evals = [r for r in rows(out) if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)) and [r["step"] for r in evals] == [0, 3, 6]
    assert report["loss_first"] == steps[0]["loss"] and report["loss_last"] == steps[-1]["loss"]
    assert (
        report["eval_loss_before"] == evals[0]["eval_loss"]
        and report["eval_loss_after"] == evals[-1]["eval_loss"]
    )
    assert evals[-1]["eval_ppl"] == pytest.approx(torch.tensor(evals[-1]["eval_loss"]).exp().item(), rel=1e-6)
    # save_total_limit 2: checkpoint-2 was rotated out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not list(out.glob("*.partial"))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --export merged: the final adapter merged onto the dequantized 4-bit weights, a plain HF folder
    assert report["exports"] == {"merged": str(out / "merged")}
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard reads the event files (its own EventAccumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_metrics(uninterrupted):
    """`tensorboard: true`: every number of metrics.jsonl (loss, lr, grad norm, tokens, eval loss and
    perplexity...) is a TensorBoard scalar under its key, at its step, with its value (float32)."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in rows(uninterrupted):
        for key, value in r.items():
            if key != "step":
                expected.setdefault(key, []).append((r["step"], value))
    assert {"loss", "lr", "grad_norm", "eval_loss", "eval_ppl"} <= set(expected)
    scalars = tensorboard_scalars(uninterrupted / "tensorboard")
    assert set(scalars) == set(expected)
    for key, points in expected.items():
        assert [s for s, _ in scalars[key]] == [s for s, _ in points], key
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in points], rel=1e-6), key


def test_tensorboard_of_a_resumed_run_drops_the_steps_after_its_checkpoint(tmp_path):
    """As metrics.jsonl does: a run resumed from step 2 logs steps 3 and 4 again, and TensorBoard
    shows the new values only (the writer's purge_step)."""
    path = tmp_path / "metrics.jsonl"
    metrics = loop.Metrics(path, None, tensorboard=True)
    for step in range(1, 5):
        metrics.write({"step": step, "loss": float(step)})
    metrics.close()
    metrics = loop.Metrics(path, 2, tensorboard=True)
    for step in (3, 4):
        metrics.write({"step": step, "loss": 10.0 * step})
    metrics.close()
    assert [r["loss"] for r in rows(tmp_path)] == [1.0, 2.0, 30.0, 40.0]
    assert tensorboard_scalars(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_schedule_matches_transformers(uninterrupted):
    """The lr each step used is transformers' cosine-with-warmup value for that step."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = transformers.get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=STEPS)
    expected = []
    for _ in range(STEPS):
        expected.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert [r["lr"] for r in rows(uninterrupted) if "lr" in r] == expected
    assert expected[0] == 0.0 and expected[2] == 1e-3  # warmup, then the peak


def test_losses_match_a_plain_loop(uninterrupted, tiny_lm, chat_jsonl, tmp_path):
    """The same model, seed and batches in a loop written out here: the loss of each step is the
    sum of token losses over both micro-batches divided by their token count (not the mean of the
    two micro-batch means), and the optimizer steps at transformers' lrs."""
    cfg = load_config(None, argv(tiny_lm, chat_jsonl, tmp_path / "x")[1:-1])
    p = run.prepare(cfg)
    transformers.set_seed(cfg.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    qlora_compile.compile(model, cfg.qlora, dynamic=True)  # as train compiles it: one graph for all lengths
    model.train()
    order = data.micro_batches(data.epoch_order(p.train.lengths, 3, cfg.seed, 0, True), 3)
    lrs = [r["lr"] for r in rows(uninterrupted) if "lr" in r]
    losses, means = [], []
    for step in range(3):
        batches = [data.collate(p.train.dataset[ids], p.pad_id) for ids in order[2 * step : 2 * step + 2]]
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total, mean_of_means = 0.0, 0.0
        for group in model.qlora.optimizer.param_groups:
            group["lr"] = lrs[step]
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            token_losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), reduction="sum"
            )
            (token_losses / n).backward()
            total += token_losses.item() / n
            mean_of_means += token_losses.item() / int((b["labels"][:, 1:] != -100).sum()) / len(batches)
        model.qlora.step()
        losses.append(total)
        means.append(mean_of_means)
    logged = [r["loss"] for r in rows(uninterrupted) if "loss" in r][:3]
    assert logged == pytest.approx(losses, rel=1e-5, abs=0)
    assert means != pytest.approx(losses, rel=1e-5, abs=0)  # the test tells token weighting apart


def test_resume_after_sigkill_and_sigterm_is_bit_exact(
    uninterrupted, tiny_lm, chat_jsonl, tmp_path, monkeypatch
):
    """Killed by SIGKILL right after checkpoint-4 is in place; resumed from checkpoint-2 (its metrics
    after step 2 dropped), stopped by SIGTERM during step 4 (which finishes, is saved, exit 143);
    resumed from the latest: every loss, lr, gradient norm and eval loss equals the uninterrupted
    run's exactly."""
    out = tmp_path / "out"
    killed_run(2, *argv(tiny_lm, chat_jsonl, out), unit="folder")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert max(r["step"] for r in rows(out)) == 4

    step = loop.train_step
    calls = []

    def sigterm_in_second_step(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(*args)

    monkeypatch.setattr(loop, "train_step", sigterm_in_second_step)
    assert (
        cli.main(argv(tiny_lm, chat_jsonl, out, "--resume", str(out / "checkpoint-2")))
        == 128 + signal.SIGTERM
    )
    assert max(r["step"] for r in rows(out)) == 4 and (out / "checkpoint-4").is_dir()
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4
    monkeypatch.setattr(loop, "train_step", step)
    assert cli.main(argv(tiny_lm, chat_jsonl, out, "--resume", "latest")) == 0
    assert computed(out) == computed(uninterrupted)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from"] == str(out / "checkpoint-4") and report["steps"] == STEPS


def test_resume_mismatch_is_one_line(uninterrupted, tiny_lm, chat_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted / "checkpoint-6", out / "checkpoint-6")
    before = sorted(p.name for p in out.iterdir())
    assert cli.main(argv(tiny_lm, chat_jsonl, out, "--qlora.r", "4", "--resume", "latest")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"qlora-compile train: cannot resume from {out / 'checkpoint-6'}: made with another config: "
                   "qlora.r 8 -> 4"]  # fmt: skip
    other = save_tiny(
        tmp_path / "other", seed=1, vocab_size=49152, num_hidden_layers=1, max_position_embeddings=256
    )
    copy_tokenizer(tiny_lm, other)
    assert cli.main(argv(other, chat_jsonl, out, "--resume", "latest")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"qlora-compile train: cannot resume from {out / 'checkpoint-6'}: it was trained from another "
                   "model (config.json or weights differ)"]  # fmt: skip
    state = out / "checkpoint-6" / "trainer_state.json"
    state.write_text(
        json.dumps({**json.loads(state.read_text()), "dataset_size": 5})
    )  # as if the file had changed
    assert cli.main(argv(tiny_lm, chat_jsonl, out, "--resume", "latest")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"qlora-compile train: cannot resume from {out / 'checkpoint-6'}: it trained on 5 examples, "
                   "the data now gives 18"]  # fmt: skip
    assert cli.main(argv(tiny_lm, chat_jsonl, out)) == 2  # checkpoints there and no --resume
    assert "pass --resume latest" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_four_bit_folder_trains_as_stored(uninterrupted, tiny_lm, chat_jsonl, tmp_path):
    """A bitsandbytes 4-bit folder (`convert_checkpoint` of the same model) is loaded as stored, not
    re-quantized: its first loss equals the 16-bit folder's, which compile quantized to the same bytes."""
    nf4 = tmp_path / "nf4"
    qlora_compile.convert_checkpoint(tiny_lm, nf4, progress=False)
    copy_tokenizer(tiny_lm, nf4)
    out = tmp_path / "out"
    args = argv(nf4, chat_jsonl, out)
    args[args.index("--max_steps") + 1] = "1"
    assert cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["four_bit_folder"] is True
    assert report["loss_first"] == pytest.approx(rows(uninterrupted)[1]["loss"], rel=1e-6)
