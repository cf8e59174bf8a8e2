"""CPU step time of the paged AdamW against torch and bitsandbytes, in one run.

    python benchmarks/bench_optim.py [--sizes 10 100] [--repeats 5] [--threads N] [--json bench_out/optim.json]

Trainable parameters are LoRA-shaped fp32 tensors (64 x 4096), 10M and 100M elements in all, with
fixed random gradients; every candidate steps the same tensors (values drift, time does not).
Candidates run interleaved (A, B, C, A, B, C, ...), one warm-up step each (it allocates the
states), then the median of `--repeats` steps; ratios are to `torch.optim.AdamW(foreach=True)`.
"paged 10%" is ours with `device_budget` = 10% of the state bytes: on CPU the rest of the state
lives in a memory-mapped temporary file and every step pages all of it through the budget.

A second table counts parameter-gradient bytes alive during backward (a stack of 8 Linear
1024 x 1024 layers), with the optimizer stepping after backward or inside it
(`qlora_compile.optim.step_in_backward`).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from pathlib import Path

import torch

logging.disable(logging.WARNING)  # bitsandbytes warns about optional CPU kernels it cannot fetch
import bitsandbytes as bnb  # noqa: E402

from qlora_compile.optim import PagedAdamW, step_in_backward  # noqa: E402

SHAPE = (64, 4096)


def candidates(params: list[torch.Tensor]) -> dict:
    state32 = PagedAdamW(params).state_nbytes()
    state8 = PagedAdamW(params, optim_bits=8).state_nbytes()
    return {
        "torch AdamW foreach": lambda: torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, foreach=True),
        "torch AdamW fused": lambda: torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True),
        "bnb AdamW (32-bit)": lambda: bnb.optim.AdamW(params, lr=2e-4, weight_decay=0.0),
        "ours 32-bit": lambda: PagedAdamW(params),
        "ours 32-bit, paged 10%": lambda: PagedAdamW(params, device_budget=state32 // 10),
        "ours 32-bit fused": lambda: PagedAdamW(params, fused=True),
        "ours 32-bit fused, paged 10%": lambda: PagedAdamW(params, fused=True, device_budget=state32 // 10),
        "bnb AdamW8bit": lambda: bnb.optim.AdamW8bit(params, lr=2e-4, weight_decay=0.0),
        "ours 8-bit": lambda: PagedAdamW(params, optim_bits=8),
        "ours 8-bit, paged 10%": lambda: PagedAdamW(params, optim_bits=8, device_budget=state8 // 10),
    }


def bench_steps(millions: int, repeats: int) -> list[dict]:
    count = round(millions * 1e6 / (SHAPE[0] * SHAPE[1]))
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(SHAPE, generator=g) * 0.02) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(SHAPE, generator=g) * 1e-3
    opts = {name: make() for name, make in candidates(params).items()}
    times: dict[str, list[float]] = {name: [] for name in opts}
    for opt in opts.values():
        opt.step()  # warm-up: allocates the states
    for _ in range(repeats):
        for name, opt in opts.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["torch AdamW foreach"])
    rows = []
    for name, t in times.items():
        opt = opts[name]
        state = opt.state_nbytes() if isinstance(opt, PagedAdamW) else None
        pager = getattr(opt, "pager", None)
        med = statistics.median(t)
        rows.append(
            {
                "params_M": millions,
                "tensors": count,
                "candidate": name,
                "step_s": med,
                "vs_torch_foreach": med / base,
                "state_bytes": state,
                "peak_resident_bytes": pager.peak_resident_nbytes if pager else None,
            }
        )
    del opts
    gc.collect()
    return rows


def bench_grad_memory() -> list[dict]:
    rows = []
    for mode in ("step after backward", "step in backward"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
        params = list(model.parameters())
        opt = PagedAdamW(params)
        peak = [0]

        def meter(_, params=params, peak=peak):
            peak[0] = max(peak[0], sum(p.grad.nbytes for p in params if p.grad is not None))

        for p in params:
            p.register_post_accumulate_grad_hook(meter)  # first: sees each gradient before a step frees it
        if mode == "step in backward":
            step_in_backward(model, opt)
        x = torch.randn(32, 1024)
        model(x).square().mean().backward()
        if mode == "step after backward":
            opt.step()
        rows.append({"mode": mode, "peak_grad_bytes": peak[0], "one_weight_grad_bytes": 1024 * 1024 * 4})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="millions of parameters")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for millions in args.sizes:
        rows += bench_steps(millions, args.repeats)
        print(f"\n| {millions}M params | step time | vs torch foreach | peak resident state |")
        print("|---|---|---|---|")
        for r in rows:
            if r["params_M"] == millions:
                res = f"{r['peak_resident_bytes'] / 2**20:.1f} MiB" if r["peak_resident_bytes"] else "all"
                print(
                    f"| {r['candidate']} | {r['step_s'] * 1e3:.0f} ms | {r['vs_torch_foreach']:.2f}x | {res} |"
                )
    grads = bench_grad_memory()
    print("\n| 8 x Linear(1024, 1024) | peak parameter-gradient bytes |")
    print("|---|---|")
    for r in grads:
        print(f"| {r['mode']} | {r['peak_grad_bytes'] / 2**20:.2f} MiB |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": rows, "grad_memory": grads}, indent=1))


if __name__ == "__main__":
    main()
