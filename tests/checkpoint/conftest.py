import pytest

from tests.checkpoint.convert_helpers import tiny_llama


@pytest.fixture(scope="session")
def llama_src(tmp_path_factory):
    """A tiny random Llama (4 layers, fp32, untied head) as an HF folder, built once."""
    return tiny_llama(tmp_path_factory.mktemp("llama") / "src", layers=4)
