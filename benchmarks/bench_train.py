"""QLoRA fine-tuning step time and peak memory on SmolLM2-135M (CPU): ours vs PEFT + bitsandbytes
QLoRA vs PEFT 16-bit LoRA, same configuration, one run.

    python benchmarks/bench_train.py [--steps 10] [--batch 4] [--seq 512] [--json OUT]
                                     [--candidates qlora-compile,peft+bnb,...]
                                     [--device cuda --model llama-1b]

Each candidate runs in its own process (so peak RSS is its own): load SmolLM2-135M-Instruct in
bf16, apply LoRA r=64, alpha=16, dropout 0.05 on all linear layers, gradient checkpointing on,
AdamW lr 2e-4; 2 warm-up steps (they include torch.compile for ours), then `--steps` timed steps
on random tokens. Reported: the first step's seconds (Inductor's compile included, for ours),
median step seconds and the process's peak RSS. `bench_train_trl.py` runs `qlora-compile train`
against TRL's SFTTrainer on real data: tokens/s, peak RSS and the loss at every step.

On a GPU (`--device cuda`, `tools/gpu_check.sh`) the peak is the device's
(`torch.cuda.max_memory_allocated`), and `--model llama-1b` trains a random Llama of TinyLlama-1.1B's
shape (saved once under `--cache`; the lent machine has no SmolLM2 package) instead of SmolLM2.

Our precision and recomputation options, one at a time and together, are candidates of their own
(`--candidates qlora-compile,qlora-compile/lora-bf16,...`, see `OURS`): the per-change gains.

The achieved rate: the step's model FLOPs (forward and backward of the LoRA model, no
recomputation; the frozen weights get no gradient), counted by `torch.utils.flop_counter` on the
16-bit PEFT model eagerly, in a process of its own, divided by each candidate's median step time,
beside the rate of a dense 2048^3 bf16 matmul measured in the same process (the CPU's practical
ceiling). Every candidate does that same useful work, whatever it recomputes.
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
# our candidates: compile() overrides on top of the defaults (dtypes by name)
OURS = {
    "qlora-compile": {},
    "qlora-compile/lora-bf16": {"lora_compute_dtype": "bfloat16"},
    "qlora-compile/bf16-residual": {"fp32_residual": False},
    "qlora-compile/budget-0.5": {"activation_memory_budget": 0.5},
    "qlora-compile/no-dropout": {"lora_dropout": 0.0},  # what the dropout masks cost
    "qlora-compile/dynamic": {"dynamic": True},  # symbolic sizes from the first step
    "qlora-compile/all": {
        "lora_compute_dtype": "bfloat16",
        "fp32_residual": False,
        "activation_memory_budget": 0.5,
    },
}


# random-weight models for machines without the SmolLM2 package: name -> LlamaConfig fields
SYNTHETIC = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
}  # fmt: skip


def model_folder(name: str, cache: Path) -> Path:
    """SmolLM2-135M-Instruct (name "smollm2") or a SYNTHETIC model saved in bf16 under `cache`."""
    if name == "smollm2":
        from qlora_compile.tools import assets

        return assets.smollm2_folder(cache)
    target = cache / name
    if not (target / "config.json").exists():
        import torch
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(**SYNTHETIC[name], dtype="bfloat16")
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is faster there
            transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(target)
    return target


def peak_bytes(device: str) -> int:
    """The peak memory of this process: the device's allocations on CUDA, the RSS on the CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


LORA = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.05}


def peft_model(name: str, folder: str, device: str, lora: dict, checkpointing: bool = True):
    """The peer: transformers + PEFT LoRA on every linear layer, with bitsandbytes NF4 + double
    quantization ("peft+bnb") or in bf16 ("peft-16bit"), gradient checkpointing on (16-bit: unless
    `checkpointing` is False)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if name == "peft+bnb":
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quant, device_map=device, dtype=torch.bfloat16
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(**lora, target_modules="all-linear", task_type="CAUSAL_LM"))


def step_flops(folder: str, batch: int, seq: int, device: str = "cpu") -> dict:
    """The model FLOPs of one training step (`torch.utils.flop_counter.FlopCounterMode`, eager
    16-bit PEFT LoRA, no checkpointing), and the dense bf16 matmul rate (FLOP/s) of this machine."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    # model FLOPs: no recomputation (nor a gradient for the frozen embeddings' output, which
    # checkpointing asks for)
    model = peft_model("peft-16bit", folder, device, {**LORA, "lora_dropout": 0.0}, checkpointing=False)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    a = torch.randn(2048, 2048, dtype=torch.bfloat16, device=device)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16, device=device)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        (a @ b).sum().item()
        times.append(time.perf_counter() - start)
    return {
        "step_flops": counter.get_total_flops(),
        "dense_flops_per_s": 2 * 2048**3 / statistics.median(times[2:]),
    }


