"""`PagedAdamW` / `PagedAdamW8bit`: AdamW whose states live in fixed-size pages.

Numerics:
- 32-bit states: the update of `torch.optim.AdamW(foreach=False)`, op for op (decoupled weight
  decay, `lerp_` for the first moment, `(sqrt(v) / sqrt(1 - beta2^t)) + eps`), in fp32.
- 8-bit states (`optim_bits=8`): bitsandbytes' blockwise scheme: blocks of 256 elements, the
  signed dynamic map for the first moment and the unsigned one for the second, each step
  dequantizes, updates in fp32 as bitsandbytes' CPU kernel does, and quantizes again
  (`quant8.py`). Tensors with fewer than `min_8bit_size` (4096) elements keep 32-bit states, as
  in bitsandbytes.

State bytes (`state_nbytes()`): 8 per element for 32-bit states; for 8-bit states 2 per element
plus one fp32 absmax per 256-element block per state (`2 * 4 * ceil(n / 256)`).

Paging: each parameter's state is cut into pages of `page_elements` elements (a multiple of 256,
so quantization blocks never straddle pages). The update runs page by page, the same way whether
paged or not, so paged and unpaged runs are bit-identical. With `device_budget=None` every state
stays on the parameters' device. With a budget, a `Pager` keeps at most that many bytes there;
states of tensors under `resident_below` (1e5) elements stay resident while they take at most
half the budget.

Sharded parameters (FSDP2's DTensors, `qlora_compile.distributed`): each rank keeps states for
its local shard only and steps it on its local gradient shard; `state_dict` gives the states as
DTensors placed as their parameters, which `torch.distributed.checkpoint` saves shard by shard.
Whether a tensor gets 8-bit states depends on its whole size, as in one process; its 256-element
blocks run along the local shard, so they are one process's blocks when each shard holds a whole
number of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .pager import Pager

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None
from .quant8 import BLOCK, dequantize_blockwise, quantize_blockwise

_STATE_KEYS = {
    32: ("exp_avg", "exp_avg_sq"),
    8: ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax"),
}


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (under no_grad: the tensor itself, writes reach the parameter);
    any other tensor as it is."""
    return t.to_local() if _is_dtensor(t) else t


