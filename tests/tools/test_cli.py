"""The command line: `info`, and the `demo` job's pieces plus a tiny end-to-end run."""

import json
import shutil

import numpy as np
import pytest

from qlora_compile.tools import cli, demo


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


def test_bad_input_exits_2(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err


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

    def __init__(self, template: bool):
        self.chat_template = "yes" if template else None

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        text = "".join(f"{m['role'][0]}:{m['content']}|" for m in messages)
        return [ord(c) for c in text + ("a:" if add_generation_prompt else "")]

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_encode_pair_masks_the_prompt():
    ids, labels = demo.encode_pair(CharTokenizer(template=True), "Hi", "Yo")
    text = f"s:{demo.SYSTEM}|u:Hi|a:Yo|"
    assert ids == [ord(c) for c in text]
    assert labels == [-100] * (len(text) - 3) + [ord("Y"), ord("o"), ord("|")]
    ids, labels = demo.encode_pair(CharTokenizer(template=False), "Hi", "Yo")
    head = [ord(c) for c in "Question: Hi\nAnswer:"]
    assert ids == head + [ord(" "), ord("Y"), ord("o"), 0]
    assert labels == [-100] * len(head) + [ord(" "), ord("Y"), ord("o"), 0]


def test_encode_pair_with_smollm2_template(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids, labels = demo.encode_pair(tokenizer, "What is AI?", "A branch of science.")
    answer = [t for t in labels if t != -100]
    assert labels[: len(ids) - len(answer)] == [-100] * (len(ids) - len(answer))
    assert ids[len(ids) - len(answer) :] == answer
    assert tokenizer.decode(answer) == "A branch of science.<|im_end|>\n"
    assert tokenizer.decode(ids[: len(ids) - len(answer)]).endswith(
        "What is AI?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_collate_pads_to_a_fixed_length():
    batch = demo.collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], length=4, pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [8, 2, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_loss_png_is_a_valid_image(tmp_path):
    """Read back by matplotlib's own PNG reader: the asked size, and both curves' colours drawn."""
    from matplotlib import colors, image

    path = tmp_path / "loss.png"
    demo.write_loss_png(path, [3.0, 2.5, float("nan"), 2.0], 3.2, 2.1, w=320, h=200)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)[..., :3]
    assert pixels.shape == (200, 320, 3)
    for name in ("tab:blue", "tab:red"):
        near = np.abs(pixels - np.array(colors.to_rgb(name))).max(-1) < 0.02
        assert near.sum() > 20, name


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
    args = ["demo", "--out", str(tmp_path), "--steps", "2", "--batch-size", "2", "--eval-pairs", "2"]
    args += ["--train-pairs", "4", "--max-length", "40", "--max-new-tokens", "2"]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["layers"] == 14 and summary["bits_per_param"] == pytest.approx(4.127, abs=1e-3)
    assert len(summary["train_losses"]) == 2 and summary["train_pairs"] == 4
    assert summary["quantized"].startswith("qlora-compile convert")
    assert json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    assert all(0 < x < 30 for x in [summary["held_out_loss_before"], summary["held_out_loss_after"]])
    assert summary["answers"]["prompt"] and set(summary["timings"]) >= {"fine-tune", "total"}
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "merged" / "model.safetensors").exists() and (tmp_path / "model.onnx").exists()
    answers = summary["answers"]
    assert set(answers) >= {"after fine-tuning", "merged export (bf16)", "ONNX export (onnxruntime)"}
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "report.md").read_text().startswith("# qlora-compile demo")


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
