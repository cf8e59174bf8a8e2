"""GPU benchmark of the Triton kernels against cuBLAS (dense bf16) and bitsandbytes, in one run.

    python benchmarks/bench_gpu.py [--json OUT.json]

Times are medians of `triton.testing.do_bench` (which flushes L2 between runs).
- dequantize: G elements/s, ours vs bitsandbytes `dequantize_4bit`.
- GEMV (one token): achieved bandwidth counting the 4.127-bit weight bytes plus x and y, as a
  fraction of the H200's 4.8 TB/s HBM3e; against cuBLAS bf16 on the dense weight and bitsandbytes.
- fused dequant-matmul (forward) and dX (backward) at M = 16, 128, 2048: TFLOP/s against cuBLAS.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from qlora_compile import quantize_weight
from qlora_compile.kernels import triton_dequant, triton_matmul

HBM_BYTES_PER_S = 4.8e12  # H200 HBM3e peak
BITS = 4 + 8 / 64 + 32 / (64 * 256)


def bench(fn) -> float:
    """Median seconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def try_bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        return bnb, bnbf
    except ImportError:
        return None, None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=Path("bench_out/gpu.json"))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    torch.manual_seed(0)
    bnb, bnbf = try_bnb()
    dev, dt = "cuda", torch.bfloat16
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    rows = results["rows"]
    lines = [
        f"{results['device']}, torch {torch.__version__}, triton {triton.__version__}, bitsandbytes {bnb.__version__ if bnb else 'absent'}",
        "",
    ]

    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
        qw = quantize_weight(w)
        dense = qw.dequantize(dt)
        args4 = qw.op_args()
        state = packed = None
        if bnb:
            packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        # dequantize
        t_ours = bench(lambda: triton_dequant.dequantize(*args4, "nf4", 64, n * k, dt))
        t_bnb = bench(lambda: bnbf.dequantize_4bit(packed, state)) if bnb else float("nan")
        rows.append({"op": "dequantize", "N": n, "K": k, "ours_s": t_ours, "bnb_s": t_bnb})
        lines.append(
            f"dequantize {n}x{k}: ours {n * k / t_ours / 1e9:.1f} G el/s, bnb {n * k / t_bnb / 1e9:.1f} G el/s"
        )
        # GEMV
        x = torch.randn(1, k, device=dev, dtype=dt)
        byts = n * k * BITS / 8 + 2 * (k + n)
        t_gemv = bench(lambda: triton_matmul.gemv(x, *args4, None, "nf4", 64, [n, k]))
        t_cublas = bench(lambda: F.linear(x, dense))
        t_bnb = bench(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)) if bnb else float("nan")
        rows.append(
            {
                "op": "gemv",
                "N": n,
                "K": k,
                "ours_s": t_gemv,
                "cublas_bf16_s": t_cublas,
                "bnb_s": t_bnb,
                "bytes": byts,
            }
        )
        lines.append(
            f"GEMV {n}x{k}: ours {t_gemv * 1e6:.1f} us = {byts / t_gemv / 1e12:.2f} TB/s "
            f"({byts / t_gemv / HBM_BYTES_PER_S:.0%} of HBM); cuBLAS bf16 {t_cublas * 1e6:.1f} us; bnb {t_bnb * 1e6:.1f} us"
        )
        # fused forward and dX
        for m in (16, 128, 2048):
            xm = torch.randn(m, k, device=dev, dtype=dt)
            gm = torch.randn(m, n, device=dev, dtype=dt)
            flops = 2 * m * n * k
            t_fwd = bench(lambda: triton_matmul.linear_forward(xm, *args4, None, "nf4", 64, [n, k]))
            t_route = bench(lambda: triton_matmul.linear(xm, *args4, None, "nf4", 64, [n, k]))
            t_dx = bench(lambda: triton_matmul.linear_dx_fused(gm, *args4, "nf4", 64, [n, k]))
            t_cub = bench(lambda: F.linear(xm, dense))
            t_cub_dx = bench(lambda: gm @ dense)
            t_bnb = bench(lambda: bnb.matmul_4bit(xm, packed.t(), quant_state=state)) if bnb else float("nan")
            rows.append({
                "op": "matmul", "M": m, "N": n, "K": k, "fused_fwd_s": t_fwd, "routed_fwd_s": t_route,
                "fused_dx_s": t_dx, "cublas_fwd_s": t_cub, "cublas_dx_s": t_cub_dx, "bnb_fwd_s": t_bnb,
            })  # fmt: skip
            lines.append(
                f"M={m} {n}x{k}: fused fwd {flops / t_fwd / 1e12:.1f} TFLOP/s ({t_cub / t_fwd:.2f}x cuBLAS), "
                f"routed {flops / t_route / 1e12:.1f}, dX {flops / t_dx / 1e12:.1f} ({t_cub_dx / t_dx:.2f}x cuBLAS), "
                f"cuBLAS {flops / t_cub / 1e12:.1f}, bnb {flops / t_bnb / 1e12:.1f} TFLOP/s"
            )
        lines.append("")
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
