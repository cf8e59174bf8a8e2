"""load_quantized: a bitsandbytes 4-bit folder -> the HF model with our QuantizedLinear holding the file's bytes;
then compile() wraps those layers as they are and trains."""

import json

import pytest
import torch
import transformers

import qlora_compile
from qlora_compile.lora import QLoRALinear
from qlora_compile.modules import QuantizedLinear
from tests.checkpoint.convert_helpers import (
    assert_same_folder,
    bnb_reference,
    raw,
    read_tensors,
    tiny_gpt2,
    tiny_llama,
)


def _assert_holds_file_bytes(model, folder, kind=QuantizedLinear) -> int:
    tensors = read_tensors(folder)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    for name, layer in layers:
        state_key = f"{name}.weight.quant_state.bitsandbytes__{layer.quant_type}"
        state = json.loads(bytes(tensors[state_key].tolist()))
        assert torch.equal(raw(layer.weight_packed), raw(tensors[f"{name}.weight"])), name
        assert torch.equal(raw(layer.weight_absmax), raw(tensors[f"{name}.weight.absmax"])), name
        if layer.weight_nested_absmax is not None:
            assert torch.equal(raw(layer.weight_nested_absmax), raw(tensors[f"{name}.weight.nested_absmax"]))
            assert layer.weight_offset.item() == state["nested_offset"]
        assert [layer.out_features, layer.in_features] == state["shape"]
    return len(layers)


@pytest.fixture(scope="module")
def smollm2_converted(smollm2_dir, tmp_path_factory):
    """SmolLM2-135M converted (nf4, double quant, fp32 compute, two shards) and transformers' own, in train mode."""
    tmp = tmp_path_factory.mktemp("smol")
    ref = bnb_reference(
        smollm2_dir, tmp / "ref", bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    result = qlora_compile.convert_checkpoint(
        smollm2_dir, tmp / "dst", compute_dtype="float32", max_shard_size="100MB", progress=False
    )
    return tmp, ref.train(), result


@pytest.mark.slow
def test_smollm2_matches_bnb_and_loads_with_the_same_bytes_and_logits(smollm2_converted):
    tmp, ref, result = smollm2_converted
    assert_same_folder(tmp / "dst", tmp / "ref")
    assert result.shards == 2 and result.quantized_modules == 30 * 7
    assert 4.12 < result.quantized_bits_per_parameter < 4.2
    model = qlora_compile.load_quantized(tmp / "dst")
    assert type(model) is transformers.LlamaForCausalLM
    assert _assert_holds_file_bytes(model, tmp / "dst") == 210
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again
    ids = torch.tensor([[1, 504, 3458, 314, 260, 4375, 28, 7, 2295, 30]])
    model.train()
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
    assert ours.argmax(-1).equal(theirs.argmax(-1))


def test_gpt2_conv1d_folder_loads_as_quantized_linear(tmp_path):
    """transformers' own save (not ours) of a Conv1D model: loads here with the same logits."""
    src = tiny_gpt2(tmp_path / "src", dtype=torch.float32)
    ref = bnb_reference(
        src, tmp_path / "ref", bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = qlora_compile.load_quantized(tmp_path / "ref")
    assert _assert_holds_file_bytes(model, tmp_path / "ref") == 8
    c_attn = model.transformer.h[0].attn.c_attn
    assert c_attn.fan_in_fan_out and c_attn.weight.shape == (c_attn.in_features, c_attn.out_features)
    ids = torch.tensor([[3, 9, 27, 81, 4]])
    # train mode: in eval mode bitsandbytes' CPU forward repacks the weight with bf16 absmax (lossy)
    model.train(), ref.train()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_compile_keeps_loaded_bytes_and_trains(tmp_path):
    """convert -> load_quantized -> compile (aot_eager) -> training steps; the 4-bit bytes never change."""
    src = tiny_llama(tmp_path / "src", layers=1)
    qlora_compile.convert_checkpoint(src, tmp_path / "dst", progress=False)
    model = qlora_compile.load_quantized(tmp_path / "dst")
    qlora_compile.compile(model, r=4, backend="aot_eager", lora_dropout=0.0, gradient_checkpointing=False)
    report = model.qlora.report()
    assert len(report.rewritten) == 7 and all(r.kind == "QuantizedLinear" for r in report.rewritten)
    assert _assert_holds_file_bytes(model, tmp_path / "dst", QLoRALinear) == 7
    model.train()
    ids = torch.randint(3, 256, (2, 12))
    losses = []
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.qlora.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert _assert_holds_file_bytes(model, tmp_path / "dst", QLoRALinear) == 7
    assert any(m.lora_B.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, QLoRALinear))
