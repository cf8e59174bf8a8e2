"""Paging keeps its promise: with a budget of 10% of the state size, over 50 steps, the pager's
resident bytes never exceed the budget and the process's RSS grows by less than the budget plus a
constant (psutil after each step, and the kernel's peak RSS, VmHWM, reset before the optimizer
exists; in a fresh subprocess, against an unpaged run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import gc, json, sys
import psutil, torch
from qlora_compile.optim import PagedAdamW

torch.set_num_threads(1)
bits, paged, steps = int(sys.argv[1]), sys.argv[2] == "paged", int(sys.argv[3])
torch.manual_seed(0)
kw = {"optim_bits": bits, "page_elements": 1 << 14}
# warm-up: fault in the code and tables both paths use, so they do not count as growth
warm = [torch.nn.Parameter(torch.randn(1 << 16))]
warm[0].grad = torch.randn(1 << 16)
PagedAdamW(warm, device_budget=1 << 20, **kw).step()
PagedAdamW(warm, **kw).step()
del warm
params = [torch.nn.Parameter(torch.randn(1 << 19)) for _ in range(4)]  # 2M elements
for p in params:
    p.grad = torch.randn(p.shape) * 1e-2
proc = psutil.Process()
state = PagedAdamW(params, **kw).state_nbytes()
budget = state // 10
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
rss0 = proc.memory_info().rss
opt = PagedAdamW(params, device_budget=budget if paged else None, **kw)
growth, resident = [], []
for _ in range(steps):
    opt.step()
    growth.append(proc.memory_info().rss - rss0)
    if opt.pager is not None:
        resident.append(opt.pager.peak_resident_nbytes)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")) - rss0
print(json.dumps({"state": state, "budget": budget, "max_growth": max(growth), "peak_growth": peak,
                  "peak_resident": max(resident, default=None), "page_ins": getattr(opt.pager, "page_ins", 0)}))
"""

CONSTANT = 4 << 20  # temporaries of one page, the allocator's slack


def _measure(bits: int, mode: str, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(bits), mode, str(steps)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bits", [32, 8])
def test_paged_rss_stays_within_budget(bits):
    paged = _measure(bits, "paged", 50)
    print(f"{bits}-bit paged:", paged)
    assert paged["peak_resident"] <= paged["budget"]
    assert paged["page_ins"] >= 50 * 10  # every step pages the whole state through
    assert paged["max_growth"] < paged["budget"] + CONSTANT
    assert paged["peak_growth"] < paged["budget"] + CONSTANT
    if bits == 32:  # the measurement sees states: unpaged, RSS grows by the whole state
        unpaged = _measure(bits, "unpaged", 3)
        print(f"{bits}-bit unpaged:", unpaged)
        assert unpaged["max_growth"] > 0.9 * unpaged["state"]
