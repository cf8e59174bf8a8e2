"""The native CPU kernel (`qlora_cpu.c`): built on first use, cached, called through ctypes.

The library is compiled for this machine (`-march=native`, no fused multiply-add so results match
the torch path bit for bit) into `$QLORA_COMPILE_CACHE` (default `~/.cache/qlora_compile`), keyed
by the source, the flags and the CPU, and loaded once per process. Work is split into
runs of whole blocks on `torch.get_num_threads()` OpenMP threads (the build falls back to one thread
when the compiler has no OpenMP); ctypes releases the GIL.

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
import threading
from pathlib import Path

import torch

from ..codes import bucket_bounds, code4, dynamic_map

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("qlora_cpu.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
_OPENMP = ["-fopenmp"]
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
    errors = []
    for extra in (_OPENMP, []):  # without OpenMP the pragmas are ignored: one thread, same results
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            partial = Path(tmp) / target.name
            cmd = [compiler, *_FLAGS, *extra, str(_SOURCE), "-o", str(partial)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(partial, target)  # atomic: concurrent builders never see a partial file
                return target
            errors.append(f"{' '.join(cmd)}:\n{result.stderr.strip()}")
    raise RuntimeError("building the native kernel failed:\n" + "\n".join(errors))


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
    lib.qc_dequantize_parallel.argtypes = [p, p, p, ctypes.c_float, p, p, p, i32, i64, i64, i32]
    lib.qc_dequantize_parallel.restype = None
    lib.qc_quantize_parallel.argtypes = [p, i32, p, p, p, p, i64, i64, i32]
    lib.qc_quantize_parallel.restype = i32
    return lib


def available() -> bool:
    """True when the native kernel is built and loaded (it is then the CPU path)."""
    return _library() is not None


def _threads(n: int) -> int:
    return max(1, torch.get_num_threads()) if n >= _MIN_PARALLEL else 1


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


_FRESH_MMAP_BYTES = 32 << 20  # glibc serves requests this large from a fresh mmap, always


def empty_large(n: int, dtype: torch.dtype, min_bytes: int = _FRESH_MMAP_BYTES) -> torch.Tensor:
    """`torch.empty(n)`, asking Linux to back its interior with transparent huge pages.

    A fresh multi-MB CPU tensor is a fresh mmap whose first touch page-faults every 4 KB; that
    fault cost is 3x the dequantization itself. Smaller requests usually reuse heap memory, where
    the hint would only add fault latency. MADV_HUGEPAGE is a hint: where THP is off, nothing
    changes.
    """
    out = torch.empty(n, dtype=dtype)
    madvise = _madvise()
    if madvise is not None and out.nbytes >= max(min_bytes, 2 * _HUGE_PAGE):
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
    nonfinite = lib.qc_quantize_parallel(*args, absmax.data_ptr(), blocksize, n, _threads(n))
    return packed, absmax, bool(nonfinite)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    quant_type: str,
    blocksize: int,
    n: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat (n,) dequantized weight (into `out` when given); decodes double-quantized absmax inline."""
    lib = _library()
    assert lib is not None and packed.device.type == "cpu"
    packed = packed.contiguous()
    if nested_absmax is None:
        absmax, nested_ptr, off = absmax.contiguous().float(), None, 0.0
    else:
        absmax, nested_absmax = absmax.contiguous(), nested_absmax.contiguous().float()
        nested_ptr, off = nested_absmax.data_ptr(), float(offset)
    if out is None:
        out = empty_large(n, dtype)
    assert out.is_contiguous() and out.numel() >= n and out.dtype == dtype
    code, code8 = code4(quant_type), dynamic_map()
    args = (packed.data_ptr(), absmax.data_ptr(), nested_ptr, off, code8.data_ptr(), code.data_ptr())
    lib.qc_dequantize_parallel(*args, out.data_ptr(), _KINDS[dtype], blocksize, n, _threads(n))
    return out


_workspaces = threading.local()


def workspace(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch buffer of at least n elements, reused across calls.

    The linear ops dequantize into it and drop it at once; reuse spares a page-faulting fresh
    allocation per call (measured: 0.6 ms of dequantization became 3-15 ms with fresh pages).
    It costs one buffer the size of the largest dense weight seen, per thread and dtype.
    """
    buffers = getattr(_workspaces, "buffers", None)
    if buffers is None:
        buffers = _workspaces.buffers = {}
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < n:
        buf = buffers[dtype] = empty_large(n, dtype, min_bytes=0)
    return buf[:n]
