"""torch.ops.qlora: values, autograd, fake kernels, and torch.compile without graph breaks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlora_compile import QuantizedWeight, quantize_weight
from tests import bnb_oracle


class QLinear(nn.Module):
    """A minimal module over the op (the real QLoRA linear lands with compile())."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        qw = quantize_weight(w)
        for name, t in zip(("packed", "absmax", "nested_absmax", "offset"), qw.op_args(), strict=True):
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.meta = (qw.quant_type, qw.blocksize, list(qw.shape))

    def forward(self, x):
        args = (self.packed, self.absmax, self.nested_absmax, self.offset)
        return torch.ops.qlora.linear(x, *args, self.bias, *self.meta)


def op_inputs(qw: QuantizedWeight):
    return (*qw.op_args(), qw.quant_type, qw.blocksize, list(qw.shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_op_equals_bitsandbytes(dtype):
    w = torch.randn(96, 256) * 0.02
    packed, state, _ = bnb_oracle.quantize(w.to(dtype), "nf4", 64, True)
    qw = quantize_weight(w.to(dtype))
    got = torch.ops.qlora.dequantize(*op_inputs(qw), dtype)
    assert got.shape == (96, 256) and got.dtype == dtype
    assert torch.equal(got, bnb_oracle.dequantize(packed, state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_values_and_gradients(dtype, with_bias):
    w = torch.randn(48, 128) * 0.05
    qw = quantize_weight(w.to(dtype))
    dense = qw.dequantize(dtype)
    bias = torch.randn(48, dtype=dtype, requires_grad=True) if with_bias else None
    x = torch.randn(2, 5, 128, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 5, 48, dtype=dtype)

    y = qw.linear(x, bias)
    y.backward(g)
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = None if bias is None else bias.detach().clone().requires_grad_()
    F.linear(x_ref, dense, bias_ref).backward(g)

    assert torch.equal(y, F.linear(x.detach(), dense, None if bias is None else bias.detach()))
    assert torch.equal(x.grad, x_ref.grad)
    if with_bias:
        torch.testing.assert_close(bias.grad, bias_ref.grad)


def test_linear_matches_bitsandbytes_matmul_4bit():
    import bitsandbytes as bnb

    w = torch.randn(64, 256) * 0.02
    packed, state, _ = bnb_oracle.quantize(w, "nf4", 64, True)
    x = torch.randn(7, 256)
    ours = quantize_weight(w).linear(x)
    theirs = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_backward_saves_only_the_packed_weight():
    w = torch.randn(256, 512, dtype=torch.bfloat16)
    qw = quantize_weight(w)
    x = torch.randn(8, 512, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qw.linear(x)
    assert sum(t.numel() * t.element_size() for t in saved) == qw.nbytes  # no x, no dense W
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_bias_without_grad_and_no_input_grad():
    qw = quantize_weight(torch.randn(16, 64))
    bias = torch.randn(16)
    x = torch.randn(3, 64, requires_grad=True)
    qw.linear(x, bias).sum().backward()
    assert bias.grad is None and x.grad is not None
    y = qw.linear(torch.randn(3, 64))  # nothing requires grad: no graph
    assert y.grad_fn is None


def test_linear_rejects_mismatched_input():
    qw = quantize_weight(torch.randn(16, 64))
    with pytest.raises(ValueError, match=r"input of shape \(3, 32\) does not match weight \[16, 64\]"):
        qw.linear(torch.randn(3, 32))


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(with_bias):
    """Schema, fake kernel and autograd registration are consistent (torch.library.opcheck)."""
    qw = quantize_weight(torch.randn(32, 64))
    x = torch.randn(4, 64, requires_grad=True)
    bias = torch.randn(32, requires_grad=True) if with_bias else None
    torch.library.opcheck(torch.ops.qlora.linear.default, (x, *qw.op_args(), bias, "nf4", 64, [32, 64]))
    torch.library.opcheck(torch.ops.qlora.linear_dx.default, (torch.randn(4, 32), *op_inputs(qw)))
    torch.library.opcheck(torch.ops.qlora.dequantize.default, (*op_inputs(qw), torch.bfloat16))


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = QLinear(torch.randn(96, 64) * 0.1, torch.randn(96) * 0.1)
        self.down = QLinear(torch.randn(64, 96) * 0.1)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def test_dynamo_explain_one_graph_no_breaks():
    model = TwoLayer()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 64))
    assert explanation.graph_count == 1
    assert explanation.graph_break_count == 0
    targets = [n.target for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("qlora.linear" in str(t) for t in targets) == 2


@pytest.mark.slow
def test_compile_fullgraph_inductor_cpu():
    """Real Inductor (C++ codegen) with fullgraph=True: same values and gradients as eager."""
    torch._dynamo.reset()
    model = TwoLayer()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    x = torch.randn(2, 3, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = compiled(x)
    y_ref = model(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    bias_grad_compiled = model.up.bias.grad.clone()
    model.up.bias.grad = None
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias_grad_compiled, model.up.bias.grad, rtol=1e-5, atol=1e-5)


def test_compile_aot_eager_bias_grad():
    torch._dynamo.reset()
    model = TwoLayer()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 64)
    compiled(x).sum().backward()
    grad_compiled = model.up.bias.grad.clone()
    model.up.bias.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(grad_compiled, model.up.bias.grad)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shared_lora_input", [True, False])
def test_lora_linear_cat_equals_members(double_quant, shared_lora_input):
    """The fused q/k/v op equals its members' lora_linear outputs side by side, gradients too."""
    k, widths, r = 64, [32, 16, 16], 4
    qws = [quantize_weight(torch.randn(n, k), double_quant=double_quant) for n in widths]
    x = torch.randn(2, 3, k, requires_grad=True)
    xls = [torch.randn(2, 3, k, requires_grad=True) for _ in (widths[:1] if shared_lora_input else widths)]
    lora_A = [torch.randn(r, k, requires_grad=True) for _ in widths]
    lora_B = [torch.randn(n, r, requires_grad=True) for n in widths]
    bias = torch.randn(sum(widths), requires_grad=True)
    stats = ([q.nested_absmax for q in qws], [q.offset for q in qws]) if double_quant else ([], [])
    args = (x, xls, [q.packed for q in qws], [q.absmax for q in qws], *stats, bias, lora_A, lora_B, 0.5,
            "nf4", 64, widths, k, torch.float32, "auto")  # fmt: skip
    y = torch.ops.qlora.lora_linear_cat(*args)
    members = []
    for i, (q, n) in enumerate(zip(qws, widths, strict=True)):
        b = bias[sum(widths[:i]) : sum(widths[: i + 1])]
        xl = xls[0] if shared_lora_input else xls[i]
        members.append(
            torch.ops.qlora.lora_linear(
                x, xl, *q.op_args(), b, lora_A[i], lora_B[i], 0.5, "nf4", 64, [n, k], torch.float32
            )
        )
    reference = torch.cat(members, -1)
    torch.testing.assert_close(y, reference)
    g = torch.randn_like(y)
    leaves = [x, *xls, *lora_A, *lora_B, bias]
    for a, b in zip(
        torch.autograd.grad(y, leaves, g), torch.autograd.grad(reference, leaves, g), strict=True
    ):
        torch.testing.assert_close(a, b)
    torch.library.opcheck(torch.ops.qlora.lora_linear_cat.default, args)


def test_lora_linear_opcheck_and_values():
    qw = quantize_weight(torch.randn(32, 64))
    x, xl = torch.randn(2, 3, 64, requires_grad=True), torch.randn(2, 3, 64, requires_grad=True)
    lora_A, lora_B = torch.randn(4, 64, requires_grad=True), torch.randn(32, 4, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    args = (x, xl, *qw.op_args(), bias, lora_A, lora_B, 0.25, "nf4", 64, [32, 64], torch.float32)
    torch.library.opcheck(torch.ops.qlora.lora_linear.default, args)
    expected = F.linear(x, qw.dequantize(), bias) + F.linear(F.linear(xl, lora_A), lora_B) * 0.25
    torch.testing.assert_close(torch.ops.qlora.lora_linear(*args), expected)


def _keyword_calls():
    """{op name: (op, keyword arguments)} for every op in the `qlora` namespace, every argument,
    optional ones included, given by name."""
    from qlora_compile.experts import QuantizedExperts

    k, widths, r = 64, [32, 16], 4
    qws = [quantize_weight(torch.randn(n, k)) for n in widths]
    q = qws[0]
    x = torch.randn(2, 5, k)
    weight = {"packed": q.packed, "absmax": q.absmax, "nested_absmax": q.nested_absmax, "offset": q.offset}
    fmt = {"quant_type": "nf4", "blocksize": 64}
    lora = {"lora_A": torch.randn(r, k), "lora_B": torch.randn(widths[0], r), "scaling": 0.5}
    counts = torch.tensor([3, 0, 5, 2])
    experts = QuantizedExperts(
        [quantize_weight(torch.randn(16, k)) for _ in counts], compute_dtype=torch.float32
    )
    expert_weight = {
        "packed": experts.weight_packed, "absmax": experts.weight_absmax,
        "nested_absmax": experts.weight_nested_absmax, "offset": experts.weight_offset,
    }  # fmt: skip
    rows = torch.randn(int(counts.sum()), k)
    ops = torch.ops.qlora
    return {
        "dequantize": (ops.dequantize, {**weight, **fmt, "shape": [32, k], "dtype": torch.float32}),
        "linear": (ops.linear, {"x": x, **weight, "bias": torch.randn(32), **fmt, "shape": [32, k], "impl": "auto"}),
        "linear_dx": (ops.linear_dx, {"grad": torch.randn(2, 5, 32), **weight, **fmt, "shape": [32, k]}),
        "lora_linear": (ops.lora_linear, {
            "x": x, "xl": x.clone(), **weight, "bias": None, **lora, **fmt, "shape": [32, k],
            "out_dtype": torch.float32, "impl": "auto",
        }),
        "lora_linear_cat": (ops.lora_linear_cat, {
            "x": x, "xl": [x.clone()], "packed": [w.packed for w in qws], "absmax": [w.absmax for w in qws],
            "nested_absmax": [w.nested_absmax for w in qws], "offset": [w.offset for w in qws],
            "bias": torch.randn(sum(widths)), "lora_A": [torch.randn(r, k) for _ in widths],
            "lora_B": [torch.randn(n, r) for n in widths], "scaling": 0.5, **fmt, "out_features": widths,
            "in_features": k, "out_dtype": torch.float32, "impl": "auto",
        }),
        "experts_linear": (ops.experts_linear, {
            "x": rows, "counts": counts, **expert_weight, **fmt, "shape": experts.shape,
        }),
        "experts_linear_dx": (ops.experts_linear_dx, {
            "grad": torch.randn(int(counts.sum()), 16), "counts": counts, **expert_weight, **fmt,
            "shape": experts.shape,
        }),
        "grouped_mm": (ops.grouped_mm, {"x": rows, "weight": torch.randn(len(counts), 8, k), "counts": counts}),
        "grouped_mm_backward": (ops.grouped_mm_backward, {
            "grad": torch.randn(int(counts.sum()), 8), "x": rows, "weight": torch.randn(len(counts), 8, k),
            "counts": counts,
        }),
    }  # fmt: skip


def test_every_op_lowers_through_inductor_with_keyword_arguments():
    """Inductor lowers an opaque op through `FallbackKernel.create(kernel, *args, **kwargs)`: an op
    argument named like one of its parameters (`kernel` was) fails there, and only under dynamic
    shapes, where arguments arrive by keyword. Every op of the namespace, every argument by name,
    dynamic shapes, real Inductor: same values as eager."""
    import inspect

    from torch._inductor.ir import FallbackKernel

    calls = _keyword_calls()
    ops = torch.ops.qlora
    namespace = {n for n in dir(ops) if isinstance(getattr(ops, n), torch._ops.OpOverloadPacket)}
    assert namespace == set(calls), f"ops without a keyword-lowering case: {namespace ^ set(calls)}"
    reserved = set(inspect.signature(FallbackKernel.create).parameters) - {"args", "kwargs"}
    for name, (op, kwargs) in calls.items():
        arguments = {a.name for a in op.default._schema.arguments}
        assert arguments == set(kwargs), name  # every argument is passed
        assert not arguments & reserved, f"qlora::{name} argument named {arguments & reserved}"
        torch._dynamo.reset()
        compiled = torch.compile(lambda kw, op=op: op(**kw), backend="inductor", dynamic=True, fullgraph=True)
        got, expected = compiled(kwargs), op(**kwargs)
        torch.testing.assert_close(got, expected, msg=name)
