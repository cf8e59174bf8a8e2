"""Bad input: a one-line message, exit code 2, and nothing at DST (nor DST.partial)."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_compile.tools import cli
from tests.checkpoint.convert_helpers import read_tensors


@pytest.fixture
def good(llama_src):
    return llama_src


def _fails(src, dst, capsys, *extra) -> str:
    rc = cli.main(["convert", str(src), str(dst), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("qlora-compile convert: ")
    assert not dst.exists() and not dst.with_name(dst.name + ".partial").exists()
    return err


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_missing_folder(tmp_path, capsys):
    assert "no such folder" in _fails(tmp_path / "nope", tmp_path / "dst", capsys)


def test_not_a_model_folder(tmp_path, good, capsys):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _fails(tmp_path / "empty", tmp_path / "dst", capsys)
    src = _copy(good, tmp_path / "noweights")
    (src / "model.safetensors").unlink()
    assert "no model.safetensors" in _fails(src, tmp_path / "dst", capsys)
    src = _copy(good, tmp_path / "badconfig")
    (src / "config.json").write_text("{not json")
    assert "config.json cannot be read" in _fails(src, tmp_path / "dst", capsys)


def test_truncated_and_corrupt_safetensors(tmp_path, good, capsys):
    src = _copy(good, tmp_path / "truncated")
    data = (good / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 1000])
    assert "truncated" in _fails(src, tmp_path / "dst", capsys)
    (src / "model.safetensors").write_bytes(struct.pack("<Q", 50) + b"{garbage" + data[16:])
    assert "corrupt" in _fails(src, tmp_path / "dst", capsys)


def test_nonfinite_names_the_tensor_unless_allowed(tmp_path, good, capsys):
    src = _copy(good, tmp_path / "nan")
    tensors = load_file(good / "model.safetensors")
    tensors["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    err = _fails(src, tmp_path / "dst", capsys)
    assert "model.layers.1.self_attn.v_proj.weight" in err and "1 NaN" in err and "(3, 5)" in err
    # a NaN in a tensor that stays dense passes with --allow-nonfinite, and is kept
    tensors["model.layers.1.self_attn.v_proj.weight"][3, 5] = 0.0
    tensors["model.norm.weight"][7] = float("inf")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    err = _fails(src, tmp_path / "dst", capsys)
    assert "model.norm.weight" in err and "1 Inf" in err and "--allow-nonfinite" in err
    assert cli.main(["convert", str(src), str(tmp_path / "dst"), "--no-progress", "--allow-nonfinite"]) == 0
    assert torch.isinf(read_tensors(tmp_path / "dst")["model.norm.weight"][7])


def test_existing_destination_needs_overwrite(tmp_path, good, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    assert cli.main(["convert", str(good), str(dst), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (dst / "keep.txt").exists()
    assert cli.main(["convert", str(good), str(dst), "--no-progress", "--overwrite"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()
    assert not dst.with_name("dst.partial").exists()


def test_unsupported_dtypes(tmp_path, good, capsys):
    src = _copy(good, tmp_path / "int8")
    tensors = load_file(good / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(128, 64, dtype=torch.int8)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    err = _fails(src, tmp_path / "dst", capsys)
    assert "model.layers.0.mlp.up_proj.weight" in err and "unsupported dtype I8" in err
    raw = (good / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["dtype"] = "F8_E5M2"  # 1 byte per value: sizes no longer add up
    header["model.norm.weight"]["shape"] = [256]
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    assert "unsupported dtype F8_E5M2" in _fails(src, tmp_path / "dst", capsys)
