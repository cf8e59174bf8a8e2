"""TrainConfig: YAML, --key value overrides read as YAML scalars, nested QLoRAConfig fields, and
unknown keys refused with the closest field named."""

import pytest
import torch

from qlora_compile.errors import InvalidConfigError
from qlora_compile.tools import cli
from qlora_compile.train.config import TrainConfig, load_config, parse_overrides

YAML = """
model: some/model
data: [a.jsonl, b.parquet]
max_length: 256
train_on_inputs: yes
schedule: cosine
warmup_ratio: 0.1
qlora:
  r: 16
  lr: 1e-3          # PyYAML reads this as text; a float field takes the number
  compute_dtype: float32
  target_modules: [q_proj, v_proj]
"""


def test_yaml_with_overrides_on_top(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML)
    cfg = load_config(
        path, ["--qlora.r", "8", "--seed=3", "--eval-split", "0.25", "--qlora.max_grad_norm", "null"]
    )
    assert cfg.model == "some/model" and cfg.data_files == ["a.jsonl", "b.parquet"]
    assert cfg.max_length == 256 and cfg.train_on_inputs is True and cfg.schedule == "cosine"
    assert cfg.seed == 3 and cfg.eval_split == 0.25 and cfg.warmup_ratio == 0.1
    q = cfg.qlora
    assert q.r == 8 and q.lr == 1e-3 and isinstance(q.lr, float) and q.compute_dtype is torch.float32
    assert q.target_modules == ("q_proj", "v_proj") and q.max_grad_norm is None
    assert q.lora_dropout == 0.05  # untouched fields keep QLoRAConfig's defaults


def test_flags_alone_equal_the_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML)
    flags = ["--model", "some/model", "--data", "[a.jsonl, b.parquet]", "--max_length", "256",
             "--train_on_inputs", "yes", "--schedule", "cosine", "--warmup_ratio", "0.1", "--qlora.r", "16",
             "--qlora.lr", "1e-3", "--qlora.compute_dtype", "float32", "--qlora.target_modules", "[q_proj, v_proj]"]  # fmt: skip
    assert load_config(None, flags) == load_config(path)


def test_override_values_are_yaml_scalars():
    assert parse_overrides(["--a", "3", "--b", "0.5", "--c", "true", "--d", "text", "--e=[1, 2]", "--f", "null"]) == {
        "a": 3, "b": 0.5, "c": True, "d": "text", "e": [1, 2], "f": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("qlora.rr", "qlora.r"), ("lr", "qlora.lr"), ("max_step", "max_steps"), ("lora_dropout", "qlora.lora_dropout"),
     ("batchsize", "batch_size")],
)  # fmt: skip
def test_unknown_key_names_the_closest(key, suggestion, tmp_path, capsys):
    assert cli.main(["train", "--model", "m", "--data", "d.jsonl", f"--{key}", "1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"qlora-compile train: unknown config key {key!r} (did you mean {suggestion!r}?)"
    ]


def test_unknown_yaml_key(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: d.jsonl\nqlora:\n  rank: 8\n")
    assert cli.main(["train", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "qlora-compile train: unknown config key 'qlora.rank' (did you mean 'qlora.r'?)"
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--schedule", "step"], "schedule must be one of constant, linear, cosine; got 'step'"),
        (["--batch_size", "0"], "batch_size must be at least 1, got 0"),
        (["--max_length", "many"], "max_length must be an int, got 'many'"),
        (["--qlora.lr", "fast"], "qlora.lr must be a number, got 'fast'"),
        (["--qlora.backend", "tvm"], "backend must be one of ('inductor', 'aot_eager', 'eager'), got 'tvm'"),
        (["--grad_accum", "2", "--qlora.step_in_backward", "true", "--qlora.max_grad_norm", "null"],
         "qlora.step_in_backward steps inside every backward"),
        (["--eval_data", "e.jsonl", "--eval_split", "0.1"], "give eval_data or eval_split, not both"),
        (["--device", "gpu"], "device must be auto, cpu, cuda or cuda:N; got 'gpu'"),
        (["--qlora.quant_type", "none", "--export", "merged"], "a 16-bit LoRA run (qlora.quant_type none) is not"),
        (["--qlora.quant_type", "int4", "--export", "nf4"], "export nf4 writes bitsandbytes' format, which has no Int4"),
    ],
)  # fmt: skip
def test_bad_values(overrides, message):
    with pytest.raises(InvalidConfigError) as e:
        load_config(None, ["--model", "m", "--data", "d.jsonl", *overrides])
    assert message in str(e.value)


def test_required_fields():
    with pytest.raises(InvalidConfigError, match="model is required"):
        TrainConfig(data="d.jsonl")
    with pytest.raises(InvalidConfigError, match="data is required"):
        TrainConfig(model="m")


def test_verbose_after_train_gives_the_traceback(capsys):
    assert cli.main(["train", "--model", "m", "--data", "d.jsonl", "--qlora.rr", "1", "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "InvalidConfigError" in err
    assert (
        err.rstrip().splitlines()[-1]
        == "qlora-compile train: unknown config key 'qlora.rr' (did you mean 'qlora.r'?)"
    )
