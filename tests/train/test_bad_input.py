"""Bad input through the command line: one line on stderr, exit 2, before any training, and no
output folder left behind."""

import importlib.util
import json
import shutil

import pytest
import torch

from qlora_compile.tools import cli
from tests.train.conftest import chat_records, write_jsonl


def bad_model_without_tokenizer(tmp_path, tiny_lm):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_lm / f, folder / f)
    return folder


def bad_model_without_template(tmp_path, tiny_lm):
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_lm, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def lines(path, text):
    path.write_text(text)
    return path


# (name, how to make the data file or None for the chat file, model maker or None, extra args, stderr)
CASES = [
    ("missing data", lambda d: d / "nope.jsonl", None, [], "data file {data} does not exist"),
    ("malformed jsonl", lambda d: lines(d / "bad.jsonl", '{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n'), None, [],
     "data file {data} cannot be read: line 3: Expecting ',' delimiter"),
    ("jsonl not objects", lambda d: lines(d / "list.jsonl", '{"text": "a"}\n[1, 2]\n'), None, [],
     "data file {data} cannot be read: line 2: a JSON object is expected, got list"),
    ("malformed csv", lambda d: lines(d / "bad.csv", "prompt,completion\na,b\nc,d,e\n"), None, [],
     "data file {data} cannot be read: Error tokenizing data. C error: Expected 2 fields in line 3, saw 3"),
    ("malformed parquet", lambda d: lines(d / "bad.parquet", "not parquet at all\n"), None, [],
     "data file {data} cannot be read: Parquet magic bytes not found in footer. Either the file is corrupted "
     "or this is not a parquet file."),
    ("unknown file type", lambda d: lines(d / "data.txt", "hello\n"), None, [],
     "data file {data}: unknown type '.txt'; use .jsonl, .json, .csv, .parquet or a save_to_disk folder"),
    ("unknown format", None, None, ["--format", "sharegpt"],
     "format must be one of auto, chat, instruction, completion, text; got 'sharegpt'"),
    ("undetectable columns", lambda d: write_jsonl(d / "qa.jsonl", [{"question": "q", "answer": "a"}]), None, [],
     "{data}: cannot tell the data format from the columns ['answer', 'question']; expected messages (chat); "
     "instruction/output (instruction); prompt/completion (completion); text (text), or set format"),
    ("chat record without an assistant", lambda d: write_jsonl(d / "c.jsonl", chat_records(2) + [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}]), None, [],
     "{data} record 3: chat record has no 'assistant' message (roles: user, user)"),
    ("chat message without a role", lambda d: write_jsonl(d / "c.jsonl", [
        {"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}]), None, [],
     "{data} record 1: message 0 needs a 'role' and a 'content', got {{'content': 'hi'}}"),
    ("model without tokenizer", None, bad_model_without_tokenizer, [],
     "model folder {model} has no tokenizer (tokenizer.json, tokenizer.model, vocab.json, tokenizer_config.json): "
     "save the base model's tokenizer into it (tokenizer.save_pretrained)"),
    ("chat without a chat template", None, bad_model_without_template, [],
     "model folder {model}: its tokenizer has no chat template, which the chat format needs (use format: "
     "completion or text, or a tokenizer with a chat_template)"),
    ("unknown override", None, None, ["--qlora.lora_rank", "8"],
     "unknown config key 'qlora.lora_rank' (did you mean 'qlora.lora_alpha'?)"),
    ("tensorboard not installed", None, None, ["--tensorboard", "true"],
     "tensorboard: true needs the tensorboard package: pip install 'qlora-compile[tensorboard]'"),
    ("cuda without a GPU", None, None, ["--device", "cuda"], "device 'cuda': this torch sees no CUDA device"),
    ("resume without checkpoints", None, None, ["--resume", "latest"],
     "--resume latest: no checkpoint-<step> folder in {out}"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "make_data", "make_model", "extra", "message"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_input(name, make_data, make_model, extra, message, tmp_path, tiny_lm, chat_jsonl, capsys,
                   monkeypatch):  # fmt: skip
    if name == "tensorboard not installed":  # the dev extra installs it: as on a machine without it
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else find_spec(n, *a)
        )
    if name == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = make_data(tmp_path) if make_data else chat_jsonl
    model = make_model(tmp_path, tiny_lm) if make_model else tiny_lm
    out = tmp_path / "out"
    argv = ["train", "--model", str(model), "--data", str(data), "--output_dir", str(out), "--qlora.backend",
            "aot_eager", "--no-progress", *extra]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"qlora-compile train: {message.format(data=data, model=model, out=out)}"]
    assert not out.exists()
