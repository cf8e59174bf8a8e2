"""The converter's output equals transformers + bitsandbytes' own 4-bit save, tensor for tensor and byte for byte."""

import json

import torch
import transformers

import qlora_compile
from qlora_compile.tools import cli
from tests.checkpoint.convert_helpers import (
    assert_same_folder,
    bnb_reference,
    raw,
    read_tensors,
    tiny_gpt2,
    tiny_llama,
)


def test_gpt2_conv1d_bf16_fp4_matches_bnb_and_loads_without_arguments(tmp_path):
    """Conv1D weights transposed; dtype found from the bf16 weights (config.json has none); fp4,
    no double quantization, blocksize 64, fp16 compute; then from_pretrained(DST) with no arguments
    gives the same logits as the model transformers quantized itself."""
    src = tiny_gpt2(tmp_path / "src")
    options = dict(
        bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.float16
    )
    ref_model = bnb_reference(src, tmp_path / "ref", **options)
    result = qlora_compile.convert_checkpoint(
        src, tmp_path / "dst", quant_type="fp4", double_quant=False, compute_dtype="float16", progress=False
    )
    assert_same_folder(tmp_path / "dst", tmp_path / "ref")
    assert result.quantized_modules == 8  # c_attn, c_proj, c_fc, mlp.c_proj per layer; lm_head is tied
    assert read_tensors(tmp_path / "dst")["transformer.h.0.attn.c_attn.weight"].shape == (
        128 * 3 * 128 // 2,
        1,
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref_model(ids).logits)


def test_llama_sharded_input_and_output_skip_untied_head(tmp_path):
    """Sharded input with an index, sharded output with an index; an untied lm_head stays dense; --skip
    adds to transformers' defaults and is written to llm_int8_skip_modules."""
    src = tiny_llama(tmp_path / "src", dtype=torch.float16, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").exists()
    rc = cli.main(
        [
            "convert", str(src), str(tmp_path / "dst"), "--skip", "mlp.down_proj", "--blocksize", "128",
            "--max-shard-size", "60KB", "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    skip = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"][
        "llm_int8_skip_modules"
    ]
    assert skip == ["lm_head", "mlp.down_proj"]
    # blocksize is not a BitsAndBytesConfig option: transformers quantizes at 64, so compare a 64 run too
    bnb_reference(
        src,
        tmp_path / "ref",
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=skip,
    )
    qlora_compile.convert_checkpoint(
        src, tmp_path / "dst64", skip=["mlp.down_proj"], max_shard_size="60KB", progress=False
    )
    assert_same_folder(tmp_path / "dst64", tmp_path / "ref")
    index = json.loads((tmp_path / "dst64" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "dst64" / s).exists() for s in shards)
    tensors = read_tensors(tmp_path / "dst64")
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert tensors["lm_head.weight"].dtype == torch.float16
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.float16
    # blocksize 128 (transformers cannot make it): the entries equal bitsandbytes' quantize_4bit at 128
    from safetensors.torch import load_file

    from tests.bnb_oracle import quantize as bnb_quantize

    ours = read_tensors(tmp_path / "dst")
    source = {}
    for shard in sorted(src.glob("*.safetensors")):
        source.update(load_file(shard))
    _, _, expected = bnb_quantize(source["model.layers.0.mlp.up_proj.weight"], "nf4", 128, True)
    assert sorted(f"model.layers.0.mlp.up_proj.{k}" for k in expected) == sorted(
        k for k in ours if k.startswith("model.layers.0.mlp.up_proj.")
    )
    for suffix, t in expected.items():
        assert torch.equal(raw(ours[f"model.layers.0.mlp.up_proj.{suffix}"]), raw(t)), suffix
    assert (tmp_path / "dst" / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    assert (tmp_path / "dst" / "generation_config.json").exists()


def test_bert_encoder_matches_bnb(tmp_path, minilm_dir):
    """all-MiniLM-L6-v2 (BertModel, AutoModel): the real weights, nf4 + double quant."""
    bnb_reference(
        minilm_dir,
        tmp_path / "ref",
        auto=transformers.AutoModel,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
    )
    result = qlora_compile.convert_checkpoint(minilm_dir, tmp_path / "dst", progress=False)
    assert_same_folder(tmp_path / "dst", tmp_path / "ref")
    assert result.quantized_modules == 6 * 6 + 1  # q, k, v, attention output, intermediate, output; pooler
    assert (tmp_path / "dst" / "1_Pooling" / "config.json").exists()
    assert (tmp_path / "dst" / "vocab.txt").read_bytes() == (minilm_dir / "vocab.txt").read_bytes()


def test_stale_buffers_dropped_unknown_tensors_kept(tmp_path, llama_src, caplog):
    """A saved non-persistent buffer is dropped (transformers drops it); a name the model does not
    know is copied unchanged with a warning (transformers may rename it on load)."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    for p in llama_src.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    tensors = load_file(llama_src / "model.safetensors")
    tensors["model.rotary_emb.inv_freq"] = torch.ones(8)
    tensors["model.layers.0.mlp.gamma"] = torch.full((64,), 2.0)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    qlora_compile.convert_checkpoint(src, tmp_path / "dst", progress=False)
    out = read_tensors(tmp_path / "dst")
    assert "model.rotary_emb.inv_freq" not in out
    assert torch.equal(out["model.layers.0.mlp.gamma"], torch.full((64,), 2.0))
    assert "copied unchanged: model.layers.0.mlp.gamma" in caplog.text
