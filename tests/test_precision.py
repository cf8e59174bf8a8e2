"""Precision policies of compile(): `lora_compute_dtype` (the LoRA products in bf16 over fp32 master
adapters, as `torch.autocast` computes PEFT's layers under Trainer(bf16=True)) and `fp32_residual`
(False: fp32 norms that return bf16, so the residual stream stays bf16)."""

import pytest
import torch

import qlora_compile
from qlora_compile import LoRALinear, QLoRALinear
from tests.models import tiny_model

BF16 = torch.bfloat16


def _layers(lora_compute_dtype):
    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 96, bias=True)
    kwargs = dict(r=8, lora_alpha=16, lora_dropout=0.0, lora_compute_dtype=lora_compute_dtype)
    layers = [
        QLoRALinear.from_dense(dense.weight, dense.bias, compute_dtype=BF16, **kwargs),
        LoRALinear(torch.nn.Linear(128, 96), **kwargs),  # a dense fp32 base, as T5's `wo` stays
    ]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    return layers


def _run(layer, x):
    """Output and the adapters' gradients of a loss linear in the output (its gradient does not
    depend on the output, only the backward through the branch does)."""
    layer.zero_grad()
    out = layer(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * weights).sum().backward()
    return out, layer.lora_A.weight.grad, layer.lora_B.weight.grad


def test_layer_equals_the_fp32_layer_under_autocast():
    """bf16 products, fp32 adapters and gradients: what autocast makes of the fp32 branch."""
    x = torch.randn(3, 5, 128)
    for ours, reference in zip(_layers(BF16), _layers(None), strict=True):
        out, *grads = _run(ours, x)
        with torch.autocast("cpu", dtype=BF16):
            want_out, *want_grads = _run(reference, x)
        assert ours.lora_A.weight.dtype == torch.float32
        for g, w in zip(grads, want_grads, strict=True):
            assert g.dtype == w.dtype == torch.float32 and torch.equal(g, w)
        if isinstance(ours, QLoRALinear):  # autocast leaves our 4-bit op alone, not a dense base
            assert torch.equal(out, want_out)
        # and the products really are bf16: the fp32 branch (no autocast) differs
        assert not torch.equal(_run(reference, x)[1], grads[0])


def test_config_checks_the_dtype():
    with pytest.raises(ValueError, match="lora_compute_dtype"):
        qlora_compile.QLoRAConfig(lora_compute_dtype=torch.int8)


@pytest.mark.slow
def test_compiled_bf16_policies_match_eager_on_changing_shapes():
    """The default compile (Inductor, compiled layers, fused loss) of a bf16 model with bf16 LoRA
    products, a bf16 residual stream and recomputation under a memory budget: our passes still
    fuse every layer, and loss and gradients equal the uncompiled forward's within bf16 rounding,
    on two sequence lengths. Symbolic sizes from the first (`dynamic=True`, as `train` compiles):
    one Inductor compile instead of two; the static-then-dynamic path is test_default_path's."""
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=1).to(BF16)
    qlora_compile.compile(
        model,
        r=8,
        lora_dropout=0.0,
        lora_compute_dtype=BF16,
        fp32_residual=False,
        activation_memory_budget=0.5,
        dynamic=True,
    )
    assert not model.is_gradient_checkpointing  # the budget replaces it
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():  # a non-zero branch, so the LoRA products matter
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    for seq in (12, 17):
        ids = torch.randint(0, 128, (2, seq))
        results = []
        for stance in ("default", "force_eager"):
            model.zero_grad()
            with torch.compiler.set_stance(stance):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in params.items()}))
        (loss, grads), (want_loss, want_grads) = results
        assert abs(loss - want_loss) <= 1e-2 * want_loss
        for name, grad in want_grads.items():
            assert grads[name].dtype == torch.float32
            assert (grads[name] - grad).norm() <= 3e-2 * grad.norm(), name
    report = model.qlora.report()
    # one layer graph for both lengths, all 7 linears fused
    assert report.graphs == 1 and report.passes["fuse_lora"] == 7 and report.compiled_blocks == 1


def _layer_outputs(model, ids):
    """The dtype of each decoder layer's output and the loss (no gradients)."""
    dtypes = []
    hooks = [layer.register_forward_hook(lambda m, a, out: dtypes.append(out[0].dtype if isinstance(out, tuple) else out.dtype))
             for layer in model.model.layers]  # fmt: skip
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    for hook in hooks:
        hook.remove()
    return dtypes, loss


def test_bf16_residual_stream_keeps_activations_bf16_and_the_loss():
    """fp32_residual=False: fp32 norm weights and arithmetic, bf16 between layers and in the head;
    each norm's output is exactly the fp32 policy's output rounded to bf16, and the loss stays
    within bf16 rounding of the fp32 policy's."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    runs = {}
    for fp32_residual in (True, False):
        torch.manual_seed(0)
        model = tiny_model("llama").to(BF16)
        qlora_compile.compile(model, backend="aot_eager", r=8, lora_dropout=0.0, fp32_residual=fp32_residual)
        runs[fp32_residual] = model.eval()
    fp32, bf16 = runs[True], runs[False]
    assert bf16.model.norm.weight.dtype == torch.float32 and bf16.lm_head.weight.dtype == BF16
    assert fp32.lm_head.weight.dtype == torch.float32
    hidden = torch.randn(2, 12, fp32.config.hidden_size).to(BF16)
    norm = bf16.model.layers[0].input_layernorm
    assert norm(hidden).dtype == BF16
    assert torch.equal(norm(hidden), fp32.model.layers[0].input_layernorm(hidden).to(BF16))
    (dtypes_fp32, loss_fp32), (dtypes_bf16, loss_bf16) = _layer_outputs(fp32, ids), _layer_outputs(bf16, ids)
    assert set(dtypes_fp32) == {torch.float32} and set(dtypes_bf16) == {BF16}
    assert abs(loss_bf16 - loss_fp32) <= 1e-2 * loss_fp32


def _saved_bytes_and_grads(budget, ids):
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    qlora_compile.compile(
        model, backend="aot_eager", r=8, lora_dropout=0.0, compute_dtype=torch.float32,
        activation_memory_budget=budget, gradient_checkpointing=budget is not None,
    )  # fmt: skip
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(saved), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_activation_memory_budget_recomputes_more_as_it_shrinks():
    """Under a budget the partitioner keeps fewer bytes for backward (measured by the saved-tensor
    hooks), within the budget's fraction of what is kept without recomputation, and the gradients
    are those of the run that recomputes nothing."""
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    full, want = _saved_bytes_and_grads(None, ids)
    previous = full
    for budget in (0.8, 0.3):
        kept, grads = _saved_bytes_and_grads(budget, ids)
        assert kept < previous and kept <= budget * full, (budget, kept, full)
        previous = kept
        for name, grad in want.items():
            assert (grads[name] - grad).norm() <= 1e-5 * grad.norm(), name
