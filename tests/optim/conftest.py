import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The optimizer tests run many small ops; one intra-op thread avoids waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
