"""The paged optimizer on CUDA: pinned host pages, the side-stream prefetch, the budget.

Runs where CUDA is present (`tools/gpu_check.sh` on a lent GPU); the CPU suite covers the same
numerics with the memory-mapped host store.
"""

import pytest
import torch

from qlora_compile.optim import PagedAdamW

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tools/gpu_check.sh)"),
]

SHAPES = ((512, 1000), (64,), (300, 257), (2048, 64))
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).cuda()) for s in SHAPES]


def _run(params, opt, steps):
    for t in range(steps):
        g = torch.Generator().manual_seed(1000 + t)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * (1 + t % 5)).cuda()
        opt.step()
    torch.cuda.synchronize()


@pytest.mark.parametrize("bits", [32, 8])
def test_paged_equals_unpaged_on_cuda_within_budget(bits):
    plain = _params()
    _run(plain, PagedAdamW(plain, optim_bits=bits, **HYPER), 20)
    paged = _params()
    budget = 300_000
    opt = PagedAdamW(
        paged, optim_bits=bits, device_budget=budget, page_elements=8192, resident_below=1000, **HYPER
    )
    _run(paged, opt, 20)
    for a, b in zip(plain, paged, strict=True):
        assert torch.equal(a, b)
    pager = opt.pager
    assert pager.page_outs > 0 and pager.page_ins > len(pager)  # it really paged
    assert pager.peak_resident_nbytes <= budget
    assert pager._host.data.is_pinned()


def test_32bit_on_cuda_matches_torch_adamw():
    ref = _params()
    _run(ref, torch.optim.AdamW(ref, foreach=False, **HYPER), 50)
    ours = _params()
    _run(ours, PagedAdamW(ours, **HYPER), 50)
    for a, b in zip(ref, ours, strict=True):
        assert (a - b).norm() <= 1e-6 * a.norm()
