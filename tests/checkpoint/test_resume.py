"""A killed conversion leaves no DST; running it again reuses the shards that verify and gives the same folder."""

import hashlib
import shutil
from pathlib import Path

import qlora_compile
from qlora_compile.checkpoint.output_folder import MANIFEST
from tests.killed_run import killed_run


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _killed_run(src: Path, dst: Path, after: int) -> None:
    killed_run(after, "convert", str(src), str(dst), "--max-shard-size", "40KB")


def test_killed_run_resumes_from_verified_shards(tmp_path, llama_src):
    src = llama_src
    clean = qlora_compile.convert_checkpoint(src, tmp_path / "clean", max_shard_size="40KB", progress=False)
    assert clean.shards >= 5
    dst, partial = tmp_path / "dst", tmp_path / "dst.partial"

    _killed_run(src, dst, after=3)
    assert not dst.exists() and (partial / MANIFEST).exists()
    assert len(list(partial.glob("model-*.safetensors"))) == 3
    for name in ("dst2.partial", "dst3.partial"):  # the same killed state, for the cases below
        shutil.copytree(partial, tmp_path / name)
    resumed = qlora_compile.convert_checkpoint(src, dst, max_shard_size="40KB", progress=False)
    assert resumed.reused_shards == 3 and resumed.shards == clean.shards
    assert _digests(dst) == _digests(tmp_path / "clean")
    assert not partial.exists()

    # a damaged finished shard fails its checksum and is written again
    dst2 = tmp_path / "dst2"
    first = sorted((tmp_path / "dst2.partial").glob("model-*.safetensors"))[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))
    resumed = qlora_compile.convert_checkpoint(src, dst2, max_shard_size="40KB", progress=False)
    assert resumed.reused_shards == 2
    assert _digests(dst2) == _digests(tmp_path / "clean")

    # other options: the partial folder belongs to another conversion and is started over
    dst3 = tmp_path / "dst3"
    other = qlora_compile.convert_checkpoint(
        src, dst3, max_shard_size="40KB", quant_type="fp4", progress=False
    )
    assert other.reused_shards == 0 and (dst3 / "model.safetensors.index.json").exists()
