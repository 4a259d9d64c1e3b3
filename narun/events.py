"""Training events (README.md, "A 60-second tour") and the two ways they are shown.

`--json` (or a stdout that is not a TTY) prints one JSON object per line with an `event`
key: step, eval, checkpoint, restart, resumed, done, error. On a TTY a rich progress bar
shows step, loss, throughput and ETA instead. Fields may be added, never renamed.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from typing import Any, Protocol, TextIO


class Reporter(Protocol):
    def start(self, total_steps: int, first_step: int) -> None: ...
    def emit(self, event: str, **fields: Any) -> None: ...
    def close(self) -> None: ...


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line parseable
    return value


class JsonLinesReporter:
    """One JSON object per event on `stream` (stdout by default), flushed per line."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def start(self, total_steps: int, first_step: int) -> None:
        return None

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, **{k: _clean(v) for k, v in fields.items()}}
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def close(self) -> None:
        return None


class ListReporter:
    """Keeps every event as a dict (with its `event` key) in `.events`: for programs that
    run training from Python and read what happened afterwards."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def start(self, total_steps: int, first_step: int) -> None:
        return None

    def emit(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})

    def close(self) -> None:
        return None


class TeeReporter:
    """Hands every call to each reporter in turn: the first is what the user sees, the
    others record the run (narun.runlog). `close` closes every reporter, even if one fails,
    and only once, so a runner may close it again on its way out after a failure."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters
        self.closed = False

    def start(self, total_steps: int, first_step: int) -> None:
        for r in self.reporters:
            r.start(total_steps, first_step)

    def emit(self, event: str, **fields: Any) -> None:
        for r in self.reporters:
            r.emit(event, **fields)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.ExitStack() as closing:
            for r in self.reporters:
                closing.callback(r.close)


class RichReporter:
    """A live progress bar (step, loss, throughput, ETA); evals and checkpoints as lines."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console()
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console,
        )
        self.task: Any = None

    def start(self, total_steps: int, first_step: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=first_step,
                                           loss="-", speed="")

    def emit(self, event: str, **fields: Any) -> None:
        if event == "step":
            speed = next((f"{fields[k]:,.0f} {k.removesuffix('_per_s')}/s"
                          for k in ("tokens_per_s", "samples_per_s") if k in fields), "")
            self.progress.update(self.task, completed=fields["step"],
                                 loss=f"{fields['loss']:.4f}", speed=speed)
        elif event == "eval":
            self.progress.console.print(
                f"step {fields['step']}: val_loss {fields['val_loss']:.4f}")
        elif event == "checkpoint":
            self.progress.console.print(f"step {fields['step']}: checkpoint {fields['path']}")
        elif event == "resumed":
            self.progress.console.print(
                f"resumed at step {fields['step']} from {fields['checkpoint']}")
        elif event == "done":
            val = fields.get("val_loss")
            shown = "not evaluated (interrupted)" if val is None else f"{val:.4f}"
            self.progress.console.print(
                f"done at step {fields['step']} in {fields['seconds']:.1f}s: "
                f"val_loss {shown}, checkpoint {fields.get('checkpoint')}")
        elif event == "placement":
            where = ", ".join(f"{p['role']} {p['rank']} on {p['host']}"
                              for p in fields["processes"])
            self.progress.console.print(f"placement: {where}")
        elif event == "host_lost":
            self.progress.console.print(f"[red]host {fields['host']} lost: {fields['reason']}")
        elif event == "error":
            self.progress.console.print(f"[red]error: {fields['message']}")
        else:
            self.progress.console.print(f"{event}: {fields}")

    def close(self) -> None:
        self.progress.stop()


def make_reporter(json_lines: bool | None = None) -> Reporter:
    """JSON lines when asked or when stdout is not a TTY, else a rich progress bar."""
    if json_lines is None:
        json_lines = not sys.stdout.isatty()
    return JsonLinesReporter() if json_lines else RichReporter()
