"""Training checkpoints: everything a run needs to continue as if it had never stopped.

`<output_dir>/checkpoint-<step>/` is written under `checkpoint-<step>.partial` and renamed when
complete (`atomic_folder`), so a kill at any moment leaves whole checkpoints only:
- `adapter/`: the LoRA adapter in PEFT's format (`save_adapter`);
- `optimizer.safetensors`: `PagedAdamW`'s states (`save_optimizer`);
- `scheduler.pt`: the learning-rate scheduler's `state_dict`;
- `rng.pt`: Python's, NumPy's and torch's random states (CUDA's too when present);
- `trainer_state.json`: the step, the data position (epoch, next micro-batch, the order's seed and
  the dataset size), the evaluation before training and the metrics written so far;
- `run.json`: the config fields that decide the computation, the model's identity and the world
  size, which a resume must match.

On N ranks (`torchrun`) `dcp/` replaces `optimizer.safetensors`: the sharded LoRA weights,
optimizer states and step through `torch.distributed.checkpoint` (`model.qlora.save_checkpoint`);
`rng.pt` holds every rank's random states, `adapter/` the gathered adapter. Rank 0 writes the rest
and renames the folder once every rank's part is in. A checkpoint resumes on as many ranks as
wrote it (`check_matches`): `batch_size` is per rank, so the data order depends on the world size.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.output_folder import _replace_folder, atomic_folder
from ..errors import InvalidConfigError, InvalidFolderError, MissingFileError
from .ranks import SINGLE, Ranks

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE, RUN = "trainer_state.json", "run.json"
FILES = ("adapter", "optimizer.safetensors", "scheduler.pt", "rng.pt", STATE, RUN)
SHARDED_FILES = ("adapter", "dcp", "scheduler.pt", "rng.pt", STATE, RUN)


@dataclass
class TrainState:
    """Where a run is: after `step` optimizer steps, the next micro-batch is `batch` of `epoch`."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    data_seed: int = 0
    dataset_size: int = 0
    tokens: int = 0  # input tokens trained on so far
    eval_before: float | None = None
    first_loss: float | None = None
    pending: list[float] = field(default_factory=list)  # losses of steps not logged yet (log_every > 1)


# ---- identity ----------------------------------------------------------------------------------


def _sample_digest(path: Path, chunk: int = 1 << 16, samples: int = 8) -> str:
    """SHA-256 of `samples` evenly spaced `chunk`-byte pieces of a file (all of it when small): two
    different weight files of one size differ there in practice, and a 100 GB model costs
    milliseconds, not the minutes a full hash would take."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= chunk * samples:
            digest.update(f.read())
        else:
            for i in range(samples):
                f.seek((size - chunk) * i // (samples - 1))
                digest.update(f.read(chunk))
    return digest.hexdigest()


def model_identity(folder: str | Path) -> dict:
    """The model a run trains: config.json's hash and its weight files' names and sampled digests."""
    folder = Path(folder)
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    return {
        "config_sha256": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
        "weights": [[w.name, _sample_digest(w)] for w in weights],
    }


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def check_matches(checkpoint: Path, identity: dict, dataset_size: int) -> None:
    """Raise InvalidConfigError unless `checkpoint` was made by the same model, config, world size
    and data size (`identity`: {"config", "model", "world_size"})."""
    run = json.loads((checkpoint / RUN).read_text())
    config_identity, model = identity["config"], identity["model"]
    if run["model"] != model:
        raise InvalidConfigError(
            f"cannot resume from {checkpoint}: it was trained from another model (config.json or weights differ)"
        )
    diff = _differences(run["config"], config_identity)
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise InvalidConfigError(
            f"cannot resume from {checkpoint}: made with another config: {'; '.join(diff[:3])}{more}"
        )
    saved_world, world = run.get("world_size", 1), identity["world_size"]
    if saved_world != world:
        raise InvalidConfigError(
            f"cannot resume from {checkpoint}: it was trained on {saved_world} rank(s), this run has {world}; "
            "batch_size is per rank, so the global batch and the data order would change: resume on "
            f"{saved_world} (torchrun --nproc_per_node={saved_world})"
        )
    saved_size = json.loads((checkpoint / STATE).read_text())["dataset_size"]
    if saved_size != dataset_size:
        raise InvalidConfigError(
            f"cannot resume from {checkpoint}: it trained on {saved_size} examples, the data now gives {dataset_size}"
        )


# ---- finding -----------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (`checkpoint-<step>`, never a `.partial`) by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def find(output_dir: str | Path, resume: str) -> Path:
    """`resume` ("latest" or a checkpoint folder) as a checked checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise MissingFileError(f"--resume latest: no checkpoint-<step> folder in {output_dir}")
        path = found[-1][1]
    else:
        path = Path(resume)
        if not path.is_dir():
            raise MissingFileError(f"--resume {resume}: no such checkpoint folder")
    missing = [f for f in (SHARDED_FILES if (path / "dcp").is_dir() else FILES) if not (path / f).exists()]
    if missing:
        raise InvalidFolderError(f"{path} is not a training checkpoint: it lacks {', '.join(missing)}")
    return path


