"""16-bit LoRA (`qlora.quant_type=none`) through `qlora-compile train` with every other default
(Inductor, bf16, r=64, paged AdamW, gradient checkpointing), against PEFT's LoRA on the bf16 model."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from peft import PeftModel

from qlora_compile.train import data, loop, run
from qlora_compile.train.config import load_config
from tests.killed_run import ROOT
from tests.peft_oracle import as_qlora_prepares


@pytest.mark.slow
def test_train_none_matches_peft_on_the_trained_adapter(tiny_lm, chat_jsonl, tmp_path):
    """Two steps, then the held-out loss `train` reports must be the loss PEFT computes with the
    saved adapter on the bf16 base, prepared as QLoRA prepares it (tests/peft_oracle.py)."""
    out = tmp_path / "out"
    args = ["--model", str(tiny_lm), "--data", str(chat_jsonl), "--output_dir", str(out), "--max_steps", "2",
            "--eval_split", "0.25", "--qlora.quant_type", "none"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "qlora_compile.tools.cli", "train", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["eval_loss_after"] != report["eval_loss_before"]

    cfg = load_config(None, args)
    assert cfg.qlora.backend == "inductor" and cfg.dtype == "bfloat16" and cfg.qlora.quant_type == "none"
    p = run.prepare(cfg)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.bfloat16)
    ref = as_qlora_prepares(PeftModel.from_pretrained(base, out / "adapter"), torch.bfloat16)
    loss = loop.evaluate(ref, data.eval_batches(p.eval, cfg.batch_size, p.pad_id))
    assert report["eval_loss_after"] == pytest.approx(loss, rel=1e-5)
