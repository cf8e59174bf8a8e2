"""Graph breaks under torch.compile: a training forward of a small Llama, three ways.

    python benchmarks/bench_graph_breaks.py

`torch._dynamo.explain` on the same model and input: (1) the plain transformers model, (2) after
`qlora_compile.compile`'s storage rewrite (our 4-bit + LoRA modules), (3) transformers + bitsandbytes
4-bit (`BitsAndBytesConfig`) + PEFT LoRA. Each with and without gradient checkpointing (transformers'
own, non-reentrant). Prints the graph and break counts.
"""

from __future__ import annotations

import tempfile
import warnings

import torch
import transformers

warnings.filterwarnings("ignore")


def tiny_llama_dir(path: str) -> str:
    config = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def explain(model, ids) -> tuple[int, int]:
    torch._dynamo.reset()
    out = torch._dynamo.explain(lambda i: model(input_ids=i, labels=i).loss)(ids)
    return out.graph_count, out.graph_break_count


def main() -> None:
    from peft import LoraConfig, get_peft_model

    from qlora_compile import QLoRAConfig
    from qlora_compile.pipeline import prepare_model

    ids = torch.randint(0, 512, (2, 32))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        folder = tiny_llama_dir(d)
        for ckpt in (False, True):
            plain = transformers.AutoModelForCausalLM.from_pretrained(folder).train()
            if ckpt:
                plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            rows.append(("transformers (no quantization)", ckpt, *explain(plain, ids)))

            ours = transformers.AutoModelForCausalLM.from_pretrained(folder).train()
            config = QLoRAConfig(r=8, gradient_checkpointing=ckpt, compute_dtype=torch.float32)
            prepare_model(ours, config)  # compile's module changes, checkpointing included
            ours.disable_input_require_grads()  # as compile_scope="model" does (compile_model)
            rows.append(("qlora-compile (4-bit + LoRA)", ckpt, *explain(ours, ids)))

            bnb = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            )  # fmt: skip
            peft_model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=bnb, device_map="cpu"
            )
            if ckpt:
                peft_model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            peft_model = get_peft_model(
                peft_model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
            ).train()
            rows.append(("transformers + bitsandbytes + PEFT", ckpt, *explain(peft_model, ids)))

    print("| model | checkpointing | graphs | graph breaks |")
    print("|---|---|---|---|")
    for name, ckpt, graphs, breaks in rows:
        print(f"| {name} | {'on' if ckpt else 'off'} | {graphs} | {breaks} |")


if __name__ == "__main__":
    main()
