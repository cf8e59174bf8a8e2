"""Merged and NF4 exports are sharded as `save_pretrained` shards (transformers loads them) and resume
after a kill: the resumed folder equals an uninterrupted export byte for byte."""

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
import transformers

import qlora_compile
from qlora_compile.checkpoint.output_folder import MANIFEST
from tests.export.export_helpers import input_ids
from tests.killed_run import killed_run

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
EXPORTS = {"merged": ("export_merged", "150KB"), "nf4": ("export_nf4", "40KB")}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _export(fmt, base, adapter, out, **kw):
    result = getattr(qlora_compile, EXPORTS[fmt][0])(base, adapter, out, progress=False, **kw)
    return result[1] if fmt == "nf4" else None


def _logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    with torch.no_grad():
        return model.train()(input_ids=ids).logits  # train mode: bitsandbytes' CPU eval path is bf16


@pytest.mark.parametrize("fmt", EXPORTS)
def test_sharded_export_loads_in_transformers(fmt, llama_dir, trained, tmp_path):
    _, adapter = trained
    _export(fmt, llama_dir, adapter, tmp_path / "one")
    _export(fmt, llama_dir, adapter, tmp_path / "sharded", max_shard_size=EXPORTS[fmt][1])
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == set(shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    ids = input_ids(2, 9)
    torch.testing.assert_close(
        _logits(tmp_path / "sharded", ids), _logits(tmp_path / "one", ids), atol=0, rtol=0
    )


@pytest.mark.parametrize("fmt", EXPORTS)
def test_killed_export_resumes_to_the_same_bytes(fmt, llama_dir, trained, tmp_path):
    _, adapter = trained
    size = EXPORTS[fmt][1]
    reports = _export(fmt, llama_dir, adapter, tmp_path / "clean", max_shard_size=size)
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    argv = ["export", fmt, "--base", str(llama_dir), "--adapter", str(adapter), "--out", str(out)]
    killed_run(1, *argv, "--max-shard-size", size, "--no-progress")
    assert not out.exists() and (partial / MANIFEST).exists()
    assert len(list(partial.glob("model-*.safetensors"))) == 1
    resumed = _export(fmt, llama_dir, adapter, out, max_shard_size=size)
    assert not partial.exists()
    assert _digests(out) == _digests(tmp_path / "clean")
    assert resumed == reports  # nf4: the reused shard's layer reports come back from the manifest
