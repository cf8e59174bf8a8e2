"""`qlora-compile train` against TRL's `SFTTrainer` + PEFT + bitsandbytes: the same fine-tuning of
SmolLM2-135M-Instruct on the demo's data (chatterbot-corpus pairs as chat JSONL), one run each,
side by side: tokens/s (median over the steps after the first), peak RSS, the loss at every step and
the held-out loss after training.

    python benchmarks/bench_train_trl.py [--steps 100] [--lora-dropout 0.05] [--no-trl-autocast]
                                         [--parallel] [--json OUT]

(`bench_train.py` times single steps on random tokens against PEFT + bitsandbytes.)

Each candidate runs in its own process (peak RSS is its own), one after the other, or both at once
with `--parallel` (on a machine shared with other jobs, so that both see the same load):
- ours: `qlora-compile train ours.yaml`, the config a user would write (written to the work folder);
- TRL: `SFTTrainer` on the model that transformers + bitsandbytes load in NF4 with double
  quantization, `prepare_model_for_kbit_training`, PEFT LoRA on every linear layer; TRL's QLoRA
  settings: bf16, gradient checkpointing, `paged_adamw_32bit` (bitsandbytes falls back to unpaged
  states on a CPU), constant learning rate.
Both: LoRA r=64, alpha=16 on all linear layers but the head, lr 2e-4, max_grad_norm 0.3, no weight
decay, batches of 4, seed 0, the loss on the answers only. What must be equal for the curves to be
comparable step by step is made equal, not left to chance:
- the examples and their tokens: TRL gets the pre-tokenized rows (`input_ids`, `labels`) that our
  data pipeline made from the JSONL (TRL uses a `labels` column as it is);
- the order and the batches: TRL's rows are written in the order our epoch draws them and read
  sequentially (`train_sampling_strategy="sequential"`), so step i sees the same 4 examples;
- the initial adapter: LoRA A is random; ours is drawn by `compile` from the seed, saved, and
  loaded into PEFT (`PeftModel.from_pretrained(..., is_trainable=True)`);
- the held-out loss after training: our evaluation (`loop.evaluate`: every answer token of the
  held-out pairs, eval mode, the same batches) on both models. Not before training on TRL's side:
  bitsandbytes 0.50 on a CPU repacks a `Linear4bit`'s weight for its inference kernel in eval mode
  (`packing_format_for_cpu`) and keeps it so in train mode, where `matmul_4bit` then calls
  `gemv_4bit`, which has no autograd formula: the gradient through the frozen 4-bit weights is
  dropped (torch only warns), and the earlier layers' LoRA weights train on wrong gradients.
The dropout masks differ by construction (each draws its own): `--lora-dropout 0` removes them.

`--no-trl-autocast`: TRL's run with `bf16=False`, so that its arithmetic is ours. TRL's `bf16=True`
is autocast, under which transformers' attention output reaches `o_proj` in bf16 (bitsandbytes
returns the input's dtype, so the base output and PEFT's LoRA term are added in bf16), SDPA takes
the queries, keys and values in bf16, and PEFT's LoRA products run in bf16: early in training, when
the LoRA terms are small against the outputs they are added to, bf16 rounds part of them away and
the adapter acts more weakly than its weights say. Without autocast, bitsandbytes still multiplies
in bf16 (`bnb_4bit_compute_dtype`) and PEFT's LoRA runs in fp32 on fp32 inputs (the norms and
embeddings upcast by `prepare_model_for_kbit_training`): our defaults' precision policy, which
computes the same losses as that model, bit for bit, for the same weights and batch.
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

from transformers import TrainerCallback

SEED, BATCH, MAX_LENGTH, EVAL_PAIRS = 0, 4, 48, 16
LORA = {"r": 64, "lora_alpha": 16}
LR, MAX_GRAD_NORM = 2e-4, 0.3


def ours_config(work: Path, folder: Path, steps: int, dropout: float, lora_dtype: str | None = None) -> dict:
    """The `qlora-compile train` config: the demo's data, QLoRA's defaults otherwise."""
    return {
        "model": str(folder), "data": str(work / "train.jsonl"), "eval_data": str(work / "eval.jsonl"),
        "format": "chat", "max_length": MAX_LENGTH, "overflow": "drop", "batch_size": BATCH,
        "group_by_length": False, "max_steps": steps, "warmup_ratio": 0, "seed": SEED,
        "output_dir": str(work / "ours"), "log_every": 1,
        "qlora": {**LORA, "lora_dropout": dropout, "lr": LR, "max_grad_norm": MAX_GRAD_NORM,
                  **({"lora_compute_dtype": lora_dtype} if lora_dtype else {})},
    }  # fmt: skip


def prepare(work: Path, folder: Path, steps: int, dropout: float, lora_dtype: str | None = None) -> None:
    """The JSONL files, ours.yaml, TRL's rows in our order, and the initial adapter."""
    import torch
    import transformers
    import yaml

    import qlora_compile
    from qlora_compile.tools import demo
    from qlora_compile.train import data, run
    from qlora_compile.train.config import load_config

    work.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    train, held = demo.split_pairs(
        tokenizer, demo.parse_pairs(demo.corpus_files()), MAX_LENGTH, EVAL_PAIRS, SEED
    )
    demo.write_chat_jsonl(work / "train.jsonl", train)
    demo.write_chat_jsonl(work / "eval.jsonl", held)
    values = ours_config(work, folder, steps, dropout, lora_dtype)
    (work / "ours.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    cfg = load_config(work / "ours.yaml")
    p = run.prepare(cfg)  # our tokens, after max_length
    order = data.epoch_order(p.train.lengths, BATCH, SEED, 0, group_by_length=False)[: steps * BATCH]
    assert len(order) == steps * BATCH, "one epoch holds every step: no second epoch order to follow"
    for name, split, rows in (("trl_train.jsonl", p.train, order), ("trl_eval.jsonl", p.eval, None)):
        ds = split.dataset if rows is None else split.dataset.select(rows)
        with open(work / name, "w") as f:
            for r in ds:
                f.write(json.dumps({k: r[k] for k in ("input_ids", "labels", "length")}) + "\n")
    transformers.set_seed(SEED)  # as `train` does before compile: LoRA A is drawn from it
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    qlora_compile.compile(model, cfg.qlora)
    model.qlora.save_adapter(work / "init_adapter")


def ours_command(work: Path) -> list[str]:
    return [sys.executable, "-m", "qlora_compile.tools.cli", "train", str(work / "ours.yaml"), "--no-progress"]  # fmt: skip


def ours_result(work: Path) -> dict:
    """What our run wrote: metrics.jsonl and report.json."""
    report = json.loads((work / "ours" / "report.json").read_text())
    rows = [json.loads(x) for x in (work / "ours" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    return {"name": "qlora-compile train", "losses": [r["loss"] for r in steps],
            "grad_norms": [r["grad_norm"] for r in steps],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[1:]),
            "peak_rss": report["peak_rss_bytes"], "eval_before": report["eval_loss_before"],
            "eval_after": report["eval_loss_after"], "train_seconds": report["train_seconds"]}  # fmt: skip


def _split(path: Path):
    import datasets

    from qlora_compile.train import data

    return data.Split(datasets.load_dataset("json", data_files=str(path), split="train"))


def _trl_model(folder: Path, adapter: Path):
    import torch
    import transformers
    from peft import PeftModel, prepare_model_for_kbit_training

    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, device_map="cpu", dtype=torch.bfloat16
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return PeftModel.from_pretrained(model, adapter, is_trainable=True)


def run_trl(work: Path, folder: Path, steps: int, autocast: bool = True) -> dict:
    """SFTTrainer in this process; returns what `run_ours` returns."""
    import transformers
    from trl import SFTConfig, SFTTrainer

    from qlora_compile.train import data, loop

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = _trl_model(folder, work / "init_adapter")
    train, evals = _split(work / "trl_train.jsonl"), _split(work / "trl_eval.jsonl")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def held_out() -> float:
        return loop.evaluate(model, data.eval_batches(evals, BATCH, pad))

    args = SFTConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, optim="paged_adamw_32bit", max_grad_norm=MAX_GRAD_NORM,
        weight_decay=0.0, bf16=autocast, gradient_checkpointing=True, logging_steps=1, seed=SEED,
        train_sampling_strategy="sequential", report_to="none", save_strategy="no", use_cpu=True,
        max_length=None, dataloader_num_workers=0,
    )  # fmt: skip
    timer = StepTimer([sum(train.dataset[i * BATCH : (i + 1) * BATCH]["length"]) for i in range(steps)])
    trainer = SFTTrainer(model=model, args=args, train_dataset=train.dataset.remove_columns("length"),
                         processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return {"name": "trl+peft+bnb", "losses": [r["loss"] for r in logs],
            "grad_norms": [r["grad_norm"] for r in logs], "tokens_per_s": statistics.median(timer.rates[1:]),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "eval_before": None,
            "eval_after": held_out(), "train_seconds": seconds}  # fmt: skip


class StepTimer(TrainerCallback):
    """tokens/s of each optimizer step (the tokens of its rows, padding not counted, as ours counts)."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.rates, self._start = tokens, [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.rates.append(self.tokens[state.global_step - 1] / (time.perf_counter() - self._start))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # as it goes, like our metrics.jsonl: a run cut short still tells
            print(f"trl step {state.global_step}: {json.dumps(logs)}", file=sys.stderr, flush=True)


def compare(ours: dict, trl: dict) -> dict:
    """Relative differences of ours from TRL's: each step's loss, their means, the held-out loss."""
    rel = [abs(a - b) / b for a, b in zip(ours["losses"], trl["losses"], strict=True)]
    mean = abs(statistics.mean(ours["losses"]) - statistics.mean(trl["losses"])) / statistics.mean(
        trl["losses"]
    )
    return {"max_step_rel": max(rel), "worst_step": rel.index(max(rel)) + 1, "median_step_rel": statistics.median(rel),
            "steps_within_2pct": sum(r <= 0.02 for r in rel), "steps_within_1pct": sum(r <= 0.01 for r in rel),
            "mean_loss_rel": mean,
            "eval_after_rel": abs(ours["eval_after"] - trl["eval_after"]) / trl["eval_after"],
            "tokens_per_s_ratio": ours["tokens_per_s"] / trl["tokens_per_s"],
            "peak_rss_ratio": ours["peak_rss"] / trl["peak_rss"]}  # fmt: skip


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def print_table(rows: list[dict], cmp: dict, steps: int, dropout: float, autocast: bool) -> None:
    print(f"\nSmolLM2-135M, chatterbot pairs, {steps} steps of {BATCH}, r=64, lora_dropout {dropout}, "
          f"TRL bf16={autocast}\n")  # fmt: skip
    print(
        "| | tokens/s (median) | peak RSS | first loss | last loss | mean loss | held-out before -> after |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['tokens_per_s']:.0f} | {r['peak_rss'] / 2**30:.2f} GiB | {r['losses'][0]:.4f} | "
              f"{r['losses'][-1]:.4f} | {statistics.mean(r['losses']):.4f} | "
              f"{_num(r['eval_before'])} -> {r['eval_after']:.4f} |")  # fmt: skip
    print(f"\nours vs TRL: loss per step within {cmp['max_step_rel']:.2%} (worst at step {cmp['worst_step']}; "
          f"median {cmp['median_step_rel']:.2%}; {cmp['steps_within_2pct']}/{steps} steps within 2%, "
          f"{cmp['steps_within_1pct']}/{steps} within 1%), mean loss "
          f"{cmp['mean_loss_rel']:.2%}, held-out loss after {cmp['eval_after_rel']:.2%}; tokens/s "
          f"{cmp['tokens_per_s_ratio']:.2f}x, peak RSS {cmp['peak_rss_ratio']:.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument(
        "--lora-compute-dtype",
        help="ours: qlora.lora_compute_dtype (bfloat16: the LoRA products as TRL's autocast runs them)",
    )
    parser.add_argument(
        "--cache", type=Path, default=Path("bench_out"), help="where SmolLM2's folder is built"
    )
    parser.add_argument("--work", type=Path, default=Path("bench_out/train_trl"))
    parser.add_argument("--json", type=Path, default=None, help="default: WORK/result.json")
    parser.add_argument(
        "--parallel", action="store_true", help="run both at once (a shared machine: both see the same load)"
    )
    parser.add_argument(
        "--no-trl-autocast", dest="trl_autocast", action="store_false",
        help="TRL with bf16=False (no autocast): our arithmetic (see the module's docstring)",
    )  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run TRL in this process
    args = parser.parse_args()
    from qlora_compile.tools import assets

    folder = assets.smollm2_folder(args.cache)
    if args.one:
        print(json.dumps(run_trl(args.work, folder, args.steps, args.trl_autocast)))
        return
    prepare(args.work, folder, args.steps, args.lora_dropout, args.lora_compute_dtype)
    theirs = [sys.executable, __file__, "--one", "trl", "--steps", str(args.steps), "--cache", str(args.cache),
              "--work", str(args.work), *([] if args.trl_autocast else ["--no-trl-autocast"])]  # fmt: skip
    runs = []
    for cmd in (ours_command(args.work), theirs):
        runs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        if not args.parallel:
            runs[-1].wait()
    outputs = [r.communicate()[0] for r in runs]
    if any(r.returncode for r in runs):
        sys.exit(f"a candidate failed: exit codes {[r.returncode for r in runs]}")
    ours, trl = ours_result(args.work), json.loads(outputs[1].strip().splitlines()[-1])
    cmp = compare(ours, trl)
    print_table([ours, trl], cmp, args.steps, args.lora_dropout, args.trl_autocast)
    out = args.json or args.work / "result.json"
    out.write_text(json.dumps({"ours": ours, "trl": trl, "compare": cmp, "steps": args.steps,
                               "lora_dropout": args.lora_dropout, "trl_autocast": args.trl_autocast},
                              indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
