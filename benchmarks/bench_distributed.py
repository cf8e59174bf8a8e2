"""Per-rank memory of `qlora_compile.distributed` on CPU/gloo: a 4-bit folder loaded by rows and
sharded (`shard`) or replicated (`replicate`) at 1, 2 and 3 ranks, and the step time.

    python benchmarks/bench_distributed.py [--layers 8] [--hidden 1024] [--json bench_out/distributed.json]

Model: a synthetic Llama (bf16, `--hidden`, 4x intermediate, `--layers` layers, vocabulary 2048),
saved and converted to a bitsandbytes 4-bit folder once. Each rank: `load_quantized(device="meta")`,
`compile(distributed=True, backend="aot_eager")`, `shard` (or `replicate`), then 3 training steps
on 2 sequences of 64 tokens. Memory is the rank's VmHWM (`/proc/self/status`, reset through
`/proc/self/clear_refs` once the meta model is compiled, imports done) minus its RSS then: "load"
is `shard` (fully_shard, reading this rank's rows, LoRA), "train" adds the steps (Dynamo's and
AOTAutograd's compile memory included). "4-bit held" is the packed bytes and absmax codes the
rank holds, "read" what it read from the folder (embeddings, head and norms included).
Not a comparison with transformers + bitsandbytes + PEFT yet (issue 11 asks for one).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rank(rank: int, world: int, folder: str, mode: str) -> dict:
    import torch

    import qlora_compile
    from qlora_compile import distributed

    torch.manual_seed(0)
    model = qlora_compile.load_quantized(folder, device="meta")  # headers and statistics: a few KiB
    qlora_compile.compile(model, distributed=True, backend="aot_eager", lora_dropout=0.0, r=16)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, imports done
    base = _status("VmRSS")
    getattr(distributed, mode)(model)
    load_peak = _status("VmHWM") - base
    held, total = distributed.storage_bytes(model)
    ids = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(rank))
    model.train()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.qlora.step()
        times.append(time.perf_counter() - t)
    return {
        "load_peak": load_peak,
        "train_peak": _status("VmHWM") - base,
        "held": held,
        "total": total,
        "read": model.qlora.bytes_read,
        "step_s": min(times[1:]),
    }


def _folder(work: Path, layers: int, hidden: int) -> Path:
    import torch
    import transformers

    import qlora_compile

    dst = work / f"llama-{layers}x{hidden}-bnb4"
    if dst.exists():
        return dst
    config = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(work / "dense")
    qlora_compile.convert_checkpoint(work / "dense", dst, progress=False)
    return dst


def main() -> None:
    from tests.distributed.launch import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    folder = _folder(work, args.layers, args.hidden)
    rows = []
    for mode, world in (("shard", 1), ("shard", 2), ("shard", 3), ("replicate", 2)):
        ranks = run_ranks(_rank, world, timeout=600, folder=str(folder), mode=mode)
        worst = max(ranks, key=lambda r: r["load_peak"])
        row = {"mode": mode, "world": world, **worst, "step_s": max(r["step_s"] for r in ranks)}
        rows.append(row)
        print(
            f"{mode:9} world {world}: 4-bit held {worst['held'] / 2**20:6.1f} of {worst['total'] / 2**20:.1f} MiB, "
            f"peak RSS load +{worst['load_peak'] / 2**20:6.1f} MiB, train +{worst['train_peak'] / 2**20:6.1f} MiB, "
            f"read {sum(worst['read'].values()) / 2**20:6.1f} MiB, step {row['step_s']:.2f} s",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
