"""Exports of MoE models: merged 16-bit (expert LoRA merged per expert, written in transformers'
layout so `from_pretrained` loads it), NF4 (our per-expert layout, re-quantized only where the
adapter changed the expert), ONNX (refused).

The reference is our compiled model (tests/test_experts.py checks it against a dense reference
and PEFT): the merged folder, loaded by transformers, must give its logits.
"""

import pytest
import torch
import transformers
from safetensors import safe_open

import qlora_compile
from qlora_compile import quantize_weight
from qlora_compile.experts import QuantizedExperts
from qlora_compile.tools import cli
from tests.test_experts import EXPERTS, FAST, randomize_lora, save_moe


def keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe(request, tmp_path_factory):
    """(16-bit folder, its NF4 conversion, our compiled model with LoRA on attention and experts, adapter)."""
    tmp = tmp_path_factory.mktemp(request.param)
    save_moe(tmp / "src", request.param)
    qlora_compile.convert_checkpoint(tmp / "src", tmp / "nf4", compute_dtype="float32", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp / "src", dtype=torch.float32)
    qlora_compile.compile(model, **FAST, target_parameters=EXPERTS)
    randomize_lora(model)
    qlora_compile.save_adapter(model, tmp / "adapter")
    return tmp / "src", tmp / "nf4", model.eval(), tmp / "adapter"


@pytest.mark.parametrize("base", ["src", "nf4", "bnb"])
def test_merged_loads_in_transformers_with_our_logits(moe, base, tmp_path):
    """From the 16-bit folder, our 4-bit one, and transformers + bitsandbytes' (experts dense)."""
    src, nf4, model, adapter = moe
    if base == "bnb":
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
        transformers.AutoModelForCausalLM.from_pretrained(
            src, quantization_config=config, device_map="cpu"
        ).save_pretrained(tmp_path / "bnb")
    folder = {"src": src, "nf4": nf4, "bnb": tmp_path / "bnb"}[base]
    out = qlora_compile.export_merged(folder, adapter, tmp_path / "merged")
    assert keys(out) == keys(src)  # transformers' own per-expert layout
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), atol=2e-5, rtol=1e-5)


def test_nf4_requantizes_merged_experts_and_loads(moe, tmp_path):
    src, nf4, model, adapter = moe
    out, reports = qlora_compile.export_nf4(nf4, adapter, tmp_path / "nf4")
    stacks = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedExperts)}
    expert_reports = [r for r in reports if "[" in r.module]
    assert len(expert_reports) == sum(m.num_experts for m in stacks.values())
    loaded = qlora_compile.load_quantized(out)
    for name, m in stacks.items():
        a, b = m.lora_factors()
        stored = loaded.get_submodule(name)
        for e in range(m.num_experts):  # Q(dequant(Q(W_e)) + s B_e A_e), our layout, no other rounding
            merged = m.quantized_weight(e).dequantize(torch.float32) + m.scaling * (b[e] @ a[e]).detach()
            assert torch.equal(stored.quantized_weight(e).packed, quantize_weight(merged).packed), (name, e)
    ids = torch.randint(0, 128, (2, 10))
    assert torch.isfinite(logits(loaded, ids)).all()
    # without an adapter the 4-bit experts keep the converter's bytes
    plain, reports = qlora_compile.export_nf4(nf4, None, tmp_path / "plain")
    assert not reports
    with (
        safe_open(str(nf4 / "model.safetensors"), "pt") as a,
        safe_open(str(plain / "model.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys() if ".experts." in k)


def test_onnx_refuses_experts(moe, tmp_path, capsys):
    src, _, _, _ = moe
    with pytest.raises(NotImplementedError, match="MoE expert weights"):
        qlora_compile.export_onnx(src, None, tmp_path / "model.onnx")
    assert cli.main(["export", "onnx", "--base", str(src), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "not supported" in capsys.readouterr().err


def test_expert_adapter_must_fit_the_base(moe, llama_dir):
    _, _, _, adapter = moe
    with pytest.raises(ValueError, match="match no expert weight"):
        qlora_compile.export_merged(llama_dir, adapter, llama_dir.parent / "never")
