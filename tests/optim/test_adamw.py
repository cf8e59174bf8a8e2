"""PagedAdamW / PagedAdamW8bit: numerics against torch.optim.AdamW and bitsandbytes, paging,
checkpoints, state sizes and bad input."""

import logging

import pytest
import torch

from qlora_compile.optim import (
    PagedAdamW,
    PagedAdamW8bit,
    load_optimizer,
    save_optimizer,
    state_nbytes_for,
)

# several page sizes' worth, a partial last page, a tensor under 4096 and one under 1e5 elements
SHAPES = ((96, 700), (64,), (40, 1030), (3, 257))
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
PAGED = {"device_budget": 120_000, "page_elements": 4096, "resident_below": 1000}


def _params(seed=0, shapes=SHAPES, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) * (1 + step % 7) for p in params]


def _run(params, opt, steps, start=0):
    for t in range(start, start + steps):
        for p, g in zip(params, _grads(params, t), strict=True):
            p.grad = g.to(p.dtype)
        opt.step()
    return params


def test_32bit_matches_torch_adamw_200_steps():
    ref = _run(_params(), None, 0)
    torch_opt = torch.optim.AdamW(ref, foreach=False, **HYPER)
    _run(ref, torch_opt, 200)
    ours = _params()
    opt = PagedAdamW(ours, **HYPER)
    _run(ours, opt, 200)
    for a, b in zip(ref, ours, strict=True):
        assert ((a - b).abs() / a.abs().clamp_min(1e-12)).max() <= 1e-6
        assert torch.equal(a, b)  # in fact op for op, so bit for bit
    sd = opt.state_dict()
    for i, p in enumerate(ref):
        assert torch.equal(sd["state"][i]["exp_avg"], torch_opt.state[p]["exp_avg"])
        assert torch.equal(sd["state"][i]["exp_avg_sq"], torch_opt.state[p]["exp_avg_sq"])


def test_fused_32bit_is_close_to_torch_adamw():
    ref = _params()
    _run(ref, torch.optim.AdamW(ref, foreach=False, **HYPER), 200)
    ours = _params()
    _run(ours, PagedAdamW(ours, fused=True, **HYPER), 200)
    for a, b in zip(ref, ours, strict=True):
        assert (a - b).norm() <= 1e-6 * a.norm()


@pytest.mark.parametrize(("bits", "fused"), [(32, False), (32, True), (8, False)])
def test_paged_equals_unpaged_bit_for_bit(bits, fused):
    plain = _params()
    _run(plain, PagedAdamW(plain, optim_bits=bits, fused=fused, **HYPER), 30)
    paged = _params()
    opt = PagedAdamW(paged, optim_bits=bits, fused=fused, **HYPER, **PAGED)
    _run(paged, opt, 30)
    for a, b in zip(plain, paged, strict=True):
        assert torch.equal(a, b)
    pager = opt.pager
    assert pager.page_outs > 0 and pager.page_ins > len(pager)  # it really paged
    assert pager.peak_resident_nbytes <= PAGED["device_budget"]


