"""Fixtures of the train tests: a 1-layer Llama with SmolLM2's real tokenizer (and chat template),
and small data files."""

import json
import random
import shutil
from pathlib import Path

import pytest

from tests.models import save_tiny

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
WORDS = "what is the time now please tell me it noon late early yes no maybe why because".split()


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, smollm2_dir) -> Path:
    """A random 1-layer Llama whose vocabulary is SmolLM2's (49152), with SmolLM2's tokenizer files."""
    folder = save_tiny(
        tmp_path_factory.mktemp("tiny-lm") / "model", vocab_size=49152, num_hidden_layers=1,
        max_position_embeddings=256,
    )  # fmt: skip
    copy_tokenizer(smollm2_dir, folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tiny_lm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm)


def sentence(r: random.Random, lo: int, hi: int) -> str:
    return " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """Single-turn conversations of varying lengths (about 15 to 40 tokens with the template)."""
    r = random.Random(seed)
    return [
        {"messages": [{"role": "user", "content": sentence(r, 2, 14)},
                      {"role": "assistant", "content": sentence(r, 1, 10)}]}
        for _ in range(n)
    ]  # fmt: skip


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_records(24))
