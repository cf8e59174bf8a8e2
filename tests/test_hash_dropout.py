"""`passes.hash_dropout`: dropout masks from a counter hash, as Inductor runs them on the CPU.

The numerics checked are `nn.Dropout`'s: each element kept with probability 1 - p, independently
of its neighbours and of other calls' masks, kept values scaled by 1 / (1 - p) as F.dropout
scales them, the rest zero; and Inductor's compiled integer arithmetic gives eager PyTorch's masks
bit for bit."""

import pytest
import torch
import torch.nn.functional as F

from qlora_compile.passes.hash_dropout import _BITS, hash32, hash_dropout, hash_dropouts, keep_mask

N = 1 << 20


def sigmas(observed: float, p: float, n: int) -> float:
    """How many binomial standard deviations `observed` (a fraction of n draws) is from p."""
    return abs(observed - p) / (p * (1 - p) / n) ** 0.5


def test_hash32_is_a_bijection_on_32_bits():
    x = torch.arange(N, dtype=torch.int64) * 4093 + 12345  # distinct 32-bit values
    h = hash32(x & 0xFFFFFFFF)
    assert h.min() >= 0 and h.max() < 2**32
    assert h.unique().numel() == N
    # each output bit is set half the time over consecutive inputs (a counter's low bits alone
    # would not be)
    bits = (hash32(torch.arange(N, dtype=torch.int64))[:, None] >> torch.arange(32)) & 1
    assert all(sigmas(f, 0.5, N) < 5 for f in bits.double().mean(0).tolist())


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_masks_keep_1_minus_p_independently(p):
    seeds = [torch.tensor(s) for s in (0, 1, 2**31, 0xDEADBEEF)]
    masks = [keep_mask((N,), p, s) for s in seeds]
    for m in masks:
        assert sigmas(m.double().mean().item(), 1 - p, N) < 5
        # neighbours, and rows of a (1024, 1024) view, are independent: P(both kept) = (1 - p)^2
        for a, b in ((m[:-1], m[1:]), (m[:-1024], m[1024:])):
            assert sigmas((a & b).double().mean().item(), (1 - p) ** 2, N) < 5
    # seeds that differ in one bit, or by one, give independent masks
    for a, b in ((masks[0], masks[1]), (masks[0], masks[2]), (masks[1], masks[3])):
        assert sigmas((a & b).double().mean().item(), (1 - p) ** 2, N) < 5
    assert torch.equal(keep_mask((N,), p, seeds[3]), masks[3])  # a function of (seed, index)


def test_threshold_rounds_p_to_24_bits():
    """The mask compares the hash's top 24 bits with round(p * 2**24)."""
    assert _BITS == 24
    seed = torch.tensor(7)
    top = hash32((torch.arange(N) ^ seed) & 0xFFFFFFFF) >> 8
    for p in (0.05, 0.3):
        assert torch.equal(keep_mask((N,), p, seed), top >= round(p * 2**24))


def test_values_are_f_dropouts():
    """Kept elements are x / (1 - p) as F.dropout computes them (x * (1 / (1 - p))), the others 0;
    the mean over many draws is x."""
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    p = 0.1  # 1 / 0.9 is not a binary fraction: the rounding of the scale shows
    out, reference = hash_dropout(x, p), F.dropout(x, p, training=True)
    kept, reference_kept = out != 0, reference != 0
    assert torch.equal(out[kept], (x * (1.0 / (1.0 - p)))[kept])
    assert torch.equal(reference[reference_kept], (x * (1.0 / (1.0 - p)))[reference_kept])
    draws = torch.stack([hash_dropout(x, p) for _ in range(400)])
    assert (draws.mean(0) - x).abs().max() < 6 * x.abs().max() * (p / (1 - p) / 400) ** 0.5
    assert not torch.equal(draws[0], draws[1])  # each call draws its own seed


def test_inductor_computes_the_eager_masks():
    """The mask's int64 arithmetic compiled by Inductor (vectorized C++) equals eager PyTorch's,
    for odd shapes and symbolic sizes."""
    compiled = torch.compile(lambda shape, s: keep_mask(shape, 0.05, s), backend="inductor", dynamic=True)
    for shape, seed in (((3, 1000), 0), ((7, 13, 37), 2**32 - 1), ((5, 999), 123456789)):
        s = torch.tensor(seed)
        assert torch.equal(compiled(shape, s), keep_mask(shape, 0.05, s)), shape


def test_the_pass_replaces_cpu_training_dropouts_only():
    def f(x):
        return F.dropout(x, 0.1, True) + F.dropout(x, 0.1, False) + F.dropout(x, 0.0, True)

    gm = torch.fx.symbolic_trace(f)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta["example_value"] = torch.empty(4)
    assert hash_dropouts(gm) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(hash_dropout) == 1 and targets.count(F.dropout) == 2
    x = torch.ones(10_000)
    out = gm(x) - 2 * x  # the eval-mode and p=0 dropouts give x each
    assert out.unique().tolist() == [0.0, torch.tensor(1.0 / 0.9).item()]