def _is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _placed_like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` (this rank's part of a state shaped as `p`) as a DTensor placed as `p`, if it is one."""
    if not _is_dtensor(p):
        return local.view(p.shape)
    return DTensor.from_local(
        local.view(_local(p).shape),
        p.device_mesh,
        p.placements,
        run_check=False,
        shape=p.shape,
        stride=p.stride(),
    )


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit states (bitsandbytes' min_8bit_size)
RESIDENT_BELOW = 100_000  # states of smaller tensors stay on the device (bitsandbytes: 1e5)


def state_nbytes_for(numel: int, optim_bits: int, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of AdamW states for a tensor of `numel` elements (the memory planner's formula)."""
    if optim_bits == 8 and numel >= min_8bit_size:
        return 2 * numel + 2 * 4 * _blocks(numel)
    return 8 * numel


@dataclass
class _ParamState:
    """Where one parameter's states live, page by page."""

    param: torch.Tensor
    bits: int
    chunks: list[tuple[int, int]]  # element ranges [start, stop)
    offsets: list[int] = field(default_factory=list)  # byte offset of each chunk (resident)
    buffer: torch.Tensor | None = None  # resident bytes, or None when paged
    pages: list[int] = field(default_factory=list)  # pager page ids when paged
    step: int = 0

    @property
    def numel(self) -> int:
        return _local(self.param).numel()


def _chunk_nbytes(bits: int, k: int) -> int:
    return 8 * k if bits == 32 else 2 * k + 8 * _blocks(k)


def _fields(buf: torch.Tensor, bits: int, k: int) -> tuple[torch.Tensor, ...]:
    """Views of one chunk's states in its bytes: (m, v) fp32, or (am1, am2 fp32, qm, qv uint8)."""
    if bits == 32:
        return buf[: 4 * k].view(torch.float32), buf[4 * k : 8 * k].view(torch.float32)
    b = _blocks(k)
    return (
        buf[: 4 * b].view(torch.float32),
        buf[4 * b : 8 * b].view(torch.float32),
        buf[8 * b : 8 * b + k],
        buf[8 * b + k : 8 * b + 2 * k],
    )


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with paged 32-bit or 8-bit states.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr, betas, eps, weight_decay: as `torch.optim.AdamW` (weight_decay defaults to 0, as QLoRA).
        optim_bits: 32 (fp32 states) or 8 (blockwise 8-bit states, bitsandbytes' AdamW8bit).
        device_budget: most bytes of state on the parameters' device; the rest lives in host
            memory (CUDA: pinned; CPU: a memory-mapped temporary file in `page_dir`). None keeps
            every state on the device.
        page_elements: elements per page (a positive multiple of 256).
        min_8bit_size: tensors with fewer elements keep 32-bit states (bitsandbytes: 4096).
        resident_below: with a budget, tensors with fewer elements keep their states on the device
            (bitsandbytes: 1e5) while these take at most half the budget.
        page_dir: directory of the CPU page file (default: the system's temporary directory).
        fused: update 32-bit states with torch's fused AdamW kernel (`torch._fused_adamw_`), page by
            page: about 3x faster on CPU, but not bit-identical to `AdamW(foreach=False)` (a few
            ulps per step); paged and unpaged runs stay bit-identical.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        optim_bits: int = 32,
        device_budget: int | None = None,
        *,
        page_elements: int = 2**18,
        min_8bit_size: int = MIN_8BIT_SIZE,
        resident_below: int = RESIDENT_BELOW,
        page_dir: str | None = None,
        fused: bool = False,
    ):
        _check_hyper(lr, betas, eps, weight_decay)
        if optim_bits not in (8, 32) or isinstance(optim_bits, bool):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits!r}")
        if device_budget is not None and (isinstance(device_budget, bool) or not device_budget > 0):
            raise ValueError(
                f"device_budget must be a positive number of bytes or None, got {device_budget!r}"
            )
        if not isinstance(page_elements, int) or page_elements <= 0 or page_elements % BLOCK:
            raise ValueError(f"page_elements must be a positive multiple of {BLOCK}, got {page_elements!r}")
        self.optim_bits = optim_bits
        self.device_budget = None if device_budget is None else int(device_budget)
        self.page_elements = page_elements
        self.min_8bit_size = int(min_8bit_size)
        self.resident_below = int(resident_below)
        self.page_dir = page_dir
        self.fused = bool(fused)
        self.pager: Pager | None = None
        self._records: dict[torch.Tensor, _ParamState] | None = None
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    # -- setup ---------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if self._records is not None:
            raise RuntimeError("PagedAdamW: add parameter groups before the first step")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        group["betas"] = tuple(group["betas"])
        for p in group["params"]:
            if not p.is_floating_point() or p.is_complex():
                raise TypeError(f"PagedAdamW needs real floating-point parameters, got {p.dtype}")
            if p.is_sparse:
                raise TypeError("PagedAdamW does not support sparse parameters")

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _bits(self, numel: int) -> int:
        return 8 if self.optim_bits == 8 and numel >= self.min_8bit_size else 32

    def _layout(self) -> dict[torch.Tensor, _ParamState]:
        """Allocate every state (zeros): resident buffers, or pages in a Pager."""
        if self._records is not None:
            return self._records
        params = self._params()
        devices = {p.device for p in params}
        if self.device_budget is not None and len(devices) > 1:
            raise ValueError(
                f"a paged PagedAdamW needs parameters on one device, got {sorted(map(str, devices))}"
            )
        pe = self.page_elements
        records = {}
        for p in params:
            n = _local(p).numel()
            chunks = [(s, min(s + pe, n)) for s in range(0, n, pe)]
            records[p] = _ParamState(p, self._bits(p.numel()), chunks)  # sharded: by its whole size
        resident = list(params)
        if self.device_budget is not None:
            self.pager = Pager(next(iter(devices)), self.device_budget, self.page_dir)
            small = [p for p in params if _local(p).numel() < self.resident_below]
            small_bytes = sum(self._nbytes(records[p]) for p in small)
            resident = small if small_bytes <= self.device_budget // 2 else []
            kept = {id(p) for p in resident}
            for p in params:
                if id(p) not in kept:
                    rec = records[p]
                    rec.pages = [self.pager.add_page(_chunk_nbytes(rec.bits, b - a)) for a, b in rec.chunks]
        for p in resident:
            rec = records[p]
            offsets, total = [], 0
            for a, b in rec.chunks:
                offsets.append(total)
                total += _chunk_nbytes(rec.bits, b - a)
            rec.offsets = offsets
            rec.buffer = torch.zeros(total, dtype=torch.uint8, device=p.device)
            if self.pager is not None:
                self.pager.add_resident(total)
        if self.pager is not None:
            self.pager.allocate()
        self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        self._records = records
        return records

    @staticmethod
    def _nbytes(rec: _ParamState) -> int:
        return sum(_chunk_nbytes(rec.bits, b - a) for a, b in rec.chunks)

    def state_nbytes(self) -> int:
        """Total bytes of optimizer state (all parameters, resident or paged out)."""
        return sum(state_nbytes_for(_local(p).numel(), self._bits(p.numel()), 0) for p in self._params())

    # -- chunks --------------------------------------------------------------------------------
    def _chunk(self, rec: _ParamState, i: int) -> torch.Tensor:
        if rec.buffer is not None:
            a, b = rec.chunks[i]
            start = rec.offsets[i]
            return rec.buffer[start : start + _chunk_nbytes(rec.bits, b - a)]
        return self.pager.get(rec.pages[i])

    def _written(self, rec: _ParamState, i: int) -> None:
        if rec.buffer is None:
            self.pager.mark_dirty(rec.pages[i])

    def _prefetch(self, rec: _ParamState, i: int) -> None:
        if rec.buffer is None and self.pager is not None:
            self.pager.prefetch(rec.pages[i])

    # -- the update ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        records = self._layout()
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    work.append((group, records[p]))
        for j, (group, rec) in enumerate(work):
            following = work[j + 1][1] if j + 1 < len(work) else None
            self._step_one(group, rec, following)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Step one parameter alone (used by step-in-backward hooks)."""
        records = self._layout()
        if p.grad is None:
            return
        if id(p) not in self._group_of:
            raise KeyError("parameter is not in this optimizer")
        self._step_one(self._group_of[id(p)], records[p], None)

    def _step_one(self, group: dict, rec: _ParamState, following: _ParamState | None) -> None:
        p = _local(rec.param)
        grad = _local(rec.param.grad)
        if grad.is_sparse:
            raise RuntimeError("PagedAdamW does not support sparse gradients")
        if grad.shape != p.shape:
            raise RuntimeError(
                f"gradient shape {tuple(grad.shape)} does not match parameter {tuple(p.shape)}"
            )
        rec.step += 1
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        contiguous = p.is_contiguous()
        data = p.data if contiguous else p.data.contiguous()
        flat = data.view(-1)
        gflat = grad.reshape(-1)
        for i, (a, b) in enumerate(rec.chunks):
            buf = self._chunk(rec, i)
            if i + 1 < len(rec.chunks):
                self._prefetch(rec, i + 1)
            elif following is not None:
                self._prefetch(following, 0)
            pc = flat[a:b]
            pf = pc if pc.dtype == torch.float32 else pc.float()
            g = gflat[a:b]
            g = g if g.dtype == torch.float32 else g.float()
            if rec.bits == 32:
                step = _adamw32_fused if self.fused else _adamw32
                step(pf, g, *_fields(buf, 32, b - a), rec.step, lr, beta1, beta2, eps, wd)
            else:
                _adamw8(pf, g, *_fields(buf, 8, b - a), rec.step, lr, beta1, beta2, eps, wd)
            if pf is not pc:
                pc.copy_(pf)
            self._written(rec, i)
        if not contiguous:
            p.data.copy_(data)

    # -- checkpoints ---------------------------------------------------------------------------
    @torch.no_grad()
    def state_dict(self) -> dict:
        """torch's layout: {"state": {index: {...}}, "param_groups": [...]}; state tensors on CPU.

        32-bit states: `step`, `exp_avg`, `exp_avg_sq` (param-shaped fp32, as torch.optim.AdamW).
        8-bit states: `step`, `exp_avg_codes`, `exp_avg_sq_codes` (param-shaped uint8),
        `exp_avg_absmax`, `exp_avg_sq_absmax` (fp32 per 256-element block). Independent of paging.
        """
        records = self._layout()
        if self.pager is not None:
            self.pager.flush()
        state = {}
        for index, p in enumerate(self._params()):
            rec = records[p]
            if rec.step == 0:
                continue
            parts = [[] for _ in _STATE_KEYS[rec.bits]]
            for i, (a, b) in enumerate(rec.chunks):
                if rec.buffer is not None:
                    buf = self._chunk(rec, i)
                else:
                    buf = self.pager.host_view(rec.pages[i])
                views = _fields(buf, rec.bits, b - a)
                if rec.bits == 8:
                    views = (views[2], views[3], views[0], views[1])
                for part, view in zip(parts, views, strict=True):
                    part.append(view.to("cpu", copy=True))
                if rec.buffer is None:
                    self.pager.drop_host(rec.pages[i])
            entry = {"step": torch.tensor(float(rec.step))}
            for key, part in zip(_STATE_KEYS[rec.bits], parts, strict=True):
                t = torch.cat(part)
                entry[key] = _placed_like(p, t) if "absmax" not in key else t
            state[index] = entry
        groups, index = [], 0
        for group in self.param_groups:
            g = {k: v for k, v in group.items() if k != "params"}
            g["params"] = list(range(index, index + len(group["params"])))
            index += len(group["params"])
            groups.append(g)
        groups[0]["qlora_optim"] = {"optim_bits": self.optim_bits, "min_8bit_size": self.min_8bit_size}
        return {"state": state, "param_groups": groups}

    def empty_state_dict(self) -> dict:
        """`state_dict`'s layout with zeros, every parameter included (stepped or not): what a
        loader that fills tensors in place (`torch.distributed.checkpoint.load`) loads into."""
        state = {}
        for index, (p, rec) in enumerate(self._layout().items()):
            entry = {"step": torch.tensor(0.0)}
            for key in _STATE_KEYS[rec.bits]:
                if "absmax" in key:
                    entry[key] = torch.zeros(_blocks(rec.numel), dtype=torch.float32)
                else:
                    dtype = torch.float32 if rec.bits == 32 else torch.uint8
                    entry[key] = _placed_like(p, torch.zeros(rec.numel, dtype=dtype))
            state[index] = entry
        return {"state": state, "param_groups": self.state_dict()["param_groups"]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(groups)} parameter groups, the optimizer {len(self.param_groups)}"
            )
        saved = dict(groups[0].get("qlora_optim", {}))
        if saved and (saved["optim_bits"], saved["min_8bit_size"]) != (self.optim_bits, self.min_8bit_size):
            raise ValueError(
                f"state_dict was saved with optim_bits={saved['optim_bits']}, min_8bit_size="
                f"{saved['min_8bit_size']}; this optimizer has {self.optim_bits}, {self.min_8bit_size}"
            )
        for mine, theirs in zip(self.param_groups, groups, strict=True):
            if len(mine["params"]) != len(theirs["params"]):
                raise ValueError("state_dict parameter groups have other sizes than the optimizer's")
        params = self._params()
        records = self._layout()
        for mine, theirs in zip(self.param_groups, groups, strict=True):
            for k, v in theirs.items():
                if k not in ("params", "qlora_optim"):
                    mine[k] = tuple(v) if k == "betas" else v
        state = {int(k): v for k, v in state_dict["state"].items()}
        for index, p in enumerate(params):
            rec = records[p]
            entry = state.get(index)
            keys = _STATE_KEYS[rec.bits]
            if entry is None:
                full = [None] * len(keys)
                rec.step = 0
            else:
                missing = [k for k in keys if k not in entry]
                if missing:
                    raise ValueError(f"state of parameter {index} lacks {missing} (has {sorted(entry)})")
                full = [_local(entry[k]).reshape(-1) for k in keys]
                if full[0].numel() != rec.numel:
                    raise ValueError(
                        f"state of parameter {index} has {full[0].numel()} elements, the parameter {rec.numel}"
                    )
                rec.step = int(entry["step"])
            for i, (a, b) in enumerate(rec.chunks):
                data = torch.zeros(_chunk_nbytes(rec.bits, b - a), dtype=torch.uint8)
                if entry is not None:
                    views = _fields(data, rec.bits, b - a)
                    if rec.bits == 8:
                        views = (views[2], views[3], views[0], views[1])
                        ranges = [(a, b), (a, b), (a // BLOCK, -(-b // BLOCK)), (a // BLOCK, -(-b // BLOCK))]
                    else:
                        ranges = [(a, b), (a, b)]
                    for view, t, (s, e) in zip(views, full, ranges, strict=True):
                        view.copy_(t[s:e])
                if rec.buffer is not None:
                    self._chunk(rec, i).copy_(data)
                else:
                    self.pager.write(rec.pages[i], data)


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    if not isinstance(lr, (int, float)) or not lr >= 0 or math.isinf(lr):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if len(tuple(betas)) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


def _adamw32(p, g, m, v, step, lr, beta1, beta2, eps, wd) -> None:
    """torch.optim.AdamW's single-tensor update, op for op."""
    if wd != 0:
        p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
    p.addcdiv_(m, denom, value=-(lr / bias_correction1))


def _adamw32_fused(p, g, m, v, step, lr, beta1, beta2, eps, wd) -> None:
    """The same update through torch's fused kernel (one pass over the page)."""
    steps = [torch.tensor(float(step), device=p.device)]
    torch._fused_adamw_(
        [p],
        [g],
        [m],
        [v],
        [],
        steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=wd,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )


def _adamw8(p, g, am1, am2, qm, qv, step, lr, beta1, beta2, eps, wd) -> None:
    """bitsandbytes' 8-bit blockwise AdamW step (its CPU kernel's order of operations)."""
    m = dequantize_blockwise(qm, am1, signed=True)
    v = dequantize_blockwise(qv, am2, signed=False)
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    correction1 = 1 - beta1**step
    correction2 = math.sqrt(1 - beta2**step)
    denom = (v.sqrt() / correction2).add_(eps)
    if wd > 0:
        p.mul_(1 - lr * wd)
    p.addcdiv_(m, denom, value=-lr / correction1)
    quantize_blockwise(m, signed=True, codes=qm, absmax=am1)
    quantize_blockwise(v, signed=False, codes=qv, absmax=am2)


class PagedAdamW8bit(PagedAdamW):
    """`PagedAdamW` with 8-bit blockwise states (bitsandbytes' AdamW8bit numerics)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 2e-4,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        device_budget=None,
        **kwargs,
    ):
        kwargs.setdefault("optim_bits", 8)
        if kwargs["optim_bits"] != 8:
            raise ValueError("PagedAdamW8bit has optim_bits=8; use PagedAdamW for 32-bit states")
        super().__init__(params, lr, betas, eps, weight_decay, device_budget=device_budget, **kwargs)


# -- files ---------------------------------------------------------------------------------------
def save_optimizer(optimizer: PagedAdamW, path: str | Path) -> None:
    """`optimizer.state_dict()` to `path`: safetensors when it ends in .safetensors, else torch.save."""
    path = Path(path)
    sd = optimizer.state_dict()
    if path.suffix != ".safetensors":
        torch.save(sd, path)
        return
    from safetensors.torch import save_file

    tensors = {}
    steps = {}
    for index, entry in sd["state"].items():
        for key, t in entry.items():
            if key == "step":
                steps[str(index)] = float(t)
            else:
                tensors[f"state.{index}.{key}"] = t.contiguous()
    meta = {"param_groups": json.dumps(sd["param_groups"]), "steps": json.dumps(steps)}
    save_file(tensors, str(path), metadata=meta)


def load_optimizer(optimizer: PagedAdamW, path: str | Path) -> None:
    """Load what `save_optimizer` wrote into `optimizer` (paged or not)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        optimizer.load_state_dict(torch.load(path, weights_only=True))
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state: dict[int, dict] = {}
        for index, step in json.loads(meta["steps"]).items():
            state[int(index)] = {"step": torch.tensor(step)}
        for key in f.keys():
            _, index, name = key.split(".", 2)
            state[int(index)][name] = f.get_tensor(key)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
