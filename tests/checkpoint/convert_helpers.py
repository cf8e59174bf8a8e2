"""Shared helpers for the converter tests: tiny model folders and the transformers + bitsandbytes oracle."""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from tests.models import save_tiny

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
transformers.logging.set_verbosity_error()


def tiny_llama(
    path: Path, *, dtype=torch.float32, tie=False, layers=2, max_shard_size="1GB", **overrides
) -> Path:
    save_tiny(
        path, "llama", dtype=dtype, max_shard_size=max_shard_size, hidden_size=64, num_hidden_layers=layers,
        vocab_size=256, max_position_embeddings=2048, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, **overrides,
    )  # fmt: skip
    (path / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    return path


def tiny_gpt2(path: Path, *, dtype=torch.bfloat16) -> Path:
    """GPT-2 (Conv1D layers), saved in `dtype` with no dtype in config.json (found from the weights)."""
    save_tiny(path, "gpt2", dtype=dtype, n_embd=128, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
              embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def bnb_reference(src: Path, out: Path, auto=transformers.AutoModelForCausalLM, **bnb):
    """transformers + bitsandbytes: from_pretrained with BitsAndBytesConfig(load_in_4bit=True, **bnb), saved."""
    compute = bnb.pop("bnb_4bit_compute_dtype", torch.bfloat16)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute, **bnb)
    model = auto.from_pretrained(src, quantization_config=config)
    model.save_pretrained(out)
    return model


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(glob.glob(str(folder / "*.safetensors"))):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_folder(ours: Path, ref: Path) -> None:
    """Same tensor names, dtypes, shapes and bytes; same config.json."""
    a, b = read_tensors(ours), read_tensors(ref)
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(raw(a[key]), raw(b[key])), key
    config_a = json.loads((ours / "config.json").read_text())
    config_b = json.loads((ref / "config.json").read_text())
    assert config_a == config_b


def synthetic_llama(
    path: Path, *, hidden=4096, intermediate=14336, layers=2, vocab=40000, dtype=torch.float32
) -> Path:
    """A Llama folder with big tensors and few layers (about 3 GB at the defaults), written streaming:
    each linear weight repeats one 4M-element random block, scaled per slice (quantization cost
    does not depend on the values); the embedding and the head, which stay dense, are zeros left
    as holes of a sparse file (read back as zeros, but never written to disk)."""
    from qlora_compile.checkpoint.safetensors_file import write_streaming

    path.mkdir(parents=True)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=vocab, tie_word_embeddings=False, dtype=str(dtype).removeprefix("torch."),
    )  # fmt: skip
    config.save_pretrained(path)
    kv = hidden // 4
    specs = [("model.embed_tokens.weight", dtype, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", dtype, (hidden,)),
            (p + "post_attention_layernorm.weight", dtype, (hidden,)),
            (p + "self_attn.q_proj.weight", dtype, (hidden, hidden)),
            (p + "self_attn.k_proj.weight", dtype, (kv, hidden)),
            (p + "self_attn.v_proj.weight", dtype, (kv, hidden)),
            (p + "self_attn.o_proj.weight", dtype, (hidden, hidden)),
            (p + "mlp.gate_proj.weight", dtype, (intermediate, hidden)),
            (p + "mlp.up_proj.weight", dtype, (intermediate, hidden)),
            (p + "mlp.down_proj.weight", dtype, (hidden, intermediate)),
        ]
    specs += [("model.norm.weight", dtype, (hidden,)), ("lm_head.weight", dtype, (vocab, hidden))]
    block = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) * 0.02

    def fill(name, start, count):
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return None
        if "norm" in name:
            return torch.ones(count)
        reps = -(-count // block.numel())
        scale = 1.0 + (start // block.numel() % 7) * 0.1
        return (block.repeat(reps)[:count] if reps > 1 else block[:count]) * scale

    write_streaming(path / "model.safetensors", specs, fill)
    return path
