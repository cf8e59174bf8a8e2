"""Per-rank memory of `qlora_compile.distributed` on CPU/gloo: a 4-bit folder loaded by rows and
sharded (`shard`) or replicated (`replicate`) at 1, 2 and 3 ranks, and the step time; beside it
the peer, transformers + bitsandbytes + PEFT under torch's DistributedDataParallel, in the same
launcher on the same folder.

    python benchmarks/bench_distributed.py [--layers 8] [--hidden 1024] [--model HF_FOLDER] [--json out.json]

Model: a synthetic Llama (bf16, `--hidden`, 4x intermediate, `--layers` layers, vocabulary 2048),
saved and converted to a bitsandbytes 4-bit folder once. Each rank: `load_quantized(device="meta")`,
`compile(distributed=True, backend="aot_eager")`, `shard` (or `replicate`), then 3 training steps
on 2 sequences of 64 tokens. Memory is the rank's VmHWM (`/proc/self/status`, reset through
`/proc/self/clear_refs` once the meta model is compiled, imports done) minus its RSS then: "load"
is `shard` (fully_shard, reading this rank's rows, LoRA), "train" adds the steps (Dynamo's and
AOTAutograd's compile memory included). "4-bit held" is the packed bytes and absmax codes the
rank holds, "read" what it read from the folder (embeddings, head and norms included).
`--model`: a 16-bit HF folder (SmolLM2-135M: `qlora_compile.tools.assets`) instead of the synthetic one.

The peer ("peer-ddp"): `from_pretrained` of the same bitsandbytes folder (transformers loads its
4-bit weights as they are), PEFT's k-bit preparation with non-reentrant gradient checkpointing (as
`compile` checkpoints), LoRA r=16 on all linear layers, dropout 0, `DistributedDataParallel` when
there are 2 or more ranks, torch's AdamW. Its "load" peak is `from_pretrained` + PEFT + DDP from
the same imports-done baseline. FSDP on the peer is not tried: bitsandbytes' `Params4bit` is a
tensor subclass whose quant state FSDP2's unshard loses (axolotl PR 2992), and Accelerate's FSDP2
path replicates 4-bit weights (accelerate PR 3987). Step time: the median of steps 2..4.
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
    if mode == "peer-ddp":
        return _peer_rank(rank, world, folder)
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
    result = _steps(model, model.qlora.step, rank, model.config.vocab_size)
    return {**result, "load_peak": load_peak, "train_peak": _status("VmHWM") - base, "held": held,
            "total": total, "read": sum(model.qlora.bytes_read.values())}  # fmt: skip


def _steps(model, step, rank: int, vocab: int) -> dict:
    """4 training steps on 2 x 64 random tokens; the median time of steps 2..4."""
    import statistics

    import torch

    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(rank))
    model.train()
    times = []
    for _ in range(4):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        step()
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times[1:])}


def _peer_rank(rank: int, world: int, folder: str) -> dict:
    import peft
    import torch
    import transformers
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    model = peft.prepare_model_for_kbit_training(
        model, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    config = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    model = peft.get_peft_model(model, config)
    vocab = model.config.vocab_size
    held = sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype == torch.uint8)
    wrapped = DistributedDataParallel(model) if world > 1 else model
    load_peak = _status("VmHWM") - base
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = _steps(wrapped, step, rank, vocab)
    return {**result, "load_peak": load_peak, "train_peak": _status("VmHWM") - base, "held": held,
            "total": held, "read": None}  # fmt: skip


def _folder(work: Path, layers: int, hidden: int, model: Path | None) -> Path:
    import torch
    import transformers

    import qlora_compile

    dst = work / (f"{model.name}-bnb4" if model else f"llama-{layers}x{hidden}-bnb4")
    if dst.exists():
        return dst
    if model:
        qlora_compile.convert_checkpoint(model, dst, progress=False)
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
    parser.add_argument(
        "--model", type=Path, default=None, help="a 16-bit HF folder instead of the synthetic Llama"
    )
    parser.add_argument("--worlds", default="1,2,3", help="world sizes to run (default: 1,2,3)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    folder = _folder(work, args.layers, args.hidden, args.model)
    worlds = [int(w) for w in args.worlds.split(",")]
    runs = [("shard", w) for w in worlds] + [("replicate", w) for w in worlds if w == 2]
    runs += [("peer-ddp", w) for w in worlds]
    rows = []
    for mode, world in runs:
        ranks = run_ranks(_rank, world, timeout=600, folder=str(folder), mode=mode)
        worst = max(ranks, key=lambda r: r["load_peak"])
        row = {"mode": mode, "world": world, **worst, "step_s": max(r["step_s"] for r in ranks)}
        rows.append(row)
        print(
            f"{mode:9} world {world}: 4-bit held {worst['held'] / 2**20:6.1f} of {worst['total'] / 2**20:.1f} MiB, "
            f"peak RSS load +{worst['load_peak'] / 2**20:6.1f} MiB, train +{worst['train_peak'] / 2**20:6.1f} MiB, "
            f"read {(worst['read'] or 0) / 2**20:6.1f} MiB, step {row['step_s']:.2f} s",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
