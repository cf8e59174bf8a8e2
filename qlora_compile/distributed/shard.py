"""`shard(model)`: QLoRA across processes on PyTorch's own FSDP2 (`fully_shard`), 4-bit storage included.

The order of calls, in every process that `torchrun` starts:

    torch.distributed.init_process_group()                         # gloo on CPU, nccl on GPUs
    model = qlora_compile.compile(model, distributed=True, ...)    # 4-bit + LoRA, not compiled yet
    qlora_compile.distributed.shard(model)                         # fully_shard, then torch.compile
    ... model(**batch).loss.backward(); model.qlora.step() ...    # each rank its own batch

What `shard` does:
1. The 4-bit storage becomes frozen parameters: FSDP2 shards parameters, never buffers, so the
   packed bytes (uint8, (n/2, 1)) and the double-quantized absmax codes (uint8, (n_blocks,)) are
   turned into `nn.Parameter(requires_grad=False)` and shard along dim 0: each rank holds about
   1/world of them. The small fp32 statistics (nested absmax, offset, and a plain fp32 absmax
   without double quantization) stay buffers, replicated: a mixed-precision policy would cast
   float parameters, which changes the dequantized weight. Integer parameters are never cast.
2. `fully_shard` on each repeated block (`pipeline.repeated_blocks`: the decoder layers), then on
   the root (embeddings, final norm, head).
3. Each block compiled with our backend (`pipeline.compile_blocks`: one graph serves every layer),
   after `fully_shard`: FSDP's hooks run outside the compiled region, so no graph break; Dynamo
   over the whole sharded model would break at each of them.

The LoRA parameters are sharded too: `model.qlora.optimizer` (`PagedAdamW`) steps on each rank's
local shard, and `model.qlora.step()` clips by the global gradient norm (DTensor gradients).
FSDP2 averages gradients over ranks, so each rank's loss is the mean over its own batch and the
update is that of one process on the union of the batches (equal batch sizes).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import pipeline
from ..errors import InvalidArgumentError, UnsupportedError
from ..loss import fuse_causal_lm_loss
from ..modules import QuantizedLinear
from . import load

logger = logging.getLogger(__name__)

# Storage buffers that shard: the bulk of the 4-bit bytes. Anything floating stays a buffer.
_SHARDED_STORAGE = ("weight_packed", "weight_absmax")


def shard(
    model: nn.Module,
    mesh=None,
    *,
    mixed_precision=None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard a model that `qlora_compile.compile(model, distributed=True)` prepared, in place
    (returns it): 4-bit storage and LoRA split over the ranks of `mesh`, blocks compiled.

    A model built by `load_quantized(path, device="meta")` is filled here, after `fully_shard`:
    each rank reads only its rows of each sharded tensor from the folder (`distributed/load.py`);
    `model.qlora.bytes_read` says how many bytes.

    Args:
        model: the model, as `compile(..., distributed=True)` returned it, before its first forward.
        mesh: a `DeviceMesh`; None: all ranks of the default process group. A 2-D mesh
            (replicate, shard) gives FSDP2's HSDP (`replicate` builds one).
        mixed_precision: a `torch.distributed.fsdp.MixedPrecisionPolicy` (None: parameters
            computed in their own dtypes, as one process does). Integer (4-bit) storage is never cast.
        cpu_offload: keep the sharded parameters (and gradients) in host memory
            (`CPUOffloadPolicy`); all-gathers bring each block to the device for its forward.
        reshard_after_forward: free each block's gathered parameters after its forward (and gather
            them again in backward): less memory, one more all-gather per block.

    Raises:
        InvalidArgumentError: not prepared by `compile(..., distributed=True)`, already sharded,
            or no process group.
        UnsupportedError: a model without repeated blocks, or `step_in_backward` (FSDP2 gives
            gradients after its reduce-scatter, not by accumulation hooks).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    handle = _check_shardable(model, cpu_offload)
    blocks = pipeline.repeated_blocks(model)
    if not blocks:
        raise UnsupportedError(
            f"{type(model).__name__} has no repeated blocks (an nn.ModuleList of layers) to shard one by one"
        )
    adapters = load.real_adapters(model) if load.on_meta(model) else None  # before sharding: whole
    moved = storage_to_parameters(model)
    logger.info("sharding %d blocks; %d storage tensors made frozen parameters", len(blocks), moved)
    options = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mixed_precision or MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    handle.mesh = next(model.parameters()).device_mesh
    if adapters is not None:  # built on meta: each rank reads its rows now
        handle.bytes_read = load.fill_from_folder(model, adapters, _device(handle.mesh))
    handle.reset_optimizer()  # fully_shard replaced every parameter by a sharded one
    report = handle.report()
    report.compiled_blocks = pipeline.compile_model(
        model, handle.backend, "layers", dynamic=handle.config.dynamic
    )
    # the fused head and loss run inside the root's forward, where FSDP2 holds the head gathered
    # (it does not reshard the root after its forward)
    report.fused_loss = pipeline.fused_loss_applies(model, handle.config) and fuse_causal_lm_loss(model)
    handle.backend = None
    return model


def replicate(model: nn.Module, *, mixed_precision=None, cpu_offload: bool = False) -> nn.Module:
    """DDP's layout on FSDP2: every rank holds the whole 4-bit base and LoRA, and LoRA gradients
    are averaged over ranks (all-reduce). `shard` over a 2-D mesh (world, 1): replicated over
    its first dimension, "sharded" over a group of one rank (FSDP2's HSDP with no sharding).
    For models whose 4-bit weights fit on each device: no all-gather of the base per block.
    Arguments and errors as `shard`'s."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    _check_shardable(model, cpu_offload)
    backend = dist.get_backend()
    device_type = "cpu" if backend == "gloo" else torch.accelerator.current_accelerator().type
    mesh = init_device_mesh(device_type, (dist.get_world_size(), 1), mesh_dim_names=("replicate", "shard"))
    return shard(model, mesh, mixed_precision=mixed_precision, cpu_offload=cpu_offload)


def _check_shardable(model: nn.Module, cpu_offload: bool = False):
    import torch.distributed as dist

    handle = getattr(model, "qlora", None)
    if handle is None or handle.backend is None:
        sharded = handle is not None and handle.mesh is not None
        raise InvalidArgumentError(
            "model is already sharded"
            if sharded
            else "shard() takes a model prepared by qlora_compile.compile(model, distributed=True), "
            "which leaves torch.compile to shard() (compiling before fully_shard breaks the graph at FSDP's hooks)"
        )
    if handle.config.compile_scope != "layers":
        raise UnsupportedError(
            f"compile_scope={handle.config.compile_scope!r}: a sharded model is compiled block by block "
            "(compile_scope='layers'); Dynamo over the whole sharded model breaks at each of FSDP's hooks"
        )
    if handle.config.step_in_backward:
        raise UnsupportedError(
            "step_in_backward with shard(): FSDP2 hands each rank its gradient shard after the "
            "reduce-scatter, not through accumulation hooks; step with model.qlora.step()"
        )
    if cpu_offload and not torch.accelerator.is_available():
        raise UnsupportedError(
            "cpu_offload=True without an accelerator: the parameters are in host memory already "
            "(FSDP2 would pin host memory for copies to a device there is none of)"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError(
            "no process group: call torch.distributed.init_process_group() first (torchrun sets "
            "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for it)"
        )
    return handle


def _device(mesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())


def storage_to_parameters(model: nn.Module) -> int:
    """Turn each 4-bit linear's integer storage buffers (packed bytes, absmax codes) into frozen
    parameters of the same name, in place, so `fully_shard` shards them along dim 0. Names,
    `state_dict` keys and the forward are unchanged. Returns how many tensors were moved."""
    moved = 0
    for module in model.modules():
        if not isinstance(module, QuantizedLinear):  # 4-bit experts stay replicated buffers (untested)
            continue
        for name in _SHARDED_STORAGE:
            t = module._buffers.get(name)
            if t is None or t.is_floating_point() or t.dim() == 0:
                continue
            del module._buffers[name]
            module._non_persistent_buffers_set.discard(name)
            module.register_parameter(name, nn.Parameter(t, requires_grad=False))
            moved += 1
    return moved


def storage_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of 4-bit storage this rank holds, bytes of the whole model's): the packed bytes and
    absmax codes, sharded or not, of every 4-bit layer."""
    local = total = 0
    for module in model.modules():
        for name in _SHARDED_STORAGE:
            t = getattr(module, name, None) if name in module._parameters or name in module._buffers else None
            if t is None:
                continue
            total += t.numel() * t.element_size()
            part = t.to_local() if hasattr(t, "to_local") else t
            local += part.numel() * part.element_size()
    return local, total


def gathered_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, gathered whole (`full_tensor`) on every rank: {name: tensor}.
    A collective: all ranks must call it."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
