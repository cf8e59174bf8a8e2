"""The command line: `info`, and the `demo` job (`train` with a packaged config): its data, its bad
input, and a tiny end-to-end run."""

import json
import shutil

import pytest

from qlora_compile.errors import InvalidArgumentError
from qlora_compile.tools import cli, demo
from qlora_compile.train.config import load_config


def test_info_reports_kernels(capsys):
    """`info` says which CPU kernel this machine uses: the native one where a C compiler built it,
    else the torch path (no compiler is not an error)."""
    from qlora_compile.kernels import native

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    expected = "native (built and loaded)" if native.available() else "vectorized torch"
    assert "qlora-compile" in out and f"CPU kernel: {expected}" in out


@pytest.fixture
def no_c_compiler(monkeypatch, tmp_path):
    """This process as on a machine without a C compiler (and no kernel built before)."""
    from qlora_compile.kernels import native

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("QLORA_COMPILE_NATIVE", raising=False)
    monkeypatch.setenv("QLORA_COMPILE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    native._library.cache_clear()
    yield
    native._library.cache_clear()  # the next caller loads the real build again


def test_info_without_a_c_compiler(no_c_compiler, capsys, caplog):
    from qlora_compile.kernels import native

    assert cli.main(["info"]) == 0
    assert "CPU kernel: vectorized torch" in capsys.readouterr().out
    assert not native.available() and "no C compiler found" in caplog.text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "8"], "unknown config key 'steps' (did you mean 'max_steps'?)"),
        (["--max_steps", "-1"], "max_steps must be >= 0, got -1"),
        (
            ["--data", "mine.jsonl"],
            "demo builds model, data, eval_data itself (--out sets output_dir); got --data",
        ),
        (["--eval-pairs", "0"], "--eval-pairs must be at least 1, got 0"),
    ],
)
def test_demo_bad_input_exits_2(tmp_path, capsys, args, message):
    """The demo's options and its train-config overrides are checked before anything is built."""
    out = tmp_path / "out"
    assert cli.main(["demo", "--out", str(out), *args]) == 2
    assert capsys.readouterr().err.splitlines() == [f"qlora-compile demo: {message}"]
    assert not out.exists()


def test_unknown_option_of_another_command_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["info", "--max_steps", "8"])
    assert e.value.code == 2 and "unrecognized arguments: --max_steps 8" in capsys.readouterr().err


