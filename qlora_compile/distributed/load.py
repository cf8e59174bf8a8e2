"""Rank-sliced loading: a model that `load_quantized(path, device="meta")` built is filled, after
`fully_shard`, with only this rank's rows of each sharded tensor (safetensors slices), never the
whole model per rank.

    model = qlora_compile.load_quantized(path, device="meta")   # headers and 4-bit statistics only
    qlora_compile.compile(model, distributed=True, ...)         # LoRA made on meta too
    qlora_compile.distributed.shard(model)                      # fully_shard, then each rank reads its rows

FSDP2 splits dim 0 as `torch.chunk` does: rank r holds rows [r*c, min((r+1)*c, n)) with
c = ceil(n / world). Each rank reads exactly those rows of the file's tensor (the 4-bit packed bytes
are stored (n/2, 1), so rows are bytes). Replicated tensors (buffers: nested absmax, offsets,
rotary tables) are read whole. The LoRA adapters are created whole on every rank, in compile's
order from the same seed (what one process draws), and each rank keeps its rows.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..checkpoint.model_folder import ModelFolder, read
from ..errors import UnsupportedError
from ..lora import LoRALayer, LoRALinear

logger = logging.getLogger(__name__)


def on_meta(model: nn.Module) -> bool:
    """Whether `model` was built by `load_quantized(..., device="meta")` and is not filled yet."""
    return getattr(model, "_qlora_meta_sources", None) is not None


def real_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Create the LoRA adapters compile made on meta, whole and on the CPU, in the order compile
    creates them (4-bit layers, then the linears kept dense): the values one process draws.
    Returns every trainable tensor by name (copies, to slice after sharding)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALayer) and not isinstance(m, LoRALinear)]
    layers += [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        old = layer.lora_A.weight
        if old.device.type == "meta":
            layer._new_adapters(layer.r, torch.device("cpu"), old.dtype)
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.requires_grad_(old.requires_grad)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    on = [n for n, t in trainable.items() if t.device.type == "meta"]
    if on:
        raise UnsupportedError(f"trainable tensors on meta that shard() cannot initialize: {on[:3]}")
    return trainable


def fill_from_folder(
    model: nn.Module, adapters: dict[str, torch.Tensor], device: torch.device
) -> dict[str, int]:
    """Materialize a sharded meta model on `device`: every rank reads its rows of each sharded tensor
    from the folder `load_quantized` read the headers of, replicated ones whole; trainable tensors
    from `adapters`. Returns the bytes read: {"sharded": ..., "replicated": ...}."""
    sources, folder = model._qlora_meta_sources, ModelFolder(model._qlora_meta_folder)
    real = {
        n: b.detach().clone() for n, b in model.named_buffers() if b is not None and b.device.type != "meta"
    }
    model.to_empty(device=device)  # every tensor, the real buffers too: those are put back
    counts = {"sharded": 0, "replicated": 0}
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name in real:
                t.copy_(real[name])
            elif name in adapters:
                _local(t).copy_(_rows_of(adapters[name], t))
            elif name in sources:
                info = folder.infos[sources[name]]
                start, stop = _row_range(t)
                part = read(info) if start is None else read(info, start, stop)
                _local(t).copy_(part.reshape(_local(t).shape))
                counts["replicated" if start is None else "sharded"] += part.numel() * part.element_size()
            else:
                raise UnsupportedError(f"{name}: not in the folder {folder.path}, nothing to fill it with")
    del model._qlora_meta_sources, model._qlora_meta_folder
    logger.info("read %s bytes of sharded tensors, %s replicated", counts["sharded"], counts["replicated"])
    return counts


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _row_range(t: torch.Tensor) -> tuple[int | None, int | None]:
    """This rank's rows [start, stop) of a dim-0-sharded DTensor (torch.chunk's split over the
    mesh dimension that shards it; any other dimension replicates); (None, None) for a tensor
    this rank holds whole."""
    if not hasattr(t, "device_mesh"):
        return None, None
    from torch.distributed.tensor import Replicate, Shard

    dims = [i for i, p in enumerate(t.placements) if isinstance(p, Shard)]
    if any(not isinstance(p, (Shard, Replicate)) for p in t.placements) or len(dims) > 1:
        raise UnsupportedError(f"placements {t.placements}: only one Shard(0) (FSDP2, HSDP) is read by rows")
    if not dims or t.device_mesh.size(dims[0]) == 1:
        return None, None
    if t.placements[dims[0]].dim != 0:
        raise UnsupportedError(f"placements {t.placements}: only dim-0 shards are read by rows")
    mesh, n = t.device_mesh, t.shape[0]
    per = -(-n // mesh.size(dims[0]))
    start = min(mesh.get_local_rank(dims[0]) * per, n)
    stop = min(start + per, n)
    assert stop - start == _local(t).shape[0], (t.shape, start, stop, _local(t).shape)
    return start, stop


def _rows_of(full: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    start, stop = _row_range(t)
    return full if start is None else full[start:stop]
