"""Step-in-backward hooks, gradient clipping, and `compile()`'s optimizer."""

import pytest
import torch
from torch import nn

import qlora_compile
from qlora_compile.optim import PagedAdamW, step_in_backward

HYPER = {"lr": 1e-2, "weight_decay": 0.01}


def _model(seed=0, width=128, depth=6):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


def _batch(t, width=128):
    g = torch.Generator().manual_seed(t)
    return torch.randn(16, width, generator=g), torch.randn(16, width, generator=g)


def _loss(model, t):
    x, y = _batch(t)
    return nn.functional.mse_loss(model(x), y)


class GradMeter:
    """Bytes of parameter gradients alive at each post-accumulate hook; registered first, so it
    sees the new gradient before a step-in-backward hook frees it."""

    def __init__(self, model):
        self.params = list(model.parameters())
        self.peak = 0
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, _):
        live = sum(p.grad.nbytes for p in self.params if p.grad is not None)
        self.peak = max(self.peak, live)


@pytest.mark.parametrize("bits", [32, 8])
def test_step_in_backward_equals_step_after_backward(bits):
    normal, hooked = _model(), _model()
    opt_n = PagedAdamW(normal.parameters(), optim_bits=bits, **HYPER)
    opt_h = PagedAdamW(
        hooked.parameters(), optim_bits=bits, **HYPER, device_budget=80_000, page_elements=4096
    )
    meter_n, meter_h = GradMeter(normal), GradMeter(hooked)
    handle = step_in_backward(hooked, opt_h)
    for t in range(4):
        _loss(normal, t).backward()
        opt_n.step()
        opt_n.zero_grad()
        _loss(hooked, t).backward()
        assert all(p.grad is None for p in hooked.parameters())
    for a, b in zip(normal.parameters(), hooked.parameters(), strict=True):
        assert torch.equal(a, b)
    assert handle.steps == 4 * len(list(hooked.parameters()))
    weight = 128 * 128 * 4
    total = sum(p.numel() * 4 for p in normal.parameters())
    assert meter_n.peak == total  # every gradient alive at the end of backward
    assert meter_h.peak == weight  # one weight's gradient (at most one alive at a time)
    handle.remove()
    _loss(hooked, 9).backward()
    assert hooked[0].weight.grad is not None  # hooks gone


def test_clipping_in_step_in_backward_needs_per_parameter():
    model = _model(depth=2)
    opt = PagedAdamW(model.parameters(), **HYPER)
    with pytest.raises(ValueError, match="per_parameter=True"):
        step_in_backward(model, opt, max_grad_norm=0.3)
    with pytest.raises(ValueError, match="belong to the optimizer"):
        step_in_backward(_model(depth=1), opt)
    with pytest.raises(TypeError, match="cannot step one parameter"):
        step_in_backward(model, torch.optim.AdamW(model.parameters()))

    ref = _model(depth=2)
    ref_opt = PagedAdamW(ref.parameters(), **HYPER)
    handle = step_in_backward(model, opt, max_grad_norm=0.05, per_parameter=True)
    _loss(model, 0).backward()
    _loss(ref, 0).backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    assert handle.grad_norm() == pytest.approx(float(norm), rel=1e-5)
    for p in ref.parameters():
        torch.nn.utils.clip_grad_norm_(p, 0.05)
    ref_opt.step()
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


FAST = {"backend": "eager", "r": 4, "compute_dtype": torch.float32, "lora_dropout": 0.0}


def _qlora_model(**overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    return qlora_compile.compile(model, **FAST, **overrides)


def _train(model, steps=3):
    norms = []
    for t in range(steps):
        x, y = torch.randn(8, 64, generator=torch.Generator().manual_seed(t)), torch.zeros(8, 64)
        nn.functional.mse_loss(model(x), y).backward()
        norms.append(model.qlora.step())
    return norms


def test_compile_optimizer_is_paged_adamw_with_global_clipping():
    model = _qlora_model(optim_bits=8, device_budget=1 << 20, lr=1e-3)
    opt = model.qlora.optimizer
    assert isinstance(opt, PagedAdamW) and opt.optim_bits == 8 and opt.device_budget == 1 << 20
    assert opt.param_groups[0]["lr"] == 1e-3

    # global-norm clipping at 0.3 (the paper's) in normal mode, against torch's AdamW
    ref = _qlora_model()
    ref_opt = torch.optim.AdamW(ref.qlora.trainable_parameters(), lr=2e-4, weight_decay=0.0, foreach=False)
    model = _qlora_model()
    for t in range(3):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(t))
        nn.functional.mse_loss(ref(x), torch.full((8, 64), 5.0)).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.qlora.trainable_parameters(), 0.3)
        ref_opt.step()
        ref_opt.zero_grad()
        nn.functional.mse_loss(model(x), torch.full((8, 64), 5.0)).backward()
        assert model.qlora.step() == pytest.approx(float(ref_norm))
        assert ref_norm > 0.3  # clipping was active
    for a, b in zip(ref.qlora.trainable_parameters(), model.qlora.trainable_parameters(), strict=True):
        assert torch.equal(a, b)


def test_compile_step_in_backward_flag():
    with pytest.raises(ValueError, match="clip_per_parameter=True"):
        qlora_compile.QLoRAConfig(step_in_backward=True)
    model = _qlora_model(step_in_backward=True, max_grad_norm=None)
    plain = _qlora_model(max_grad_norm=None)
    norms, ref_norms = _train(model), _train(plain)
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert all(p.grad is None for p in model.qlora.trainable_parameters())
    for a, b in zip(plain.qlora.trainable_parameters(), model.qlora.trainable_parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"device_budget": 0}, "device_budget must be"),
        ({"device_budget": 1.5}, "device_budget must be"),
        ({"device_budget": 1024, "paged": False}, "needs paged=True"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be"),
        ({"optim_bits": 4}, "optim_bits must be one of"),
    ],
)
def test_config_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        qlora_compile.QLoRAConfig(**kwargs)
