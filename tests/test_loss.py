"""The fused output head + causal-LM loss (`qlora_compile.loss`) against transformers' own
`ForCausalLMLoss` on the full logits, and inside a compiled model against the same model unfused."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

import qlora_compile
from qlora_compile.loss import linear_cross_entropy
from tests.models import tiny_model

FAST = {"backend": "aot_eager", "r": 4, "compute_dtype": torch.float32, "lora_dropout": 0.0}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 11])
@pytest.mark.parametrize("chunk_tokens", [3, None])
def test_equals_transformers_loss_on_full_logits(dtype, num_items, chunk_tokens):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=g).to(dtype).requires_grad_()
    weight, bias = torch.randn(50, 16, generator=g).to(dtype), torch.randn(50, generator=g).to(dtype)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[0, :4] = -100  # a prompt without loss
    ref_hidden = hidden.detach().clone().requires_grad_()
    logits = torch.nn.functional.linear(ref_hidden, weight, bias)
    items = None if num_items is None else torch.tensor(num_items)
    want = ForCausalLMLoss(logits, labels, 50, num_items_in_batch=items)
    want.backward()
    got = linear_cross_entropy(
        hidden, weight, labels, bias=bias, num_items_in_batch=items, chunk_tokens=chunk_tokens
    )
    got.backward()
    # fp32: the same arithmetic; bf16: each chunk's product may round apart from the whole one's
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) <= tol * abs(want.item())
    assert relative(hidden.grad, ref_hidden.grad) <= tol and hidden.grad.dtype == dtype


def test_refuses_a_trainable_head():
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy(
            torch.randn(1, 2, 4), torch.randn(8, 4, requires_grad=True), torch.zeros(1, 2).long()
        )


def compiled_pair():
    """The same tiny Llama compiled with and without the fused loss, the same LoRA weights."""
    models = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = tiny_model("llama")
        qlora_compile.compile(model, **FAST, fused_loss=fused)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
        models.append(model.train())
    return models


def test_compiled_model_loss_and_grads_equal_the_unfused_model():
    fused, plain = compiled_pair()
    assert fused.qlora.report().fused_loss and not plain.qlora.report().fused_loss
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(9)}):  # as Trainer passes it
        outs = []
        for model in (fused, plain):
            model.zero_grad()
            out = model(input_ids=ids, labels=labels, **kwargs)
            out.loss.backward()
            outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        (f_out, f_grads), (p_out, p_grads) = outs
        assert f_out.logits is None and p_out.logits is not None
        assert abs(f_out.loss.item() - p_out.loss.item()) <= 1e-5 * p_out.loss.item()
        assert len(f_grads) == 28 and all(relative(f_grads[n], g) <= 1e-5 for n, g in p_grads.items())
    # calls that want logits are the model's own: eval mode, or no labels
    fused.eval()
    with torch.no_grad():
        out = fused(input_ids=ids, labels=labels)
        ref = plain.eval()(input_ids=ids, labels=labels)
    assert (
        out.logits is not None
        and torch.allclose(out.logits, ref.logits)
        and torch.allclose(out.loss, ref.loss)
    )
