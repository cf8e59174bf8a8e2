"""Checkpoint conversion: ours (`qlora_compile.convert_checkpoint`) against transformers + bitsandbytes
(`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))` then
`save_pretrained`), same options (NF4, double quantization, bf16 compute), same output bytes.

    python benchmarks/bench_convert.py [--work DIR] [--skip-3gb] [--json bench_out/convert.json]

Each candidate runs in its own fresh subprocess: throughput is the checkpoint's bytes over the wall
time of the conversion call (imports excluded; the source is synced and read into the page
cache first, so every candidate reads it from memory), peak RSS
is the child's VmHWM (`/proc/self/status`; `ru_maxrss` would count the parent's pages the
forked child held before exec), and "base" its RSS after the imports. Ours runs with the default
`max_shard_size="2GB"` and, on the 3 GB checkpoint, with 500MB too (peak RSS follows the shard). Checkpoints: SmolLM2-135M (real
weights, fp32, 538 MB) and a synthetic 3 GB fp32 Llama (2 layers, 655 MB embedding and head).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "checkpoint"))

CHILD = r"""
import json, logging, sys, time, warnings
import psutil, torch, transformers
logging.disable(logging.WARNING)
warnings.filterwarnings("ignore")
candidate, src, dst = sys.argv[1:4]
if candidate.startswith("ours"):
    import qlora_compile
    transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM  # its lazy imports
    base = psutil.Process().memory_info().rss
    start = time.perf_counter()
    shard = candidate.partition(", max_shard_size=")[2] or "2GB"
    qlora_compile.convert_checkpoint(src, dst, progress=False, max_shard_size=shard)
else:
    import bitsandbytes  # noqa: F401
    transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM
    base = psutil.Process().memory_info().rss
    start = time.perf_counter()
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=config)
    model.save_pretrained(dst)
seconds = time.perf_counter() - start
# VmHWM, this program's peak RSS; ru_maxrss would also count the parent's pages that the forked
# child held before exec (a 2 GB pytest process made it 2 GB)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak": peak, "base": base}))
"""


def folder_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name.endswith(suffix))


def run(candidate: str, src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, candidate, str(src), str(dst)],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"},
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{candidate} failed:\n{proc.stderr[-3000:]}")
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    m["bytes_in"], m["bytes_out"] = folder_bytes(src), folder_bytes(dst)
    shutil.rmtree(dst, ignore_errors=True)
    return m


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--skip-3gb", action="store_true", help="only SmolLM2-135M")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)

    from qlora_compile.tools.assets import smollm2_folder

    checkpoints = {"SmolLM2-135M (fp32)": smollm2_folder(work / "assets")}
    if not args.skip_3gb:
        from convert_helpers import synthetic_llama

        synthetic = work / "synthetic-3gb"
        if not (synthetic / "model.safetensors").exists():
            shutil.rmtree(synthetic, ignore_errors=True)
            synthetic_llama(synthetic)
        checkpoints["synthetic Llama 3 GB (fp32)"] = synthetic

    rows = []
    for name, src in checkpoints.items():
        os.sync()  # the synthetic checkpoint's dirty pages would otherwise be written back during a run
        for path in src.glob("*.safetensors"):  # into the page cache, for every candidate alike
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
        candidates = ["ours", "ours, max_shard_size=500MB", "transformers"]
        if "SmolLM2" in name:
            candidates.remove("ours, max_shard_size=500MB")  # 169 MB out: one shard either way
        for candidate in candidates:
            m = run(candidate, src, work / "out")
            rows.append({"checkpoint": name, "candidate": candidate, **m})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(
        "| checkpoint | converter | MB in | MB out | time (s) | MB/s | peak RSS (MiB) | above imports (MiB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['checkpoint']} | {r['candidate']} | {r['bytes_in'] / 1e6:.0f} | {r['bytes_out'] / 1e6:.0f} | "
            f"{r['seconds']:.1f} | {r['bytes_in'] / 1e6 / r['seconds']:.0f} | {r['peak'] / 2**20:.0f} | "
            f"{(r['peak'] - r['base']) / 2**20:.0f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
