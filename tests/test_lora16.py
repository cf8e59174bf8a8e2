"""16-bit LoRA through the QLoRA pipeline (`quant_type="none"`, `LoRA16Linear`) against PEFT's LoRA
on the same bf16 model, prepared as QLoRA prepares one: norms and output head in fp32 (what
`compile` and PEFT's `prepare_model_for_kbit_training` do), the base product in bf16 on the input
cast to bf16 and cast back (what bitsandbytes' `Linear4bit` does with its compute dtype), here on
the 16-bit weights. Only the base's storage differs from the 4-bit runs."""

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

import qlora_compile
from qlora_compile import LoRA16Linear
from qlora_compile.errors import InvalidConfigError
from qlora_compile.modules import quantize_linears_
from tests.models import build, tiny_config
from tests.peft_oracle import (
    ALPHA,
    R,
    as_qlora_prepares,
    assert_lora_grads_match,
    llama_folder,
    ours,
    peft_lora_modules,
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return llama_folder(tmp_path_factory.mktemp("llama"))


def peft_reference(base_dir, our_model, dtype):
    """PEFT LoRA (all linears, r=R, alpha=ALPHA, dropout 0) on the model in `dtype`, prepared as
    QLoRA prepares one (`as_qlora_prepares`), holding our LoRA weights."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model = get_peft_model(
        model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")
    )
    as_qlora_prepares(model, dtype)
    layers = dict(our_model.named_modules())
    theirs = peft_lora_modules(model)
    assert set(theirs) == {n for n, m in layers.items() if isinstance(m, LoRA16Linear)} and len(theirs) == 14
    with torch.no_grad():
        for name, m in theirs.items():
            m.lora_A["default"].weight.copy_(layers[name].lora_A.weight)
            m.lora_B["default"].weight.copy_(layers[name].lora_B.weight)
    return model.train()


def assert_bf16_grads_close(our_model, ref, rel: float = 5e-3) -> None:
    """Each LoRA gradient within `rel` of PEFT's in relative Frobenius norm. With bf16 products the
    two stacks cannot agree to fp32 tolerances: the compiled graph sums and orders fp32 values
    slightly differently (so does the fused loss), and any such difference flips bf16 roundings
    (a step of 2**-8 relative) in the backward products below it. Measured: at most 2e-3."""
    layers = dict(our_model.named_modules())
    for name, m in peft_lora_modules(ref).items():
        for ab in ("A", "B"):
            grad = getattr(layers[name], f"lora_{ab}").weight.grad
            grad_ref = getattr(m, f"lora_{ab}")["default"].weight.grad
            assert (grad - grad_ref).norm() <= rel * grad_ref.norm(), f"{name}.lora_{ab}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_and_lora_gradients_match_peft(base_dir, dtype):
    model = ours(base_dir, dtype=dtype, quant_type="none", compute_dtype=dtype)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is LoRA16Linear and q.weight.dtype == dtype and not q.weight.requires_grad
    report = model.qlora.report().totals()
    assert report["bytes_after"] == report["bytes_before"]  # nothing quantized
    ref = peft_reference(base_dir, model, dtype)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    out, out_ref = model(ids, labels=ids), ref(ids, labels=ids)
    assert model.qlora.report().fused_loss and out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=0)
    out.loss.backward()
    out_ref.loss.backward()
    if dtype == torch.float32:
        assert_lora_grads_match(model, ref)  # the tolerances of the 4-bit PEFT tests
    else:
        assert_bf16_grads_close(model, ref)


def test_refuses_a_model_already_4bit():
    """A 4-bit model (here: its linears quantized in place, as load_quantized leaves them) cannot
    train as 16-bit LoRA: refused, not silently trained 4-bit."""
    model = build(tiny_config("llama"))
    quantize_linears_(model)
    with pytest.raises(InvalidConfigError, match="already 4-bit"):
        qlora_compile.compile(model, quant_type="none", backend="aot_eager")
