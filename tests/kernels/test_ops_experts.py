"""qlora::experts_linear and qlora::grouped_mm against a per-expert loop of dense products."""

import torch
import torch.nn.functional as F

from qlora_compile import quantize_weight
from qlora_compile.experts import QuantizedExperts

COUNTS = torch.tensor([3, 0, 5, 1])  # an expert without rows costs nothing and gets no gradient


def _experts(out_features=48, in_features=80):
    weights = [quantize_weight(torch.randn(out_features, in_features)) for _ in COUNTS]
    return QuantizedExperts(weights, compute_dtype=torch.float32)


def _loop(x, weights):
    rows = torch.split(x, COUNTS.tolist())
    return torch.cat([F.linear(r, w) for r, w in zip(rows, weights, strict=True)])


def test_experts_linear_equals_a_loop_of_dequantized_products():
    layer = _experts()
    x = torch.randn(int(COUNTS.sum()), layer.in_features, requires_grad=True)
    y = layer(x, COUNTS)
    x2 = x.detach().clone().requires_grad_(True)
    expected = _loop(x2, layer.dequantize(torch.float32))
    assert torch.equal(y, expected)
    g = torch.randn_like(y)
    y.backward(g)
    expected.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)


def test_grouped_mm_values_and_gradients():
    x = torch.randn(int(COUNTS.sum()), 16, requires_grad=True)
    w = torch.randn(len(COUNTS), 8, 16, requires_grad=True)
    y = torch.ops.qlora.grouped_mm(x, w, COUNTS)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    expected = _loop(x2, w2)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    y.backward(g)
    expected.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    assert not w.grad[1].any()


def test_opcheck():
    layer = _experts(16, 64)
    x = torch.randn(int(COUNTS.sum()), 64, requires_grad=True)
    args = (
        x,
        COUNTS,
        layer.weight_packed,
        layer.weight_absmax,
        layer.weight_nested_absmax,
        layer.weight_offset,
    )
    torch.library.opcheck(torch.ops.qlora.experts_linear, (*args, "nf4", 64, layer.shape))
    w = torch.randn(len(COUNTS), 8, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.qlora.grouped_mm, (x, w, COUNTS))
