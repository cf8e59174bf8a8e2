"""CPU speed of the 4-bit format and the linear op, side by side with bitsandbytes in one run.

    python benchmarks/bench_format.py [--repeats 7] [--json bench_out/format.json]

Every row runs the candidates interleaved (A, B, C, A, B, C, ...) and reports the median of
`--repeats` runs after one warm-up, so drift on a shared machine hits all of them alike.
- quantize / dequantize: G elements per second, ours over bitsandbytes (higher is better).
- linear forward + backward (dX only, frozen weight): milliseconds; ratios to dense `F.linear`
  on the dequantized weight (the floor) and to `bitsandbytes.matmul_4bit`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logging.disable(logging.WARNING)  # bitsandbytes warns about optional CPU kernels it cannot fetch
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbf  # noqa: E402

from qlora_compile import quantize_weight  # noqa: E402


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per candidate, runs interleaved."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_format(repeats: int) -> list[dict]:
    rows = []
    for shape in [(4096, 4096), (4096, 11008)]:
        w = torch.randn(shape, dtype=torch.bfloat16) * 0.02
        n = w.numel()
        q = interleaved(
            {
                "bnb": lambda: bnbf.quantize_4bit(
                    w, blocksize=64, compress_statistics=True, quant_type="nf4"
                ),
                "ours": lambda: quantize_weight(w),
            },
            max(3, repeats // 2),  # bitsandbytes quantizes at ~0.05 G/s: keep the run short
        )
        rows.append({"op": "quantize nf4+dq", "shape": shape, "dtype": "bf16", "n": n, **q})
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        qw = quantize_weight(w)
        d = interleaved({"bnb": lambda: bnbf.dequantize_4bit(packed, state), "ours": qw.dequantize}, repeats)
        rows.append({"op": "dequantize nf4+dq", "shape": shape, "dtype": "bf16 out", "n": n, **d})
    return rows


def bench_linear(repeats: int) -> list[dict]:
    rows = []
    k = n_out = 2048
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.randn(n_out, k, dtype=dtype) * 0.02
        qw = quantize_weight(w)
        dense_w = qw.dequantize(dtype)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        for m in (512, 2048):
            x = torch.randn(m, k, dtype=dtype, requires_grad=True)
            g = torch.randn(m, n_out, dtype=dtype)
            t = interleaved(
                {
                    "dense": lambda: F.linear(x, dense_w).backward(g),
                    "ours": lambda: qw.linear(x).backward(g),
                    "bnb": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state).backward(g),
                },
                repeats,
            )
            rows.append({"op": "linear fwd+bwd", "M": m, "K": k, "N": n_out, "dtype": str(dtype)[6:], **t})
    return rows


def table(format_rows: list[dict], linear_rows: list[dict]) -> str:
    lines = [
        f"CPU: {torch.get_num_threads()} threads, torch {torch.__version__}, bitsandbytes {bnb.__version__}",
        "",
        "| operation | shape | bitsandbytes | qlora-compile | ours / bnb |",
        "|---|---|---|---|---|",
    ]
    for r in format_rows:
        gb, go = r["n"] / r["bnb"] / 1e9, r["n"] / r["ours"] / 1e9
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"| {r['op']} | {shape} {r['dtype']} | {gb:.3f} G el/s | {go:.3f} G el/s | {gb and go / gb:.1f}x |"
        )
    lines += [
        "",
        "| linear fwd+bwd | dense F.linear | bitsandbytes | qlora-compile | ours / dense | ours / bnb |",
        "|---|---|---|---|---|---|",
    ]
    for r in linear_rows:
        lines.append(
            f"| M={r['M']} K=N={r['K']} {r['dtype']} | {r['dense'] * 1e3:.1f} ms | {r['bnb'] * 1e3:.1f} ms "
            f"| {r['ours'] * 1e3:.1f} ms | {r['ours'] / r['dense']:.3f}x | {r['ours'] / r['bnb']:.3f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=Path("bench_out/format.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    format_rows = bench_format(args.repeats)
    linear_rows = bench_linear(args.repeats)
    print(table(format_rows, linear_rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"format": format_rows, "linear": linear_rows}, indent=1))


if __name__ == "__main__":
    main()
