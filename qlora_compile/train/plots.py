"""The training curves as a PNG, drawn by matplotlib on a `Figure` of its own (no pyplot state, no
display): used by `qlora-compile train` (loss.png) and `qlora-compile demo`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

Points = Sequence[tuple[float, float]]  # (step, value)


def write_training_plot(
    path: str | Path,
    train: Points,
    evals: Points = (),
    lrs: Points = (),
    *,
    train_label: str = "training loss",
    eval_label: str = "eval loss",
    w: int = 640,
    h: int = 360,
) -> None:
    """Training loss per logged step (blue), eval loss (red squares, dashed) and, when given, the
    learning rate in a second panel below (green). Non-finite values leave gaps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    axes = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1)) if lrs else [fig.add_subplot()]
    loss = axes[0]
    if train:
        loss.plot(*zip(*train, strict=True), color="tab:blue", label=train_label)
    if evals:
        loss.plot(*zip(*evals, strict=True), "s--", color="tab:red", label=eval_label)
    loss.set_ylabel("loss")
    loss.legend()
    if lrs:
        axes[1].plot(*zip(*lrs, strict=True), color="tab:green")
        axes[1].set_ylabel("learning rate")
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, format="png")
