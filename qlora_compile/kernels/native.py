"""The native CPU kernel (`qlora_cpu.c`): built on first use, cached, called through ctypes.

The library is compiled for this machine (`-march=native`, no fused multiply-add so results match
the torch path bit for bit) into `$QLORA_COMPILE_CACHE` (default `~/.cache/qlora_compile`), keyed
by the source, the flags and the CPU, and loaded once per process. Work is split into
block-aligned ranges run on `torch.get_num_threads()` threads; ctypes releases the GIL.

Set `QLORA_COMPILE_NATIVE=0` to use the torch path instead. If no C compiler is found or the build
fails, a warning is logged once and the torch path is used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..codes import bucket_bounds, code4

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("qlora_cpu.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MIN_PARALLEL = 1 << 16  # elements below which one thread is cheaper than a hand-off


def _cpu_key() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _cache_dir() -> Path:
    root = os.environ.get("QLORA_COMPILE_CACHE") or Path.home() / ".cache" / "qlora_compile"
    return Path(root)


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    digest = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), compiler.encode(), _cpu_key().encode()):
        digest.update(part)
    target = _cache_dir() / f"qlora_cpu-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        cmd = [compiler, *_FLAGS, str(_SOURCE), "-o", str(partial)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()}")
        os.replace(partial, target)  # atomic: concurrent builders never see a half-written file
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("QLORA_COMPILE_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError) as e:
        logger.warning("native CPU kernel unavailable, using the torch path: %s", e)
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.qc_dequantize.argtypes = [p, p, p, p, i32, i64, i64, i64]
    lib.qc_dequantize.restype = None
    lib.qc_quantize.argtypes = [p, i32, p, p, p, p, i64, i64, i64, i64]
    lib.qc_quantize.restype = i32
    return lib


def available() -> bool:
    """True when the native kernel is built and loaded (it is then the CPU path)."""
    return _library() is not None


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qlora-native")


def _ranges(n: int, blocksize: int) -> list[tuple[int, int]]:
    workers = max(1, torch.get_num_threads()) if n >= _MIN_PARALLEL else 1
    blocks = -(-n // blocksize)
    per = -(-blocks // workers) * blocksize
    return [(s, min(n, s + per)) for s in range(0, n, per)]


def _run(fn, n: int, blocksize: int) -> list:
    ranges = _ranges(n, blocksize)
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    return list(_pool(len(ranges)).map(lambda r: fn(*r), ranges))


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def empty_large(n: int, dtype: torch.dtype) -> torch.Tensor:
    """`torch.empty(n)`, asking Linux to back its interior with transparent huge pages.

    A fresh multi-MB CPU tensor is a fresh mmap whose first touch page-faults every 4 KB; that
    fault cost is 3x the dequantization itself. MADV_HUGEPAGE is only a hint: where THP is off,
    nothing changes.
    """
    out = torch.empty(n, dtype=dtype)
    madvise = _madvise()
    if madvise is not None and out.nbytes >= 2 * _HUGE_PAGE:
        ptr = out.data_ptr()
        start = -(-ptr // _HUGE_PAGE) * _HUGE_PAGE
        end = (ptr + out.nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)
    return out


def quantize_4bit(flat: torch.Tensor, quant_type: str, blocksize: int):
    """Same contract as `cpu.quantize_4bit`: (packed, absmax, has_nonfinite)."""
    lib = _library()
    assert lib is not None and flat.device.type == "cpu"
    flat = flat.contiguous()
    n = flat.numel()
    bounds, nibble = bucket_bounds(quant_type)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    args = (flat.data_ptr(), _KINDS[flat.dtype], bounds.data_ptr(), nibble.data_ptr(), packed.data_ptr())

    def work(start: int, stop: int) -> int:
        return lib.qc_quantize(*args, absmax.data_ptr(), blocksize, start, stop, n)

    nonfinite = any(_run(work, n, blocksize))
    return packed, absmax, nonfinite


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Same contract as `cpu.dequantize_4bit` (absmax already decoded to fp32)."""
    lib = _library()
    assert lib is not None and packed.device.type == "cpu"
    packed, absmax = packed.contiguous(), absmax.contiguous().float()
    out = empty_large(n, dtype)
    code = code4(quant_type)
    args = (packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), out.data_ptr(), _KINDS[dtype], blocksize)
    _run(lambda start, stop: lib.qc_dequantize(*args, start, stop), n, blocksize)
    return out
