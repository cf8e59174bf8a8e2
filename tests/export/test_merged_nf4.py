"""Merged (16-bit) and NF4 (re-quantized) exports: logits, bytes, bitsandbytes and PEFT as oracles."""

import json
import logging

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import qlora_compile
from qlora_compile import quantize_weight
from qlora_compile.tools import cli
from tests.export.export_helpers import compiled_with_adapter, input_ids

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def load(path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)


@pytest.fixture(scope="module")
def bnb_dir(llama_dir, tmp_path_factory):
    """The same base saved by transformers + bitsandbytes (4-bit NF4, double quantization)."""
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = load(llama_dir, quantization_config=config, device_map="cpu")
    path = tmp_path_factory.mktemp("bnb")
    model.save_pretrained(path)
    return path


def test_merged_matches_our_model(llama_dir, trained, tmp_path, capsys, caplog):
    model, adapter = trained
    out = tmp_path / "merged"
    with caplog.at_level(logging.INFO, logger="qlora_compile.export"):
        argv = ["export", "merged", "--base", str(llama_dir), "--adapter", str(adapter), "--out", str(out)]
        assert cli.main(argv) == 0
    assert "14 linear layers and 0 expert weights, 1 shard(s) (0 reused)" in caplog.text  # logging
    assert "export merged: 100%" in capsys.readouterr().err  # the tqdm bar
    merged = load(out)
    assert not hasattr(merged.config, "quantization_config")
    assert (tmp_path / "merged.partial").exists() is False
    for shape in ((2, 12), (1, 7)):
        ids = input_ids(*shape)
        ref = logits(model, ids)
        torch.testing.assert_close(logits(merged, ids), ref, atol=2e-6, rtol=1e-5)
    # merged onto the dequantized 4-bit weight, not the original: W = dequant(Q(W0)) + s B A
    w0 = load_file(str(llama_dir / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"]
    layer = model.model.layers[1].mlp.up_proj
    expected = quantize_weight(w0).dequantize() + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    got = load_file(str(out / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"]
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=0)
    assert (got - w0).abs().max() > 1e-3  # the 4-bit error is in it


def test_bnb_base_gives_the_same_merge(llama_dir, bnb_dir, trained, tmp_path):
    _, adapter = trained
    qlora_compile.export_merged(llama_dir, adapter, tmp_path / "a")
    qlora_compile.export_merged(bnb_dir, adapter, tmp_path / "b", dtype="bfloat16")
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == torch.bfloat16
        torch.testing.assert_close(b[k], a[k].to(torch.bfloat16), atol=0, rtol=0)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"


def test_nf4_bytes_bnb_load_and_peft_merge(llama_dir, bnb_dir, trained, tmp_path, capsys):
    model, adapter = trained
    out, merged_dir = tmp_path / "nf4", tmp_path / "merged"
    qlora_compile.export_merged(llama_dir, adapter, merged_dir)
    argv = ["export", "nf4", "--base", str(llama_dir), "--adapter", str(adapter), "--out", str(out)]
    assert cli.main(argv) == 0
    report = capsys.readouterr().out
    assert report.count("model.layers.") == 14 and "|quant err|" in report and "kept" in report
    ratio = float(report.split("model.layers.0.self_attn.q_proj")[1].split()[2])
    assert 0.5 < ratio < 5

    # bytes: quantize_weight(merged) for every merged linear
    written = load_file(str(out / "model.safetensors"))
    merged = load_file(str(merged_dir / "model.safetensors"))
    for name in [k.removesuffix(".weight") for k in merged if "_proj" in k]:
        for key, t in quantize_weight(merged[f"{name}.weight"]).to_bnb(name).items():
            assert torch.equal(written[key], t), key

    # the same keys and quantization_config transformers + bitsandbytes write
    bnb = load_file(str(bnb_dir / "model.safetensors"))
    assert written.keys() == bnb.keys()
    ours_qc = json.loads((out / "config.json").read_text())["quantization_config"]
    bnb_qc = json.loads((bnb_dir / "config.json").read_text())["quantization_config"]
    assert ours_qc == bnb_qc

    # loads in transformers + bitsandbytes with no extra arguments; logits = merged, re-quantized
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    reloaded.train()  # eval mode repacks absmax to bf16 on AVX512-BF16 CPUs (README)
    requant = load(merged_dir)
    with torch.no_grad():
        for name, m in requant.named_modules():
            if name.endswith("_proj"):
                m.weight.copy_(quantize_weight(m.weight).dequantize())
    ids = input_ids(2, 10)
    torch.testing.assert_close(logits(reloaded, ids), logits(requant, ids), atol=2e-6, rtol=1e-5)

    # PEFT merging the adapter into the bitsandbytes model re-quantizes to the same bytes
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(bnb_dir, device_map="cpu")
    peft_merged = peft.PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    state = peft_merged.state_dict()
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(state[key].view(-1), written[key].view(-1)), key


def test_small_update_is_flagged(llama_dir, tmp_path):
    model = compiled_with_adapter(llama_dir, scale=0.01)
    qlora_compile.save_adapter(model, tmp_path / "adapter")
    _, layers = qlora_compile.export_nf4(llama_dir, tmp_path / "adapter", tmp_path / "nf4")
    assert len(layers) == 14 and all(r.ratio < 0.05 and abs(r.kept) < 0.05 for r in layers)
    text = qlora_compile.export.format_report(layers)
    assert "14 of 14 merged layers have |dW| / |quantization error| < 1" in text


def test_adapter_that_does_not_fit(llama_dir, trained, tmp_path, capsys):
    _, adapter = trained
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    renamed = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    renamed[key] = torch.zeros(100, 8)
    save_file(renamed, str(bad / "adapter_model.safetensors"))
    argv = ["export", "merged", "--base", str(llama_dir), "--adapter", str(bad), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "model.layers.7.mlp.up_proj is not a linear of the base" in err
    assert (
        "model.layers.0.mlp.up_proj: lora_B (100, 8) @ lora_A (8, 128) does not give the weight's (256, 128)"
        in err
    )
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    argv[5] = str(tmp_path / "nowhere")
    assert cli.main(argv) == 2
    assert "adapter_config.json does not exist" in capsys.readouterr().err


def test_fp4_without_double_quant_and_sharded_base(llama_dir, tmp_path):
    """The quantization options reach the base as compile used them; a sharded base reads the same."""
    from tests.export.export_helpers import tiny_llama

    sharded = tmp_path / "sharded"
    tiny_llama().save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    options = dict(quant_type="fp4", blocksize=128, double_quant=False)
    model = compiled_with_adapter(llama_dir, **options)
    qlora_compile.save_adapter(model, tmp_path / "adapter")
    argv = ["export", "merged", "--base", str(sharded), "--adapter", str(tmp_path / "adapter")]
    argv += [
        "--out",
        str(tmp_path / "merged"),
        "--quant-type",
        "fp4",
        "--blocksize",
        "128",
        "--no-double-quant",
    ]
    assert cli.main(argv) == 0
    ids = input_ids(2, 9)
    torch.testing.assert_close(
        logits(load(tmp_path / "merged"), ids), logits(model, ids), atol=2e-6, rtol=1e-5
    )
