"""`qlora-compile train`: check everything, load, compile, train, checkpoint, report.

Every check on what the user gave (config, model folder, tokenizer, data files and records, the
checkpoint to resume) runs before the output folder is touched, so bad input leaves nothing behind.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..dtypes import parse_dtype
from ..errors import InvalidArgumentError, InvalidFolderError, MissingFileError, UnsupportedError
from . import checkpoints, data, loop
from .checkpoints import TrainState
from .config import TrainConfig
from .pack import pack
from .ranks import SINGLE, Ranks, agreed_signal, join, leave, my_rows, rank0_first

logger = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class Prepared:
    """What `prepare` checked and loaded: everything but the model."""

    cfg: TrainConfig
    tokenizer: object
    fmt: str
    train: data.Split
    eval: data.Split | None
    four_bit: bool
    checkpoint: Path | None
    run_identity: dict = field(default_factory=dict)
    ranks: Ranks = SINGLE

    @property
    def global_batch(self) -> int:
        """Rows of one micro-batch over all ranks (`batch_size` is per rank)."""
        return self.cfg.batch_size * self.ranks.world

    @property
    def pad_id(self) -> int:
        t = self.tokenizer
        return t.pad_token_id if t.pad_token_id is not None else t.eos_token_id


def check_model_folder(path: str | Path) -> bool:
    """A model folder with config.json and a tokenizer; True when it is a bitsandbytes 4-bit one."""
    folder = Path(path)
    if not folder.is_dir():
        raise MissingFileError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise MissingFileError(f"model folder {folder} has no config.json")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise InvalidFolderError(
            f"model folder {folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}): save the base model's "
            "tokenizer into it (tokenizer.save_pretrained)"
        )
    try:
        quant = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except json.JSONDecodeError as e:
        raise InvalidFolderError(f"model folder {folder}: config.json is not valid JSON ({e})") from None
    return quant.get("quant_method") == "bitsandbytes" and bool(quant.get("load_in_4bit"))


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidFolderError(f"model folder {path}: its tokenizer cannot be loaded ({first})") from None
    if tokenizer.eos_token_id is None:
        raise InvalidFolderError(f"model folder {path}: its tokenizer has no EOS token")
    return tokenizer


def prepare(cfg: TrainConfig, resume: str | None = None, ranks: Ranks = SINGLE) -> Prepared:
    """Every check and the tokenized data, before anything is written."""
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UnsupportedError(
            "tensorboard: true needs the tensorboard package: pip install 'qlora-compile[tensorboard]'"
        )
    train_device(cfg)  # a CUDA device asked for where there is none: refused before anything loads
    four_bit = check_model_folder(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    train, fmt = data.prepare(cfg.data_files, tokenizer, cfg)
    evals = None
    if cfg.eval_files:
        evals, _ = data.prepare(cfg.eval_files, tokenizer, cfg, fmt)
    elif cfg.eval_split:
        train, evals = data.hold_out(train, cfg.eval_split, cfg.seed)
    if cfg.packing:
        train = pack(train, cfg.max_length, cfg.seed)
    _log_counts("train", train.counts, cfg)
    if cfg.eval_files:
        _log_counts("eval", evals.counts, cfg)
    run_identity = {
        "config": cfg.identity(),
        "model": checkpoints.model_identity(cfg.model),
        "world_size": ranks.world,
    }
    found = None
    if resume:
        found = checkpoints.find(cfg.output_dir, resume)
        checkpoints.check_matches(found, run_identity, len(train))
    elif checkpoints.list_checkpoints(cfg.output_dir):
        raise InvalidArgumentError(
            f"output_dir {cfg.output_dir} holds checkpoints of an earlier run: pass --resume latest to "
            "continue it, or choose another output_dir"
        )
    return Prepared(cfg, tokenizer, fmt, train, evals, four_bit, found, run_identity, ranks)


def _log_counts(what: str, c: data.Counts, cfg: TrainConfig) -> None:
    """What max_length did: a warning when it cut or left out examples, else an info line."""
    changed = c.truncated + c.dropped_too_long + c.dropped_no_labels
    packed = f", packed into {c.packed_rows} rows" if c.packed_rows is not None else ""
    (logger.warning if changed else logger.info)(
        "%s data: %d examples, %d kept (%d tokens%s); max_length %d: %d truncated, %d dropped as too long, "
        "%d dropped with no answer token left", what, c.examples, c.kept, c.tokens, packed, cfg.max_length,
        c.truncated, c.dropped_too_long, c.dropped_no_labels,
    )  # fmt: skip


def train_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedError(f"device {cfg.device!r}: this torch sees no CUDA device")
    return torch.device(cfg.device)


def load_model(cfg: TrainConfig, four_bit: bool, ranks: Ranks = SINGLE):
    """The model as stored (a 4-bit folder is not re-quantized), compiled with `cfg.qlora`, on the
    training device. A 16-bit folder is loaded and quantized on the CPU, so the device never holds
    its 16-bit weights, then moved; a 4-bit folder is loaded onto the device directly. On N ranks
    it is sharded (`distributed.shard`): a 4-bit folder is built on the meta device and each rank
    reads its rows of it there; a 16-bit one is loaded whole by each rank first."""
    import qlora_compile

    dtype, device = parse_dtype(cfg.dtype, "dtype"), train_device(cfg)
    if four_bit:
        model = qlora_compile.load_quantized(
            cfg.model, dtype=dtype, device="meta" if ranks.distributed else device
        )
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    # batches of every length in a run: symbolic sizes from the first step, one graph for all
    # (unless the config asks for another `dynamic`)
    dynamic = True if cfg.qlora.dynamic is None else cfg.qlora.dynamic
    qlora_compile.compile(model, cfg.qlora, dynamic=dynamic, distributed=ranks.distributed)
    if not ranks.distributed:
        return model.to(device)  # before model.qlora.optimizer exists: its states go where the parameters are
    from .. import distributed

    return distributed.shard(model if four_bit else model.to(device))


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


@dataclass
class Result:
    """What `train` returns: the report written to report.json, the exit code it implies, and the
    trained (compiled) model, for generation or more evaluation in the same process."""

    report: dict
    output_dir: Path
    stopped_by: int | None = None  # the signal that stopped the run early
    model: object = field(default=None, repr=False)

    @property
    def exit_code(self) -> int:
        return 0 if self.stopped_by is None else 128 + self.stopped_by


def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True) -> Result:
    """Run `cfg` (resuming from a checkpoint: "latest" or a folder); see the module docstring."""
    import transformers

    started = time.perf_counter()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    ranks = join(train_device(cfg))
    p = rank0_first(ranks, lambda: prepare(cfg, resume, ranks))
    model, plan, scheduler, state, rng = _setup(p)
    out = Path(cfg.output_dir)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    metrics = loop.Metrics(
        out / "metrics.jsonl", state.step if p.checkpoint else None, cfg.tensorboard, write=ranks.main
    )
    if p.eval is not None and state.step == 0:
        state.eval_before = _evaluate(model, p, metrics, 0)
    if rng is not None:
        checkpoints.set_rng_state(rng)  # last: nothing may draw between here and the next step
    model.train()
    with loop.StopOnSignal() as stop:
        run_seconds = _loop(model, p, plan, scheduler, state, metrics, stop, progress)
    eval_after = (
        _eval_after(model, p, metrics, state.step) if p.eval is not None and not stop.signum else None
    )
    if stop.signum is not None or (cfg.save_every and state.step % cfg.save_every):
        checkpoints.save(out, model, scheduler, state, p.run_identity, cfg.save_total_limit, ranks)
    adapter = model.qlora.save_adapter(out / "adapter")  # on N ranks: gathered, written by rank 0
    metrics.close()
    leave(ranks)  # the rest (report, exports, plot) is rank 0's alone
    if not ranks.main:
        return Result({}, out, stop.signum)
    stop_name = None if stop.signum is None else signal.Signals(stop.signum).name
    seconds = (run_seconds, time.perf_counter() - started)
    report = _report(p, plan, state, metrics, seconds, eval_after, adapter, stop_name)
    if stop.signum is None:
        report["exports"] = _export(cfg, adapter, out)
        _plot(out / "loss.png", metrics)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return Result(report, out, stop.signum, model)


def _setup(p: Prepared):
    """The compiled model, step plan, scheduler and state: fresh, or as the checkpoint left them
    (with its random states, which the caller sets last)."""
    import transformers

    # before compile: LoRA's initialization draws from it (the same on every rank)
    transformers.set_seed(p.cfg.seed)
    model = load_model(p.cfg, p.four_bit, p.ranks)
    plan = loop.plan_steps(len(p.train), p.cfg, p.ranks.world)
    scheduler = loop.make_scheduler(model.qlora.optimizer, p.cfg.schedule, plan)
    if p.checkpoint is None:
        return model, plan, scheduler, TrainState(data_seed=p.cfg.seed, dataset_size=len(p.train)), None
    state = checkpoints.load(p.checkpoint, model, scheduler)
    return model, plan, scheduler, state, checkpoints.load_rng(p.checkpoint, p.ranks)


def _eval_after(model, p: Prepared, metrics: loop.Metrics, step: int) -> float:
    """The eval loss at the last step: logged already when eval_every divides it, else computed."""
    done = [loss for s, loss in metrics.series("eval_loss") if s == step]
    return done[-1] if done else _evaluate(model, p, metrics, step)


def _evaluate(model, p: Prepared, metrics: loop.Metrics, step: int) -> float:
    device = next(model.parameters()).device
    batches = (
        to_device(my_rows(b, p.ranks), device) for b in data.eval_batches(p.eval, p.global_batch, p.pad_id)
    )
    loss = loop.evaluate(model, batches, p.ranks)
    metrics.write({"step": step, "eval_loss": loss, "eval_ppl": loop.perplexity(loss)})
    return loss


def _loop(
    model, p: Prepared, plan: loop.Plan, scheduler, state: TrainState, metrics, stop, progress
) -> float:
    """Steps until the plan's total (or a signal); returns the seconds spent in steps."""
    from tqdm import tqdm

    cfg = p.cfg
    bar = tqdm(total=plan.total_steps, initial=state.step, desc="train", file=sys.stderr,
               dynamic_ncols=True, disable=not (progress and p.ranks.main))  # fmt: skip
    lengths, device = p.train.lengths, next(model.parameters()).device
    order = None
    seconds = 0.0
    stopped = stop.signum
    while state.step < plan.total_steps and stopped is None:
        if state.batch >= plan.micro_per_epoch:
            state.epoch, state.batch, order = state.epoch + 1, 0, None
        if order is None:
            order = data.micro_batches(
                data.epoch_order(lengths, p.global_batch, state.data_seed, state.epoch, cfg.group_by_length),
                p.global_batch,
            )
        chunk = order[state.batch : state.batch + cfg.grad_accum]
        rows = [p.train.dataset[ids] for ids in chunk]
        batches = [to_device(my_rows(data.collate(r, p.pad_id), p.ranks), device) for r in rows]
        tokens = sum(sum(r["length"]) for r in rows)  # every rank's
        lr = scheduler.get_last_lr()[0]
        t0 = time.perf_counter()
        loss, norm = loop.train_step(model, batches, p.ranks)
        scheduler.step()
        dt = time.perf_counter() - t0
        seconds += dt
        state.step += 1
        state.batch += len(chunk)
        state.tokens += tokens
        state.first_loss = loss if state.first_loss is None else state.first_loss
        state.pending.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}")
        if state.step % cfg.log_every == 0 or state.step == plan.total_steps:
            mean = sum(state.pending) / len(state.pending)
            metrics.write({"step": state.step, "epoch": state.epoch, "loss": mean,
                           "lr": lr, "grad_norm": norm, "tokens": state.tokens, "tokens_per_s": tokens / dt})  # fmt: skip
            state.pending = []
        if p.eval is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
            _evaluate(model, p, metrics, state.step)
        if cfg.save_every and state.step % cfg.save_every == 0:
            checkpoints.save(
                Path(cfg.output_dir), model, scheduler, state, p.run_identity, cfg.save_total_limit, p.ranks
            )
        stopped = agreed_signal(stop.signum, p.ranks, device)  # on N ranks: all stop after the same step
    if p.ranks.distributed:  # a signal that came after the last agreement waits for the next run
        stop.signum = stopped
    bar.close()
    return seconds


