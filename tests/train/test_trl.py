"""TRL's `SFTTrainer` trains a `compile()`d model: what a TRL user passes, checked on a 1-layer
Llama with SmolLM2's tokenizer (aot_eager)."""

import datasets
import pytest
import torch
import transformers
import trl  # the dev extra installs it: a test oracle, as peft and bitsandbytes

import qlora_compile
from tests.train.conftest import chat_records


def test_sft_trainer_trains_a_compiled_model(tiny_lm, tokenizer, tmp_path):
    """The first logged loss equals the loss computed here on TRL's own tokenization of the whole
    dataset (one batch; lora_B is zero before the first update), and the adapters change."""
    dataset = datasets.Dataset.from_list(chat_records(8))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    qlora_compile.compile(model, backend="aot_eager", r=8, lr=1e-3)
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, logging_steps=1,
        gradient_checkpointing=False,  # compile() already turned on transformers' own
        learning_rate=1e-3, max_grad_norm=0.3, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, max_length=128, bf16=False,
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        optimizers=(model.qlora.optimizer, None),  # our paged AdamW; Trainer clips and steps it
    )  # fmt: skip
    total, count = 0.0, 0
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for ids in trainer.train_dataset["input_ids"]:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
            count += len(ids) - 1
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3
    assert losses[0] == pytest.approx(total / count, rel=1e-6)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is model.qlora.optimizer
