"""The pager on its own: residency within the budget, LRU eviction with write-back, flush."""

import pytest
import torch

from qlora_compile.optim import Pager


def test_pages_round_trip_through_the_file_within_budget():
    pager = Pager("cpu", budget=3 * 4096)
    pages = [pager.add_page(4096) for _ in range(5)] + [pager.add_page(1000)]
    pager.allocate()
    assert pager.n_slots == 3 and len(pager) == 6
    for i, page in enumerate(pages):  # fill every page with its index
        pager.get(page).fill_(i)
        pager.mark_dirty(page)
        assert pager.resident_nbytes <= 3 * 4096
    assert pager.page_outs == 3  # pages 0..2 were written back to make room
    for i, page in enumerate(pages):
        view = pager.get(page)
        assert view.numel() == (1000 if i == 5 else 4096)
        assert bool((view == i).all())
    pager.flush()
    for i, page in enumerate(pages):
        assert bool((pager.host_view(page) == i).all())
    pager.write(pages[0], torch.full((4096,), 7, dtype=torch.uint8))
    assert bool((pager.get(pages[0]) == 7).all())
    assert pager.peak_resident_nbytes <= 3 * 4096


def test_untouched_pages_read_as_zeros_and_budget_errors():
    pager = Pager("cpu", budget=8192)
    page = pager.add_page(8192)
    pager.allocate()
    assert bool((pager.get(page) == 0).all())
    with pytest.raises(ValueError, match="positive number of bytes"):
        Pager("cpu", budget=0)
    small = Pager("cpu", budget=100)
    small.add_page(4096)
    with pytest.raises(ValueError, match="cannot hold one page"):
        small.allocate()
