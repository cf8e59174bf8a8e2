"""Fixtures of the export tests: a small random Llama saved as an HF folder, and an adapter."""

import pytest

import qlora_compile
from tests.export.export_helpers import compiled_with_adapter, tiny_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(llama_dir, tmp_path_factory):
    """(our compiled model with its adapter, the adapter folder)."""
    model = compiled_with_adapter(llama_dir)
    adapter_dir = tmp_path_factory.mktemp("adapter")
    qlora_compile.save_adapter(model, adapter_dir)
    return model, adapter_dir
