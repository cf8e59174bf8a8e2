"""The pieces of the training loop: the step plan and schedule, one optimizer step over accumulated
micro-batches, evaluation, metrics lines, and the stop-on-signal flag."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import IGNORE
from .ranks import SINGLE, Ranks, sum_over_ranks

logger = logging.getLogger(__name__)
# transformers' scheduler names for ours: "constant" warms up too when warmup is asked for
SCHEDULER_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass(frozen=True)
class Plan:
    """How many optimizer steps: an epoch's micro-batches in groups of grad_accum (the last group of
    an epoch may be smaller: steps never straddle epochs)."""

    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(n_examples: int, cfg, world: int = 1) -> Plan:
    """The plan of `cfg` on `world` ranks: each micro-batch is `batch_size` rows per rank."""
    micro = math.ceil(n_examples / (cfg.batch_size * world))
    per_epoch = math.ceil(micro / cfg.grad_accum)
    total = cfg.max_steps or cfg.epochs * per_epoch
    warmup = cfg.warmup_steps or math.ceil(total * cfg.warmup_ratio)
    return Plan(micro, per_epoch, total, min(warmup, total))


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, plan: Plan):
    """transformers' `get_scheduler` (a `LambdaLR`) for our schedule names."""
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULER_NAMES[schedule], optimizer, num_warmup_steps=plan.warmup_steps,
        num_training_steps=plan.total_steps,
    )  # fmt: skip


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the causal loss averages over: labels after the shift that are not IGNORE."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def train_step(model, batches: list[dict[str, torch.Tensor]], ranks: Ranks = SINGLE) -> tuple[float, float]:
    """Forward and backward every micro-batch, then `model.qlora.step()`; returns the step's loss
    and the gradient norm.

    The loss is the mean over the step's label tokens, all micro-batches together: each forward
    gets their total as `num_items_in_batch` (as transformers' Trainer passes it), so its loss is
    its sum over that total and the gradients add up to those of one big batch. A 0-dim tensor,
    not an int: Dynamo would specialize the graph on every new int. On N ranks (`batches` holding
    this rank's rows) the total is over all ranks' tokens, divided by N: FSDP2 averages the
    gradients over ranks, which makes them the whole global batch's.
    """
    device = batches[0]["input_ids"].device
    n = torch.tensor(sum(label_tokens(b) for b in batches), device=device)
    if ranks.distributed:
        n = torch.tensor(sum_over_ranks([float(n)], ranks, device)[0] / ranks.world, device=device)
    total = torch.zeros((), device=device)
    for batch in batches:
        loss = model(**batch, num_items_in_batch=n).loss
        loss.backward()
        total = total + loss.detach().float()
    norm = model.qlora.step()
    (loss,) = sum_over_ranks([float(total)], ranks, device)
    return loss / ranks.world, norm


def evaluate(model, batches: Iterable[dict[str, torch.Tensor]], ranks: Ranks = SINGLE) -> float:
    """Mean next-token loss over every label token of `batches` (on N ranks: this rank's rows of
    each, summed over ranks).

    Eager (`force_eager`) and in eval mode: the eval batches have their own shapes, and neither they
    nor the eval-mode flag should trace new variants of the compiled training graph.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    # sharded: no_grad, not inference_mode, in which FSDP2 would allocate its all-gather buffers as
    # inference tensors that the next training step cannot write into
    no_grad = torch.no_grad() if ranks.distributed else torch.inference_mode()
    with no_grad, torch.compiler.set_stance("force_eager"):
        for batch in batches:
            n = label_tokens(batch)
            if n or ranks.distributed:  # every rank runs every forward: FSDP2 gathers in it
                loss = model(**batch).loss
                if n:
                    total += loss.item() * n
                    count += n
    device = next(model.parameters()).device
    total, count = sum_over_ranks([total, count], ranks, device)
    model.train(was_training)
    return total / count if count else float("nan")


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class Metrics:
    """`metrics.jsonl`: one JSON object per line, flushed as written; optionally TensorBoard too
    (`output_dir/tensorboard`: every number of every line, under its key, at its step).
    `write=False` (ranks other than 0): the rows are kept in memory only.

    A resumed run (`upto_step`: its checkpoint's step) drops the lines after the checkpoint, and has
    TensorBoard drop the events after it too (`purge_step`).
    """

    def __init__(self, path: Path, upto_step: int | None, tensorboard: bool, write: bool = True):
        self.path = path
        self.rows = _read_rows(path, upto_step) if upto_step is not None else []
        self._file = self._writer = None
        if not write:
            return
        tmp = path.with_name(path.name + ".tmp")  # a resumed run drops what came after its checkpoint
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, path)
        self._file = path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if upto_step is None else upto_step + 1
            self._writer = SummaryWriter(str(path.parent / "tensorboard"), purge_step=purge)

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self._writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.rows if key in r]


def _read_rows(path: Path, upto_step: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto_step]


class StopOnSignal:
    """SIGINT / SIGTERM set `signum` instead of killing the run: the loop finishes its step, saves a
    checkpoint and returns. A second SIGINT interrupts at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(
            "%s: stopping after this step (a checkpoint will be saved)", signal.Signals(signum).name
        )

    def __enter__(self) -> StopOnSignal:
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
