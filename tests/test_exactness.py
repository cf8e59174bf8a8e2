"""Against the reference stack: transformers + bitsandbytes 4-bit + PEFT LoRA with the same weights
(tests/peft_oracle.py; the reference runs in train mode with dropout 0, see there)."""

import pytest
import torch
import transformers
from peft import PeftModel

import qlora_compile
from qlora_compile import QLoRALinear
from tests.peft_oracle import (
    ALPHA,
    R,
    assert_lora_grads_match,
    bnb_base,
    llama_folder,
    ours,
    peft_lora_modules,
    peft_reference,
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return llama_folder(tmp_path_factory.mktemp("llama"))


def reference(base_dir, our_model):
    model = peft_reference(base_dir, our_model)
    assert len(peft_lora_modules(model)) == 14
    return model


def test_quantized_bytes_equal_transformers_bitsandbytes(base_dir):
    model, ref = ours(base_dir), bnb_base(base_dir)
    theirs = dict(ref.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, QLoRALinear):
            w = theirs[name].weight
            assert torch.equal(m.weight_packed.view(-1), w.data.view(-1)), name
            assert torch.equal(m.weight_absmax, w.quant_state.absmax), name


def test_logits_and_lora_gradients_match(base_dir):
    model = ours(base_dir)
    ref = reference(base_dir, model)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    # with labels our training forward fuses the head and the loss: no logits, the same loss
    out, out_ref = model(ids, labels=ids), ref(ids, labels=ids)
    assert model.qlora.report().fused_loss and out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=0)
    out.loss.backward()
    out_ref.loss.backward()
    assert_lora_grads_match(model, ref)


def test_training_tracks_reference_loss_curve(base_dir):
    """30 AdamW steps from the same initialization: every loss within 1% of the reference's."""
    model = ours(base_dir)
    ref = reference(base_dir, model)
    optimizers = [
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (model, ref)
    ]
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, 256, (30, 4, 32), generator=g)
    losses = []
    for batch in data:
        step = []
        for m, opt in zip((model, ref), optimizers, strict=True):
            loss = m(batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            step.append(loss.item())
        losses.append(step)
    for i, (a, b) in enumerate(losses):
        assert abs(a - b) / b < 0.01, f"step {i}: ours {a:.5f}, reference {b:.5f}"
    assert losses[-1][0] < losses[0][0]  # it learned something


def test_saved_adapter_loads_in_peft(base_dir, tmp_path):
    model = ours(base_dir)
    qlora_compile.save_adapter(model, tmp_path / "adapter")
    ref = PeftModel.from_pretrained(bnb_base(base_dir), tmp_path / "adapter").train()
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_here(base_dir, tmp_path):
    donor = ours(base_dir, seed=7)
    ref = reference(base_dir, donor)
    ref.save_pretrained(tmp_path / "peft")
    model = ours(base_dir, seed=1)  # other B weights, replaced by the load
    qlora_compile.load_adapter(model, tmp_path / "peft")
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_load_adapter_errors(base_dir, tmp_path):
    model = ours(base_dir)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        qlora_compile.load_adapter(model, tmp_path)
    other = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    qlora_compile.compile(other, r=4, backend="aot_eager", target_modules=["q_proj"])
    qlora_compile.save_adapter(other, tmp_path / "small")
    with pytest.raises(ValueError, match=r"missing model.layers.0.mlp.down_proj.lora_A.weight"):
        qlora_compile.load_adapter(model, tmp_path / "small")
    with pytest.raises(ValueError, match="no QLoRA layers"):
        qlora_compile.save_adapter(torch.nn.Linear(2, 2), tmp_path / "none")


def test_adapter_trained_on_a_converted_folder_loads_in_peft_on_that_folder(base_dir, tmp_path):
    """The whole round trip of issue 5: convert, load_quantized + compile + train here, save the
    adapter; transformers + bitsandbytes load the converted folder with no arguments, PEFT loads
    the adapter onto it, and the logits equal ours."""
    dst = tmp_path / "nf4"
    qlora_compile.convert_checkpoint(base_dir, dst, compute_dtype="float32", progress=False)
    model = qlora_compile.load_quantized(dst, dtype=torch.float32)
    qlora_compile.compile(
        model, r=R, lora_alpha=ALPHA, lora_dropout=0.0, compute_dtype=torch.float32,
        backend="aot_eager", gradient_checkpointing=False, lr=1e-2,
    )  # fmt: skip
    model.train()
    data = torch.randint(0, 256, (3, 2, 16), generator=torch.Generator().manual_seed(5))
    for batch in data:  # a few steps, so lora_B is no longer zero
        model(batch, labels=batch).loss.backward()
        model.qlora.step()
    assert any(m.lora_B.weight.abs().max() > 0 for m in model.modules() if isinstance(m, QLoRALinear))
    model.qlora.save_adapter(tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(dst)  # no quantization arguments
    assert base.config.quantization_config.load_in_4bit
    ref = PeftModel.from_pretrained(base, tmp_path / "adapter").train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        ours_logits = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(ours_logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
