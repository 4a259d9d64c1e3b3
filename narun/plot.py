"""`narun plot RUN`: a run's training and validation loss against step, as a PNG.

Read from RUN/events.jsonl (narun.runlog), so any run can be drawn after the fact, finished,
interrupted or still going. Steps a run did twice (a rollback to a checkpoint) are drawn
with their last value, the one the run went on from. matplotlib is an optional extra
(`pip install 'narun[plot]'`), used through its object API on the Agg canvas: no display,
and no global backend switched in the caller's process.

    >>> plot_run("runs/mlp").path                                           # doctest: +SKIP
    PosixPath('runs/mlp/loss.png')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from narun.errors import ConfigError
from narun.runlog import read_events

__all__ = ["Plot", "loss_curves", "plot_run"]

PLOT_INSTALL = "pip install 'narun[plot]'"
LOG_SPAN = 100.0  # log y once the losses span more than two decades


@dataclass
class Plot:
    """What `plot_run` drew: the file, and each line's points read back from the figure."""

    path: Path
    lines: dict[str, tuple[np.ndarray, np.ndarray]]  # label -> (steps, losses)
    log_y: bool
    title: str


def loss_curves(events: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """`loss` (each step event's) and `val_loss` (each eval's, and each done's: the whole
    validation split at its val_step), by step, the last value of a step done twice, NaN
    and inf left out. A curve with no points is left out."""
    loss: dict[int, float] = {}
    val: dict[int, float] = {}
    for e in events:
        kind = e["event"]
        if kind == "step" and "loss" in e:
            loss[e["step"]] = e["loss"]
        elif kind == "eval" and e.get("val_loss") is not None:
            val[e["step"]] = e["val_loss"]
        elif kind == "done" and e.get("val_loss") is not None and e.get("val_step") is not None:
            val[e["val_step"]] = e["val_loss"]
    curves = {}
    for name, points in (("loss", loss), ("val_loss", val)):
        kept = sorted((s, float(v)) for s, v in points.items() if _finite(v))
        if kept:
            curves[name] = ([s for s, _ in kept], [v for _, v in kept])
    return curves


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
        value)


def plot_run(run: str | Path, out: str | Path | None = None) -> Plot:
    """Draw RUN's loss and val_loss against step into `out` (default RUN/loss.png): one
    axes, log y when the losses span more than two decades, titled with the run's name.
    ConfigError (exit 2 from the CLI) when matplotlib is missing, RUN has no events.jsonl,
    or it holds no losses yet."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(f"narun plot needs matplotlib, which is not installed: "
                          f"{PLOT_INSTALL}") from None
    run = Path(run)
    curves = loss_curves(read_events(run))
    if not curves:
        raise ConfigError(f"{run}: events.jsonl holds no loss to plot yet (no step or eval "
                          f"events)")
    path = Path(out) if out is not None else run / "loss.png"
    title = run.resolve().name
    values = [v for _, ys in curves.values() for v in ys]
    log_y = min(values) > 0 and max(values) / min(values) > LOG_SPAN
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"loss": {"label": "loss", "linewidth": 1.0},
              "val_loss": {"label": "val_loss", "linewidth": 1.5, "marker": "o",
                           "markersize": 3}}
    for name, (steps, ys) in curves.items():
        ax.plot(steps, ys, **styles[name])
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    lines = {line.get_label(): (np.asarray(line.get_xdata()), np.asarray(line.get_ydata()))
             for line in ax.get_lines()}
    return Plot(path, lines, ax.get_yscale() == "log", ax.get_title())