def run_one(
    name: str, folder: str, steps: int, batch: int, seq: int, backend: str, device: str = "cpu"
) -> dict:
    import logging

    import torch
    import transformers

    logging.disable(logging.WARNING)
    torch.manual_seed(0)

    if name in OURS:
        import qlora_compile

        options = {k: getattr(torch, v) if k.endswith("dtype") else v for k, v in OURS[name].items()}
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
        qlora_compile.compile(model, **{**LORA, **options}, compute_dtype=torch.bfloat16, backend=backend)
        params = model.qlora.trainable_parameters()
    else:
        model = peft_model(name, folder, device, LORA)
        params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    times, losses = [], []
    for _ in range(2 + steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronizes a GPU
        times.append(time.perf_counter() - start)
    peak = peak_bytes(device)
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
    parser.add_argument("--candidates", default=",".join(CANDIDATES),
                        help=f"comma-separated, from {', '.join([*OURS, *CANDIDATES[1:]])}")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default="smollm2", choices=["smollm2", *SYNTHETIC])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one candidate in this process
    args = parser.parse_args()
    if args.one == "flops":
        print(json.dumps(step_flops(str(args.cache), args.batch, args.seq, args.device)))
        return
    if args.one:
        result = run_one(
            args.one, str(args.cache), args.steps, args.batch, args.seq, args.backend, args.device
        )
        print(json.dumps(result))
        return
    folder = model_folder(args.model, args.cache)
    rows = []
    names = args.candidates.split(",")
    unknown = [n for n in names if n not in OURS and n not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidates {unknown}")
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--cache", str(folder), "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq), "--backend", args.backend, "--device", args.device]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(
            f"{name}: first step {rows[-1]['first_step_s']:.1f} s, then {rows[-1]['step_s']:.2f} s/step, "
            f"peak {'memory' if args.device != 'cpu' else 'RSS'} {rows[-1]['peak_rss'] / 2**20:.0f} MiB",
            flush=True,
        )
    cmd = [sys.executable, __file__, "--one", "flops", "--cache", str(folder), "--batch", str(args.batch),
           "--seq", str(args.seq), "--device", args.device]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    flops = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    if flops is None:
        print(f"the FLOP count failed:\n{out.stderr[-3000:]}", file=sys.stderr)
    ours = next((r for r in rows if r["name"] == "qlora-compile"), None)
    print(
        f"\n{args.model} on {args.device}, batch {args.batch} x {args.seq} tokens, r=64, bf16, checkpointing, "
        f"{args.steps} steps\n"
    )
    if flops:
        print(f"model FLOPs per step {flops['step_flops'] / 1e12:.3f} TFLOP; dense bf16 matmul "
              f"{flops['dense_flops_per_s'] / 1e9:.0f} GFLOP/s\n")  # fmt: skip
    print(
        "| | first step | step time | peak RSS | ours vs it (time) | ours vs it (RSS) | GFLOP/s (of dense) |\n"
        "|---|---|---|---|---|---|---|"
    )
    for r in rows:
        ratio = (
            (f"{ours['step_s'] / r['step_s']:.2f}x | {ours['peak_rss'] / r['peak_rss']:.2f}x")
            if ours
            else "- | -"
        )
        rate = "-"
        if flops:
            r["gflops_per_s"] = flops["step_flops"] / r["step_s"] / 1e9
            rate = f"{r['gflops_per_s']:.0f} ({r['gflops_per_s'] * 1e9 / flops['dense_flops_per_s']:.0%})"
        print(
            f"| {r['name']} | {r['first_step_s']:.1f} s | {r['step_s']:.2f} s | {r['peak_rss'] / 2**20:.0f} MiB | {ratio} | {rate} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"candidates": rows, "flops": flops}, indent=1))


if __name__ == "__main__":
    main()
