"""The README's launch recipe under `torchrun` (env:// rendezvous): the same losses as the
spawned launch's "folder" run, and a resume in a second torchrun reproduces them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("torchrun_train.py")


def _torchrun(tmp: Path, folder: Path, name: str) -> list[list[float]]:
    out = tmp / name
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
    cmd += [str(folder), str(tmp / "checkpoint"), str(tmp / "adapter"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"{rank}.json").read_text()) for rank in range(2)]


def test_torchrun_recipe_trains_and_resumes(tmp_path, sharded_out, sharded):
    first = _torchrun(tmp_path, sharded_out / "bnb4", "first")
    # as the spawned ranks' first 4 steps, bit for bit
    assert first == [r["folder"]["losses"][:4] for r in sharded]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    resumed = _torchrun(tmp_path, sharded_out / "bnb4", "resumed")
    assert resumed == [losses[2:] for losses in first]
