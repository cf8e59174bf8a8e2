"""Fixed-size pages of optimizer state: at most a byte budget on the compute device, the rest on host.

A `Pager` owns
- a host store holding every page: pinned host memory on CUDA; on CPU a memory-mapped temporary
  file (sparse, so untouched state costs nothing): pages are read through the mapping and dropped
  from the process after each read (`madvise(MADV_DONTNEED)`), and written back with `pwrite`
  (no page faults, nothing mapped), so RAM stays bounded by the budget;
- a device pool of `budget // slot_bytes` slots, each holding one page while it is in use, with
  least-recently-used eviction (dirty pages are written back first).

On CUDA, transfers run on a side stream: `prefetch(page)` starts the next page's copy while the
current one is being updated, and events order copies against the compute stream. On CPU a
prefetch asks the kernel to read the next page ahead (`MADV_WILLNEED`).

`resident_nbytes` counts the state bytes present on the device (pages in slots plus states
registered as permanently resident); `peak_resident_nbytes` is its high-water mark. Both are
bounded by the budget by construction.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass

import torch

_ALIGN = mmap.PAGESIZE  # host offsets are aligned so madvise can act on each page alone


@dataclass
class _Page:
    offset: int  # in the host store
    nbytes: int


class _HostStore:
    """Host bytes for all pages: pinned memory (CUDA) or a memory-mapped temporary file (CPU)."""

    def __init__(self, nbytes: int, device: torch.device, directory: str | None):
        self.nbytes = max(nbytes, 1)
        self._mmap = None
        self._file = None
        if device.type == "cpu":
            self._file = tempfile.TemporaryFile(prefix="qlora-optim-", dir=directory)  # unlinked already
            os.ftruncate(self._file.fileno(), self.nbytes)  # sparse: reads as zeros, costs nothing
            self._mmap = mmap.mmap(self._file.fileno(), self.nbytes)
            self.data = torch.frombuffer(self._mmap, dtype=torch.uint8)
        else:
            pin = device.type == "cuda"
            self.data = torch.zeros(self.nbytes, dtype=torch.uint8, pin_memory=pin)

    def view(self, page: _Page) -> torch.Tensor:
        return self.data[page.offset : page.offset + page.nbytes]

    def write(self, page: _Page, src: torch.Tensor) -> None:
        """Store `src` (a contiguous uint8 host tensor) as the page's bytes."""
        if self._file is None:
            self.view(page).copy_(src)
            return
        # pwrite, not a copy through the mapping: no page faults, and no pages mapped into the
        # process; the mapping sees the same page cache.
        data, offset = memoryview(src.numpy()), page.offset
        while len(data):
            written = os.pwrite(self._file.fileno(), data, offset)
            data, offset = data[written:], offset + written

    def drop(self, page: _Page) -> None:
        """Release the host pages behind `page` from this process (the file keeps the data)."""
        if self._mmap is not None:
            self._mmap.madvise(mmap.MADV_DONTNEED, page.offset, page.nbytes)

    def will_need(self, page: _Page) -> None:
        if self._mmap is not None:
            self._mmap.madvise(mmap.MADV_WILLNEED, page.offset, page.nbytes)

    def close(self) -> None:
        self.data = None
        if self._mmap is not None:
            self._mmap.close()
            self._file.close()
            self._mmap = self._file = None