def test_8bit_tracks_bitsandbytes_adamw8bit_200_steps():
    import bitsandbytes as bnb

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    shapes = ((96, 700), (40, 1030))  # 8-bit states (>= 4096 elements), as bitsandbytes keeps them
    ref = _params(shapes=shapes)
    bnb_opt = bnb.optim.AdamW8bit(ref, **HYPER)
    _run(ref, bnb_opt, 200)
    ours = _params(shapes=shapes)
    opt = PagedAdamW8bit(ours, **HYPER, **PAGED)
    _run(ours, opt, 200)
    for a, b in zip(ref, ours, strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()  # the tolerance asked for ...
        assert torch.equal(a, b)  # ... and in fact bit for bit (bitsandbytes 0.50.2, CPU)
    sd = opt.state_dict()
    for i, p in enumerate(ref):
        st, mine = bnb_opt.state[p], sd["state"][i]
        assert torch.equal(mine["exp_avg_codes"].view(-1), st["state1"].view(-1))
        assert torch.equal(mine["exp_avg_sq_codes"].view(-1), st["state2"].view(-1))
        assert torch.equal(mine["exp_avg_absmax"], st["absmax1"])
        assert torch.equal(mine["exp_avg_sq_absmax"], st["absmax2"])


def test_bf16_parameters_step_in_fp32():
    ours = _params(dtype=torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().float()) for p in ours]
    _run(ours, PagedAdamW(ours, **HYPER), 5)
    _run(ref, torch.optim.AdamW(ref, foreach=False, **HYPER), 5)
    for a, b in zip(ref, ours, strict=True):
        assert b.dtype == torch.bfloat16
        assert torch.allclose(a, b.float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize(("bits", "first", "second"), [(32, {}, PAGED), (8, PAGED, {}), (8, PAGED, PAGED)])
def test_checkpoint_continuation_is_bit_identical(tmp_path, fmt, bits, first, second):
    straight = _params()
    _run(straight, PagedAdamW(straight, optim_bits=bits, **HYPER), 12)

    params = _params()
    opt = PagedAdamW(params, optim_bits=bits, **HYPER, **first)
    _run(params, opt, 5)
    path = tmp_path / f"optim.{fmt}"
    save_optimizer(opt, path)
    saved = [p.detach().clone() for p in params]
    del opt

    resumed = [torch.nn.Parameter(t) for t in saved]
    fresh = PagedAdamW(resumed, optim_bits=bits, lr=1.0, **second)  # lr comes from the checkpoint
    load_optimizer(fresh, path)
    assert fresh.param_groups[0]["lr"] == HYPER["lr"]
    _run(resumed, fresh, 7, start=5)
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


def test_state_dict_round_trip_and_kind_mismatch():
    params = _params()
    opt = PagedAdamW8bit(params, **HYPER)
    _run(params, opt, 2)
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {
        "step",
        "exp_avg_codes",
        "exp_avg_sq_codes",
        "exp_avg_absmax",
        "exp_avg_sq_absmax",
    }
    assert set(sd["state"][1]) == {"step", "exp_avg", "exp_avg_sq"}  # 64 elements: 32-bit states
    with pytest.raises(ValueError, match="optim_bits=8"):
        PagedAdamW(_params(), **HYPER).load_state_dict(sd)


def test_state_nbytes_follows_the_planner_formula():
    params = _params()
    for bits in (32, 8):
        expect = 0
        for p in params:
            n = p.numel()
            expect += 2 * n + 8 * -(-n // 256) if bits == 8 and n >= 4096 else 8 * n
            assert state_nbytes_for(n, bits) == (
                2 * n + 8 * -(-n // 256) if bits == 8 and n >= 4096 else 8 * n
            )
        for kw in ({}, PAGED):
            opt = PagedAdamW(params, optim_bits=bits, **HYPER, **kw)
            assert opt.state_nbytes() == expect
            _run(_params(), opt, 0)
            if kw:
                opt.step()  # no grads: allocates the layout, steps nothing
                assert opt.pager.resident_nbytes <= kw["device_budget"]


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"lr": -1e-3}, ValueError, "lr must be"),
        ({"betas": (0.9, 1.0)}, ValueError, "betas"),
        ({"betas": (0.9,)}, ValueError, "betas"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"optim_bits": 16}, ValueError, "optim_bits must be 8 or 32"),
        ({"device_budget": 0}, ValueError, "device_budget"),
        ({"device_budget": -5}, ValueError, "device_budget"),
        ({"page_elements": 1000}, ValueError, "page_elements"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        PagedAdamW(_params(), **kwargs)


def test_bad_parameters_and_gradients():
    with pytest.raises(TypeError, match="floating-point"):
        PagedAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)])
    with pytest.raises(ValueError, match="optim_bits=8"):
        PagedAdamW8bit(_params(), optim_bits=32)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = PagedAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    tiny = _params(shapes=((100, 100),))
    with pytest.raises(ValueError, match="cannot hold one page"):
        PagedAdamW(tiny, device_budget=1000, page_elements=4096).step()
    opt = PagedAdamW(_params())
    opt.step()
    with pytest.raises(RuntimeError, match="before the first step"):
        opt.add_param_group({"params": _params(shapes=((4,),))})