# ---- random states -----------------------------------------------------------------------------


def rng_state() -> dict:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    out = {
        "python": [version, list(state), gauss],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": np_state["state"]["pos"],
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(saved: dict) -> None:
    version, state, gauss = saved["python"]
    random.setstate((version, tuple(state), gauss))
    n = saved["numpy"]
    np.random.set_state(
        {"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
         "has_gauss": n["has_gauss"], "gauss": n["gauss"]}
    )  # fmt: skip
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


# ---- save / load -------------------------------------------------------------------------------


def save(
    output_dir: Path, model, scheduler, state: TrainState, run: dict, keep: int, ranks: Ranks = SINGLE
) -> Path:
    """Write `checkpoint-<step>` atomically, then remove the oldest beyond `keep` (0: keep all).
    On N ranks every rank must call it."""
    from ..adapters import save_adapter
    from ..optim.adamw import save_optimizer

    dst = output_dir / f"checkpoint-{state.step}"
    if ranks.distributed:
        return _save_sharded(dst, model, scheduler, state, run, keep, ranks)
    with atomic_folder(dst) as tmp:
        save_adapter(model, tmp / "adapter")
        save_optimizer(model.qlora.optimizer, tmp / "optimizer.safetensors")
        _save_rest(tmp, scheduler, rng_state(), state, run)
    rotate(output_dir, keep)
    return dst


def _save_sharded(dst: Path, model, scheduler, state: TrainState, run: dict, keep: int, ranks: Ranks) -> Path:
    import torch.distributed as dist

    tmp = dst.with_name(dst.name + ".partial")
    if ranks.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model.qlora.save_checkpoint(tmp / "dcp")
    model.qlora.save_adapter(tmp / "adapter")
    rngs = [None] * ranks.world
    dist.all_gather_object(rngs, rng_state())
    if ranks.main:
        _save_rest(tmp, scheduler, {"ranks": rngs}, state, run)
        _replace_folder(tmp, dst)
        rotate(dst.parent, keep)
    dist.barrier()
    return dst


def _save_rest(folder: Path, scheduler, rng: dict, state: TrainState, run: dict) -> None:
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save(rng, folder / "rng.pt")
    (folder / STATE).write_text(json.dumps(asdict(state), indent=1))
    (folder / RUN).write_text(json.dumps(run, indent=1, sort_keys=True))


def rotate(output_dir: Path, keep: int) -> list[Path]:
    """Remove all but the `keep` newest checkpoints; returns what was removed."""
    found = list_checkpoints(output_dir)
    old = [p for _, p in found[: max(len(found) - keep, 0)]] if keep else []
    for path in old:
        shutil.rmtree(path)
    return old


def load(checkpoint: Path, model, scheduler) -> TrainState:
    """Put the checkpoint's adapter, optimizer and scheduler states into the run; returns its state.
    The random states are set last (`set_rng_state`), by the caller, right before training resumes."""
    from ..adapters import load_adapter
    from ..optim.adamw import load_optimizer

    if (checkpoint / "dcp").is_dir():  # written on N ranks; DCP reads it on any number
        model.qlora.load_checkpoint(checkpoint / "dcp")
    else:
        load_adapter(model, checkpoint / "adapter")
        load_optimizer(model.qlora.optimizer, checkpoint / "optimizer.safetensors")
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    return TrainState(**json.loads((checkpoint / STATE).read_text()))


def load_rng(checkpoint: Path, ranks: Ranks = SINGLE) -> dict:
    """This rank's random states (a checkpoint resumes on as many ranks as wrote it)."""
    saved = torch.load(checkpoint / "rng.pt", weights_only=True)
    return saved["ranks"][ranks.rank] if "ranks" in saved else saved
