"""Training checkpoints through `torch.distributed.checkpoint` (DCP): `model.qlora.save_checkpoint(dir)`
and `load_checkpoint(dir)`, on every rank of a sharded model (or in one process).

What a checkpoint holds: the trainable parameters (LoRA, modules_to_save) as
`get_model_state_dict` gives them (DTensors on a sharded model, each rank writing its shard), the
`PagedAdamW` states keyed by parameter name, the optimizer step, and each rank's RNG state. The
4-bit base is not in it: it is the model folder's, frozen. A resume at the same world size is
bit-identical; 32-bit states reshard to another world size (RNG states are then left as they are).

The optimizer states go through DCP directly, not `get_optimizer_state_dict`: that one initializes
an optimizer whose `optimizer.state` is empty by stepping it with lr 0, and PagedAdamW keeps its
states in its own pages, so the step would move them. The 8-bit states' absmax (one per
256-element block of each rank's shard) is padded to the largest rank's count and saved as a
Shard(0) DTensor: those load at the same world size only (other shards have other blocks).

The folder is written under `<dir>.partial` and renamed to `dir` by rank 0 once every rank's
files and DCP's metadata are complete: a run killed while saving leaves the previous checkpoint.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.output_folder import _replace_folder
from ..errors import InvalidFolderError, MissingFileError, UnsupportedError

logger = logging.getLogger(__name__)


def save_checkpoint(model: nn.Module, directory: str | Path) -> Path:
    """Write `model`'s training state to `directory` (replacing an older checkpoint there).
    Every rank must call it."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    dcp.save(_state(model, for_load=False), checkpoint_id=str(partial), no_dist=_world_of_one())
    if _rank() == 0:  # dcp.save returns on every rank once the coordinator wrote the metadata
        _replace_folder(partial, directory)
    _barrier()
    return directory


def load_checkpoint(model: nn.Module, directory: str | Path) -> int:
    """Restore what `save_checkpoint` wrote into `model` (compiled, and sharded as it was when
    saved, or at another world size); returns the optimizer step it was saved at. Every rank
    must call it.

    Raises:
        MissingFileError: no checkpoint in `directory`.
        UnsupportedError: 8-bit optimizer states saved at another world size.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise MissingFileError(f"no checkpoint in {directory} (DCP's .metadata is missing)")
    meta = {"step": torch.tensor(0), "world_size": torch.tensor(0)}
    dcp.load({"meta": meta}, checkpoint_id=str(directory), no_dist=_world_of_one())
    same_world = int(meta["world_size"]) == _world()
    state = _state(model, for_load=True, rng=same_world)
    if not same_world and model.qlora.optimizer.optim_bits == 8:
        raise UnsupportedError(
            f"8-bit optimizer states saved on {int(meta['world_size'])} ranks load on as many only, "
            f"not {_world()}: their 256-element blocks run along each rank's shard"
        )
    try:
        dcp.load(state, checkpoint_id=str(directory), no_dist=_world_of_one())
    except RuntimeError as e:  # DCP reports a key the model has and the checkpoint lacks this way
        raise InvalidFolderError(f"{directory} does not fit this model: {e}") from e
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    _load_optimizer(model, state["optim"])
    if same_world:
        torch.set_rng_state(state["rng"][f"rank{_rank()}"])
    else:
        logger.warning(
            "checkpoint saved on %d ranks, loaded on %d: RNG states not restored",
            int(meta["world_size"]),
            _world(),
        )
    return int(meta["step"])


def _state(model: nn.Module, *, for_load: bool, rng: bool = True) -> dict:
    """What DCP writes (for_load=False) or fills in place (for_load=True: zeros of the same layout)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    handle = model.qlora
    names = _trainable_names(model)
    model_state = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    optimizer = handle.optimizer
    optim = optimizer.empty_state_dict() if for_load else optimizer.state_dict()
    params = optimizer._params()
    steps = [int(e["step"]) for e in optim["state"].values()]
    state = {
        "model": {k: v for k, v in model_state.items() if k in set(names)},  # no buffers: frozen
        "optim": {
            "state": {names[i]: _padded_absmax(e, params[i], handle.mesh) for i, e in optim["state"].items()},
            "param_groups": optim["param_groups"],
        },
        "meta": {"step": torch.tensor(max(steps, default=0)), "world_size": torch.tensor(_world())},
    }
    if rng:  # per rank: each rank draws its own numbers
        state["rng"] = {f"rank{_rank()}": torch.get_rng_state()}
    return state


def _load_optimizer(model: nn.Module, optim: dict) -> None:
    optimizer = model.qlora.optimizer
    names = _trainable_names(model)
    params = optimizer._params()
    state = {i: _own_absmax(optim["state"][n], params[i]) for i, n in enumerate(names) if n in optim["state"]}
    optimizer.load_state_dict({"state": state, "param_groups": optim["param_groups"]})


def _trainable_names(model: nn.Module) -> list[str]:
    """Names of the optimizer's parameters, in its order (`QLoRAHandle.trainable_parameters`)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _padded_absmax(entry: dict, param: torch.Tensor, mesh) -> dict:
    """8-bit states' per-rank absmax as a DTensor placed as `param` (Shard(0) where it is sharded),
    each rank's part padded to the largest rank's block count (FSDP2 gives the first ranks the
    larger shards)."""
    if mesh is None or not hasattr(param, "to_local"):
        return entry
    from torch.distributed.tensor import DTensor, Shard

    shards = math.prod(mesh.size(i) for i, p in enumerate(param.placements) if isinstance(p, Shard))
    rows = -(-param.shape[0] // shards)
    most = -(-(rows * (param.numel() // max(param.shape[0], 1))) // 256)
    out = dict(entry)
    for key, t in entry.items():
        if "absmax" in key:
            padded = torch.zeros(most, dtype=t.dtype)
            padded[: t.numel()] = t
            out[key] = DTensor.from_local(
                padded, mesh, param.placements, run_check=False, shape=(most * shards,), stride=(1,)
            )
    return out


def _own_absmax(entry: dict, param: torch.Tensor) -> dict:
    """`_padded_absmax` undone: this rank's absmax blocks."""
    out = dict(entry)
    local = param.to_local().numel() if hasattr(param, "to_local") else param.numel()
    for key, t in entry.items():
        if "absmax" in key and hasattr(t, "to_local"):
            out[key] = t.to_local()[: -(-local // 256)]
    return out


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _world_of_one() -> bool:
    """No process group: DCP then reads and writes in this process alone (said, not guessed)."""
    return not (dist.is_available() and dist.is_initialized())
