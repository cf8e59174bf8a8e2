"""`qlora-compile train` as the README tells users to run it, with every default (Inductor,
gradient checkpointing, bf16, r=64, paged AdamW) on a 1-layer model, batches of varying lengths."""

import json
import subprocess
import sys

import pytest
import torch
import transformers

import qlora_compile
from qlora_compile.train import data, run
from qlora_compile.train.config import load_config
from tests.killed_run import ROOT


@pytest.mark.slow
def test_readme_command_with_defaults(tiny_lm, chat_jsonl, tmp_path):
    """Two steps whose batches have different lengths (one graph, dynamic from the first step, serves
    both). The first step's loss is taken before any update, with lora_B still zero: it must
    equal the loss of the same 4-bit model compiled with the eager backend on the same batch."""
    out = tmp_path / "out"
    args = ["--model", str(tiny_lm), "--data", str(chat_jsonl), "--output_dir", str(out), "--max_steps", "2"]
    proc = subprocess.run([sys.executable, "-m", "qlora_compile.tools.cli", "train", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("trained to step 2 in ")
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["format"] == "chat"
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2] and all(0 < r["loss"] < 20 for r in steps)

    cfg = load_config(None, args)
    assert cfg.qlora.backend == "inductor" and cfg.qlora.gradient_checkpointing and cfg.dtype == "bfloat16"
    p = run.prepare(cfg)
    order = data.micro_batches(
        data.epoch_order(p.train.lengths, cfg.batch_size, cfg.seed, 0, True), cfg.batch_size
    )
    first, second = (data.collate(p.train.dataset[ids], p.pad_id) for ids in order[:2])
    assert first["input_ids"].shape[1] != second["input_ids"].shape[1]  # varying lengths
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.bfloat16)
    qlora_compile.compile(model, backend="eager", gradient_checkpointing=False)
    with torch.no_grad():
        expected = model(**first).loss.item()
    assert steps[0]["loss"] == pytest.approx(expected, rel=1e-3)
