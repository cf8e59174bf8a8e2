"""What the README tells a user to run, with compile()'s defaults: backend="inductor" (C++ codegen on
this CPU), gradient checkpointing, batches padded per batch so their shapes change, generate() with
a growing KV cache, and transformers.Trainer with a padding collator.

The training loop and the Trainer run share one compiled small Llama, two decoder layers that
share one compiled layer (compile_scope="layers"), reset to the same weights before each: the
loop compiles a static layer graph at its first batch and a dynamic one at its second (batch and
sequence sizes symbolic), which then serves every later batch, the Trainer's included. Only compute_dtype=float32 and
lora_dropout=0 are changed where a test compares with eager (bf16 and dropout draws would not be
comparable at 1e-5); r is small to keep the model small.
"""

import copy

import pytest
import tokenizers
import torch
import transformers
from tokenizers.models import WordLevel

import qlora_compile
from qlora_compile import QLoRALinear
from tests.models import tiny_model, train_steps

pytestmark = pytest.mark.slow  # Inductor compiles C++: about a minute a model on 2 cores

VOCAB = 128
EXACT = {"r": 8, "compute_dtype": torch.float32, "lora_dropout": 0.0}


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    return tiny_model("llama", seed=seed, max_position_embeddings=128, pad_token_id=0, num_hidden_layers=2)


def randomize_lora_B(model, seed: int = 1) -> None:
    """A non-zero B, so the LoRA branch changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QLoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over the model's vocabulary ("w0" pads), so transformers' own
    collators pad the batches."""
    model = WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w1")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", unk_token="w1")


def examples(lengths, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, VOCAB, (n,), generator=g).tolist()} for n in lengths]


# batches as a loader yields them, each padded to its longest row: five distinct lengths and two
# batch sizes. The second batch changes both, so Dynamo's automatic dynamic shapes mark both
# dimensions at once (each later recompile would cost Inductor about half a minute on this CPU).
BATCHES = [[16, 9, 12, 5], [23, 20, 7], [9, 4, 6, 8], [31, 17, 25, 3], [12, 10, 6]]


@pytest.fixture(scope="module")
def pair():
    """The small Llama through compile() twice with the same 4-bit weights and adapters: the
    default backend, and one to run under `set_stance("force_eager")` as the eager reference, and
    their initial state. The tests that use it come first in this file: a later test's
    `torch._dynamo.reset()` drops the compiled graphs."""
    torch._dynamo.reset()
    model = tiny_llama()
    reference = copy.deepcopy(model)
    qlora_compile.compile(model, **EXACT)
    qlora_compile.compile(reference, **EXACT, backend="eager")
    reference.load_state_dict(model.state_dict())
    return model, reference, copy.deepcopy(model.state_dict())


def compiled_and_eager(pair):
    """`pair`'s models, back to their initial weights, with fresh optimizers."""
    model, reference, initial = pair
    for m in (model, reference):
        m.load_state_dict(initial)
        m.qlora.reset_optimizer()
        m.zero_grad(set_to_none=True)
    return model, reference


def assert_same_losses(compiled: list[float], eager: list[float]) -> None:
    for step, (a, b) in enumerate(zip(compiled, eager, strict=True)):
        assert abs(a - b) <= 1e-5, f"step {step}: compiled {a:.7f}, eager {b:.7f}"


def test_training_with_changing_shapes_matches_eager(tokenizer, pair):
    collate = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    batches = [collate(examples(lengths, seed=i)) for i, lengths in enumerate(BATCHES)]
    assert len({tuple(b["input_ids"].shape) for b in batches}) == len(BATCHES)
    assert (batches[0]["labels"] == -100).any()  # padded rows, masked out of the loss

    model, reference = compiled_and_eager(pair)
    assert model.qlora.config.backend == "inductor" and model.is_gradient_checkpointing

    compiled = train_steps(model, batches)
    with torch.compiler.set_stance("force_eager"):
        eager = train_steps(reference, batches)
    assert_same_losses(compiled, eager)
    assert compiled[-1] != compiled[0]
    # the first shape compiles a static graph, the second a dynamic one that serves every later shape
    report = model.qlora.report()
    assert report.graphs == 2, report
    assert report.passes["fuse_lora"] > 0 and report.passes.get("kernel:auto", 0) > 0


class LossRecordingTrainer(transformers.Trainer):
    """transformers.Trainer that keeps each step's loss unrounded (its log rounds to 4 digits)."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss.item())
        return loss


def test_trainer_with_padding_collator_default_backend(tokenizer, tmp_path, pair):
    """transformers.Trainer, the collator padding each batch to its longest row (shuffled, so the
    lengths change every step): the same losses as the same run in eager mode, and the compiled
    path is the one that ran."""
    collate = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    data = examples([16, 9, 12, 5, 23, 20, 7, 11, 9, 4, 6, 8, 31, 17, 25, 3, 12, 10, 6, 14], seed=7)

    def run(model, directory):
        args = transformers.TrainingArguments(
            output_dir=str(directory), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2,
            report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0,
        )  # fmt: skip
        trainer = LossRecordingTrainer(model=model, args=args, train_dataset=data, data_collator=collate)
        trainer.losses = []
        trainer.train()
        assert len(trainer.losses) == 5
        return trainer.losses

    model, reference = compiled_and_eager(pair)
    compiled = run(model, tmp_path / "compiled")
    with torch.compiler.set_stance("force_eager"):
        eager = run(reference, tmp_path / "eager")
    assert len(compiled) == 5
    assert_same_losses(compiled, eager)
    assert compiled[-1] < compiled[0]
    report = model.qlora.report()
    assert report.graphs == 2 and report.passes["fuse_lora"] > 0  # the loop's graphs, no other


def greedy_without_cache(model, ids, mask, steps: int):
    """Greedy decoding by full forwards without a KV cache, which run the compiled layers (a
    forward with a cache runs them uncompiled); positions from the mask, as generate() makes them."""
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


def test_generate_default_backend_equals_eager():
    """generate() with the defaults (its cached forwards run the layers uncompiled) gives the tokens
    of greedy decoding through the compiled layers, and of the model run eagerly."""
    torch._dynamo.reset()
    model = tiny_llama().eval()
    qlora_compile.compile(model, r=8)
    randomize_lora_B(model)
    assert model.qlora.config.backend == "inductor"
    g = torch.Generator().manual_seed(3)
    # two prompts of different lengths, left-padded in one batch, then a longer prompt alone
    short, long = torch.randint(2, VOCAB, (5,), generator=g), torch.randint(2, VOCAB, (9,), generator=g)
    ids = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), short]), long])
    mask = (torch.arange(9) >= torch.tensor([[4], [0]])).long()
    long_prompt = torch.randint(2, VOCAB, (1, 13), generator=g)
    prompts = [
        {"input_ids": ids, "attention_mask": mask},
        {"input_ids": long_prompt, "attention_mask": torch.ones_like(long_prompt)},
    ]
    for prompt in prompts:
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        with torch.compiler.set_stance("force_eager"):
            eager = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert out.shape == (prompt["input_ids"].shape[0], prompt["input_ids"].shape[1] + 8)
        assert torch.equal(out, eager)
        assert torch.equal(out, greedy_without_cache(model, prompt["input_ids"], prompt["attention_mask"], 8))
    report = model.qlora.report()
    assert report.compiled_blocks == 2 and report.graphs >= 1