def _report(p: Prepared, plan, state: TrainState, metrics, seconds: tuple[float, float], eval_after, adapter,
            stop_name) -> dict:  # fmt: skip
    cfg, (run_seconds, total_seconds) = p.cfg, seconds
    losses = metrics.series("loss")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "model": cfg.model,
        "four_bit_folder": p.four_bit,
        "format": p.fmt,
        "steps": state.step,
        "total_steps": plan.total_steps,
        "epoch": state.epoch,
        "train_seconds": run_seconds,
        "total_seconds": total_seconds,
        "tokens": state.tokens,
        "tokens_per_s": state.tokens / run_seconds if run_seconds else None,
        "peak_rss_bytes": peak,
        "loss_first": state.first_loss,
        "loss_last": losses[-1][1] if losses else None,
        "eval_loss_before": state.eval_before,
        "eval_loss_after": eval_after,
        "eval_ppl_before": None if state.eval_before is None else loop.perplexity(state.eval_before),
        "eval_ppl_after": None if eval_after is None else loop.perplexity(eval_after),
        "data": asdict(p.train.counts),
        "train_examples": len(p.train),
        "eval_examples": 0 if p.eval is None else len(p.eval),
        "eval_data": None if p.eval is None else asdict(p.eval.counts) if cfg.eval_files else "eval_split",
        "resumed_from": None if p.checkpoint is None else str(p.checkpoint),
        "stopped_by_signal": stop_name,
        "adapter": str(adapter),
    }


def _export(cfg: TrainConfig, adapter: Path, out: Path) -> dict[str, str]:
    if cfg.export == "none":
        return {}
    from .. import export

    q = cfg.qlora  # merged onto the base as the run quantized it (a 4-bit folder: as stored)
    quant = dict(quant_type=q.quant_type, blocksize=q.blocksize, double_quant=q.double_quant, progress=False)
    if cfg.export == "merged":
        return {"merged": str(export.export_merged(cfg.model, adapter, out / "merged", **quant))}
    folder, _ = export.export_nf4(cfg.model, adapter, out / "nf4", **quant)
    return {"nf4": str(folder)}


def _plot(path: Path, metrics: loop.Metrics) -> None:
    from .plots import write_training_plot

    write_training_plot(path, metrics.series("loss"), metrics.series("eval_loss"), metrics.series("lr"))
