"""Streaming: a 3 GB checkpoint converts with peak RSS <= largest tensor + largest output shard + a constant
(in fact <= the largest output shard + a constant)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_compile.checkpoint.safetensors_file import read_header
from tests.checkpoint.convert_helpers import synthetic_llama

ROOT = Path(__file__).resolve().parents[2]
# Runs in a fresh process; the baseline is its RSS after the imports, the peak its VmHWM.
SCRIPT = """
import json, sys
import psutil
import qlora_compile, transformers
transformers.LlamaForCausalLM  # the lazy imports the conversion makes
base = psutil.Process().memory_info().rss
r = qlora_compile.convert_checkpoint(sys.argv[1], sys.argv[2], max_shard_size="500MB", progress=False)
# VmHWM, this program's peak RSS; ru_maxrss would also count the parent's pages that the forked
# child held before exec (a 2 GB pytest process made it 2 GB)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"base": base, "peak": peak, "bytes_in": r.bytes_in, "seconds": r.seconds}))
"""
CONSTANT = 300 * 2**20  # chunk temporaries (16 MB slices and their casts), the meta skeleton, allocator slack


@pytest.mark.slow
def test_3gb_checkpoint_streams(tmp_path):
    src = synthetic_llama(tmp_path / "src")  # 3.06 GB of fp32: 655 MB embedding and head, 2 layers
    infos = read_header(src / "model.safetensors")
    total = sum(i.nbytes for i in infos)
    largest = max(i.nbytes for i in infos)
    assert total > 3e9
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(src), str(tmp_path / "dst")],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    shards = [
        tmp_path / "dst" / n
        for n in set(
            json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())["weight_map"].values()
        )
    ]
    largest_shard = max(p.stat().st_size for p in shards)
    grown = m["peak"] - m["base"]
    print(f"peak RSS {m['peak'] / 2**20:.0f} MiB (base {m['base'] / 2**20:.0f} MiB, +{grown / 2**20:.0f} MiB); largest tensor "
          f"{largest / 2**20:.0f} MiB, largest shard {largest_shard / 2**20:.0f} MiB; {m['bytes_in'] / 1e6 / m['seconds']:.0f} MB/s")  # fmt: skip
    assert grown <= largest + largest_shard + CONSTANT, m  # the promise
    assert grown <= largest_shard + CONSTANT, m  # what it does: the pages read are unmapped slice by slice
    assert m["peak"] < total / 2, m  # far from holding the model