class Pager:
    """Pages of state bytes with at most `budget` bytes on `device`.

    Use: `add_page(nbytes)` for every page, `allocate()` once, then `get(page)` (a uint8 view
    of the page's bytes on the device, valid until the next `get`/`prefetch`), `mark_dirty(page)`
    after writing it, and `flush()` before reading the host copy (`host_view`).
    """

    def __init__(self, device: torch.device | str, budget: int, directory: str | None = None):
        budget = int(budget)
        if budget <= 0:
            raise ValueError(f"device_budget must be a positive number of bytes, got {budget}")
        self.device = torch.device(device)
        self.budget = budget
        self.directory = directory
        self._pages: list[_Page] = []
        self._host_end = 0
        self._fixed = 0  # bytes of states kept resident outside the pages
        self.slot_bytes = 0
        self.resident_nbytes = 0
        self.peak_resident_nbytes = 0
        self.page_ins = 0
        self.page_outs = 0
        self._host: _HostStore | None = None

    # -- layout --------------------------------------------------------------------------------
    def add_page(self, nbytes: int) -> int:
        if self._host is not None:
            raise RuntimeError("pages must be added before allocate()")
        self._pages.append(_Page(self._host_end, nbytes))
        self._host_end += -(-nbytes // _ALIGN) * _ALIGN
        self.slot_bytes = max(self.slot_bytes, nbytes)
        return len(self._pages) - 1

    def add_resident(self, nbytes: int) -> None:
        """Count `nbytes` of state kept on the device permanently (small tensors)."""
        self._fixed += nbytes
        self._count(nbytes)

    def allocate(self) -> None:
        pool_bytes = self.budget - self._fixed
        n_slots = pool_bytes // self.slot_bytes if self.slot_bytes else 0
        if self._pages and n_slots < 1:
            raise ValueError(
                f"device_budget of {self.budget} bytes cannot hold one page of {self.slot_bytes} bytes"
                + (f" beside {self._fixed} bytes of resident states" if self._fixed else "")
                + "; raise the budget or lower page_elements"
            )
        self.n_slots = n_slots
        self._host = _HostStore(self._host_end, self.device, self.directory)
        self._pool = torch.empty((n_slots, self.slot_bytes), dtype=torch.uint8, device=self.device)
        self._slot_page: list[int | None] = [None] * n_slots
        self._page_slot: dict[int, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # resident pages, oldest first
        self._dirty: set[int] = set()
        self._busy: set[int] = set()  # pages that must not be evicted now
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            self._stream = torch.cuda.Stream(self.device)
            self._ready: dict[int, torch.cuda.Event] = {}  # page -> copy-in finished
            self._used: dict[int, torch.cuda.Event] = {}  # slot -> compute on it finished

    @property
    def pool_nbytes(self) -> int:
        return self.n_slots * self.slot_bytes

    @property
    def host_nbytes(self) -> int:
        return self._host_end

    def __len__(self) -> int:
        return len(self._pages)

    # -- residency -----------------------------------------------------------------------------
    def _count(self, delta: int) -> None:
        self.resident_nbytes += delta
        self.peak_resident_nbytes = max(self.peak_resident_nbytes, self.resident_nbytes)
        assert self.resident_nbytes <= self.budget, "pager over budget"  # by construction

    def _free_slot(self) -> int:
        for slot, page in enumerate(self._slot_page):
            if page is None:
                return slot
        for page in self._lru:  # oldest first
            if page not in self._busy:
                slot = self._page_slot[page]
                self._evict(page)
                return slot
        raise RuntimeError("every page slot is in use; raise device_budget")

    def _evict(self, page: int) -> None:
        slot = self._page_slot.pop(page)
        del self._lru[page]
        self._slot_page[slot] = None
        info = self._pages[page]
        if self._cuda:
            self._ready.pop(page, None)
        if page in self._dirty:
            self._dirty.discard(page)
            src = self._pool[slot, : info.nbytes]
            if self._cuda:
                self._stream.wait_event(self._used[slot])
                with torch.cuda.stream(self._stream):
                    self._host.view(info).copy_(src, non_blocking=True)
            else:
                self._host.write(info, src)
            self.page_outs += 1
        self._count(-info.nbytes)

    def _load(self, page: int) -> int:
        slot = self._free_slot()
        info = self._pages[page]
        dst = self._pool[slot, : info.nbytes]
        if self._cuda:
            if slot in self._used:  # the slot's previous user must be done with it
                self._stream.wait_event(self._used[slot])
            with torch.cuda.stream(self._stream):
                dst.copy_(self._host.view(info), non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._ready[page] = event
        else:
            dst.copy_(self._host.view(info))
            self._host.drop(info)
        self._slot_page[slot] = page
        self._page_slot[page] = slot
        self._lru[page] = None
        self.page_ins += 1
        self._count(info.nbytes)
        return slot

    def prefetch(self, page: int) -> None:
        """Start bringing `page` in (CUDA: an async copy; CPU: kernel read-ahead of the file)."""
        if page in self._page_slot:
            return
        if self._cuda:
            if self.n_slots < 2:
                return
            self._load(page)
            self._busy = {p for p in self._busy if p in self._page_slot} | {page}
        else:
            self._host.will_need(self._pages[page])

    def get(self, page: int) -> torch.Tensor:
        """The page's bytes on the device (brought in if needed); protected until the next get."""
        slot = self._page_slot.get(page)
        if slot is None:
            self._busy = {page}
            slot = self._load(page)
        self._busy = {page}
        self._lru.move_to_end(page)
        if self._cuda:
            event = self._ready.pop(page, None)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
        return self._pool[slot, : self._pages[page].nbytes]

    def mark_dirty(self, page: int) -> None:
        """`page` was written through the view `get` returned."""
        self._dirty.add(page)
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._used[self._page_slot[page]] = event

    def flush(self) -> None:
        """Write every dirty page back to the host (they stay resident) and wait for the copies."""
        for page in sorted(self._dirty):
            slot = self._page_slot[page]
            info = self._pages[page]
            if self._cuda:
                self._stream.wait_event(self._used[slot])
                with torch.cuda.stream(self._stream):
                    self._host.view(info).copy_(self._pool[slot, : info.nbytes], non_blocking=True)
            else:
                self._host.write(info, self._pool[slot, : info.nbytes])
        self._dirty.clear()
        if self._cuda:
            self._stream.synchronize()

    def host_view(self, page: int) -> torch.Tensor:
        """The host copy of `page` (current after `flush()`); call `drop_host(page)` when done."""
        return self._host.view(self._pages[page])

    def drop_host(self, page: int) -> None:
        self._host.drop(self._pages[page])

    def write(self, page: int, data: torch.Tensor) -> None:
        """Replace a page's bytes (used when loading a checkpoint)."""
        if page in self._page_slot:
            self.get(page).copy_(data)
            self.mark_dirty(page)
        else:
            if self._cuda:
                self._stream.synchronize()  # a write-back of this page may be in flight
                self._host.view(self._pages[page]).copy_(data)
            else:
                self._host.write(self._pages[page], data.contiguous())

    def close(self) -> None:
        if self._host is not None:
            self._host.close()
            self._host = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
