"""Helpers of the export tests: a small random Llama and a trained-looking adapter for it.

(A module of its own: `from conftest import ...` is ambiguous once several test folders have one.)
"""

import torch
import transformers

import qlora_compile
from tests.models import tiny_model

VOCAB = 320


def tiny_llama(tie: bool = True, bias: bool = False) -> transformers.LlamaForCausalLM:
    model = tiny_model(
        "llama", seed=1, vocab_size=VOCAB, hidden_size=128, intermediate_size=256, max_position_embeddings=256,
        tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias,
    ).eval()  # fmt: skip
    with torch.no_grad():  # a spread of magnitudes, so blocks and layers differ
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def compiled_with_adapter(base_dir, scale: float = 1.0, **overrides):
    """Our model compiled from `base_dir`, lora_B given random values (as after training)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    settings = dict(r=8, lora_alpha=16, lora_dropout=0.0, compute_dtype=torch.float32, backend="eager")
    qlora_compile.compile(model, **{**settings, **overrides})
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, qlora_compile.QLoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.02 * scale)
    return model.eval()


def input_ids(batch: int, seq: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