def test_bad_input_is_one_line_unless_verbose(tmp_path, capsys):
    argv = ["plan", str(tmp_path / "config.json"), "--gpu-memory", "48"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "qlora-compile plan: --gpu-memory '48': a unit is required; use B, KB, MB, GB, TB (powers of 10) "
        "or KiB, MiB, GiB, TiB"
    ]
    assert cli.main(["-v", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "InvalidArgumentError" in err
    assert err.rstrip().splitlines()[-1].startswith("qlora-compile plan: --gpu-memory '48'")


def test_internal_error_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    """A bug is not bad input: not exit 2, and not one tidy line that hides where it happened."""
    import qlora_compile.plan

    def broken(*args, **kwargs):
        raise KeyError("num_hidden_layers")

    monkeypatch.setattr(qlora_compile.plan, "plan_memory", broken)
    assert cli.main(["plan", str(tmp_path / "config.json"), "--gpu-memory", "48GB"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert "KeyError: 'num_hidden_layers'" in err
    assert err.rstrip().splitlines()[-1] == "qlora-compile plan: unexpected error (traceback above)"


def test_parse_pairs(tmp_path):
    """Each turn answers the one before; numbers read by YAML become text; repeats are kept once."""
    (tmp_path / "a.yml").write_text(
        "categories:\n- x\nconversations:\n"
        "- - Hello\n  - Hi there\n  - How are you?\n"
        "- - When?\n  - 1963\n"
        "- - Hello\n  - Hi there\n"
        "- - Alone\n"
    )
    (tmp_path / "b.yml").write_text("conversations:\n- - Q\n  - ''\n- - Q2\n  - A2\n")
    assert demo.parse_pairs([tmp_path / "a.yml", tmp_path / "b.yml"]) == [
        ("Hello", "Hi there"),
        ("Hi there", "How are you?"),
        ("When?", "1963"),
        ("Q2", "A2"),
    ]


class CharTokenizer:
    """One token per character; a chat template `<role>:content|` per message."""

    eos_token_id = 0
    chat_template = "yes"

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        text = "".join(f"{m['role'][0]}:{m['content']}|" for m in messages)
        return [ord(c) for c in text + ("a:" if add_generation_prompt else "")]


def test_split_pairs_holds_out_pairs_that_fit():
    """Held-out pairs are drawn among those whose chat rendering fits in max_length (none of them is
    dropped by `train`); the training pairs are the others, long ones included, in corpus order."""
    pairs = [(f"q{i}", "a" * (i % 4)) for i in range(1, 13)]
    length = {p: len(f"s:{demo.SYSTEM}|u:{p[0]}|a:{p[1]}|") for p in pairs}
    limit = sorted(length.values())[6]
    train, held = demo.split_pairs(CharTokenizer(), pairs, limit, 3, seed=0)
    assert len(held) == 3 and all(length[p] <= limit for p in held)
    assert train == [p for p in pairs if p not in held]
    assert demo.split_pairs(CharTokenizer(), pairs, limit, 3, seed=0)[1] == held
    assert demo.split_pairs(CharTokenizer(), pairs, limit, 3, seed=1)[1] != held
    fit = sum(n <= limit for n in length.values())
    assert 3 < fit < len(pairs)
    with pytest.raises(InvalidArgumentError, match=f"only {fit} pairs fit in {limit} tokens"):
        demo.split_pairs(CharTokenizer(), pairs, limit, fit, seed=0)


def test_demo_records_train_on_the_answer(tmp_path, smollm2_dir):
    """A pair written by the demo, read and encoded by `train`'s data pipeline with SmolLM2's chat
    template: the labels are the answer and the template's end of turn, the prompt is masked."""
    from transformers import AutoTokenizer

    from qlora_compile.train import data

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    path = demo.write_chat_jsonl(tmp_path / "d.jsonl", [("What is AI?", "A branch of science.")])
    rows, sources = data.load_rows([str(path)])
    split = data.tokenize(rows, sources, tokenizer, "chat", max_length=64, overflow="drop",
                          train_on_inputs=False, system_prompt=None)  # fmt: skip
    ids, labels = split.dataset[0]["input_ids"], split.dataset[0]["labels"]
    answer = [t for t in labels if t != -100]
    assert labels[: len(ids) - len(answer)] == [-100] * (len(ids) - len(answer))
    assert ids[len(ids) - len(answer) :] == answer
    assert tokenizer.decode(answer) == "A branch of science.<|im_end|>\n"
    assert tokenizer.decode(ids[: len(ids) - len(answer)]) == (
        f"<|im_start|>system\n{demo.SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is AI?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, smollm2_dir):
    """The whole job through the command line, 2 steps on a few pairs, with SmolLM2's real weights
    and tokenizer cut to its first 2 decoder layers (the full model's trace and steps take minutes
    on 2 cores), converted by the real `convert` step: every output lands in the folder, and the
    answer-only loss is a sane number."""
    import transformers

    # the demo reuses a built folder: give it SmolLM2 cut to 2 layers (real weights and tokenizer)
    folder = tmp_path / smollm2_dir.name
    shutil.copytree(smollm2_dir, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    config = transformers.AutoConfig.from_pretrained(smollm2_dir)
    config.num_hidden_layers = 2
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, config=config)
    model.save_pretrained(folder)
    del model
    args = ["demo", "--out", str(tmp_path), "--eval-pairs", "2", "--max-new-tokens", "2"]
    args += ["--max_steps", "2", "--batch_size", "2", "--max_length", "40"]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    r = summary["train"]
    # the train run of the packaged config, the overrides on top, on the files the demo wrote
    cfg = load_config(tmp_path / "train.yaml")
    assert cfg.to_dict() == json.loads((tmp_path / "train_config.json").read_text())
    assert (cfg.max_steps, cfg.batch_size, cfg.max_length, cfg.qlora.r, cfg.qlora.lr) == (2, 2, 40, 16, 1e-3)
    assert cfg.model == str(tmp_path / "nf4") and r["four_bit_folder"] and r["format"] == "chat"
    assert json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    held_out = [json.loads(x) for x in (tmp_path / "chatterbot-eval.jsonl").read_text().splitlines()]
    assert r["eval_examples"] == len(held_out) == 2 and r["data"]["dropped_too_long"] > 0
    assert summary["answers"]["prompt"] == held_out[0]["messages"][1]["content"]
    assert r["steps"] == 2 and [m["step"] for m in metrics(tmp_path) if "loss" in m] == [1, 2]
    assert all(0 < x < 30 for x in [r["eval_loss_before"], r["eval_loss_after"]])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "merged" / "model.safetensors").exists() and (tmp_path / "model.onnx").exists()
    answers = summary["answers"]
    assert set(answers) >= {"before fine-tuning", "after fine-tuning", "merged export (bf16)",
                            "ONNX export (onnxruntime)"}  # fmt: skip
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "report.md").read_text().startswith("# qlora-compile demo")


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_missing_extra_names_it(tmp_path, capsys, monkeypatch):
    """An optional dependency not installed (here: as if onnxruntime were missing) is one line that
    says which extra installs it, not a traceback."""
    import qlora_compile.plan

    def needs_onnxruntime(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")

    monkeypatch.setattr(qlora_compile.plan, "plan_memory", needs_onnxruntime)
    assert cli.main(["plan", str(tmp_path / "config.json"), "--gpu-memory", "48GB"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "qlora-compile plan: needs onnxruntime: pip install 'qlora-compile[onnx]'"
    ]
