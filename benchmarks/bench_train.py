"""QLoRA fine-tuning step time and peak memory on SmolLM2-135M (CPU): ours vs PEFT + bitsandbytes
QLoRA vs PEFT 16-bit LoRA, same configuration, one run.

    python benchmarks/bench_train.py [--steps 10] [--batch 4] [--seq 512] [--json OUT]

Each candidate runs in its own process (so peak RSS is its own): load SmolLM2-135M-Instruct in
bf16, apply LoRA r=64, alpha=16, dropout 0.05 on all linear layers, gradient checkpointing on,
AdamW lr 2e-4; 2 warm-up steps (they include torch.compile for ours), then `--steps` timed steps
on random tokens. Reported: the first step's seconds (Inductor's compile included, for ours),
median step seconds and the process's peak RSS. `bench_train_trl.py` runs `qlora-compile train`
against TRL's SFTTrainer on real data: tokens/s, peak RSS and the loss at every step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CANDIDATES = ("qlora-compile", "peft+bnb", "peft-16bit")


def run_one(name: str, folder: str, steps: int, batch: int, seq: int, backend: str) -> dict:
    import logging

    import torch
    import transformers

    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    lora = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.05}
    if name == "qlora-compile":
        import qlora_compile

        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        qlora_compile.compile(model, **lora, compute_dtype=torch.bfloat16, backend=backend)
        params = model.qlora.trainable_parameters()
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if name == "peft+bnb":
            quant = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )  # fmt: skip
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=quant, device_map="cpu", dtype=torch.bfloat16
            )
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.config.use_cache = False
        model = get_peft_model(model, LoraConfig(**lora, target_modules="all-linear", task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    ids = torch.randint(0, 49152, (batch, seq))
    times, losses = [], []
    for _ in range(2 + steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"name": name, "first_step_s": times[0], "step_s": statistics.median(times[2:]), "peak_rss": peak,
            "losses": losses, "trainable": sum(p.numel() for p in params)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--backend", default="inductor", help="our torch.compile backend (default inductor)")
    parser.add_argument("--cache", type=Path, default=Path("bench_out"))
    parser.add_argument("--json", type=Path, default=Path("bench_out/train.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one candidate in this process
    args = parser.parse_args()
    if args.one:
        result = run_one(args.one, str(args.cache), args.steps, args.batch, args.seq, args.backend)
        print(json.dumps(result))
        return
    from qlora_compile.tools import assets

    folder = assets.smollm2_folder(args.cache)
    rows = []
    for name in CANDIDATES:
        cmd = [sys.executable, __file__, "--one", name, "--cache", str(folder), "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq), "--backend", args.backend]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(
            f"{name}: first step {rows[-1]['first_step_s']:.1f} s, then {rows[-1]['step_s']:.2f} s/step, "
            f"peak RSS {rows[-1]['peak_rss'] / 2**20:.0f} MiB",
            flush=True,
        )
    ours = next((r for r in rows if r["name"] == "qlora-compile"), None)
    print(
        f"\nSmolLM2-135M, batch {args.batch} x {args.seq} tokens, r=64, bf16, checkpointing, {args.steps} steps\n"
    )
    print(
        "| | first step | step time | peak RSS | ours vs it (time) | ours vs it (RSS) |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        ratio = (
            (f"{ours['step_s'] / r['step_s']:.2f}x | {ours['peak_rss'] / r['peak_rss']:.2f}x")
            if ours
            else "- | -"
        )
        print(
            f"| {r['name']} | {r['first_step_s']:.1f} s | {r['step_s']:.2f} s | {r['peak_rss'] / 2**20:.0f} MiB | {ratio} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
