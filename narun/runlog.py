"""What a training run records in its out_dir beside checkpoints.

- `events.jsonl`: every run's `--json` events, one JSON object per line, exactly as
  `--json` prints them, whatever the terminal shows; `narun plot` and `read_events` read it.
- `tensorboard/`: with `training.tensorboard: true`, TensorBoard event files (tensorboardX)
  of loss, lr, throughput, step time by phase and val_loss, each at its step.

Both are reporters teed behind the one the user sees (`record_run`), so one-process
training and the coordinator record the same run the same way. A resumed run appends; a
fresh run moves an earlier run's files aside (events.old-N.jsonl, tensorboard.old-N/), as
`narun.train.claim_out_dir` does checkpoints: one out_dir, one run, nothing deleted.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, TextIO

import structlog

from narun.config import TrainingConfig
from narun.errors import ConfigError
from narun.events import JsonLinesReporter, Reporter, TeeReporter

__all__ = ["EVENTS", "TENSORBOARD", "EventLogReporter", "TensorBoardReporter",
           "check_tensorboard", "read_events", "record_run"]

log = structlog.get_logger("narun.runlog")

EVENTS = "events.jsonl"
TENSORBOARD = "tensorboard"
TENSORBOARD_INSTALL = "pip install 'narun[tensorboard]'"
_writers = itertools.count(1)  # this process's TensorBoard files, for unique names


def record_run(reporter: Reporter, training: TrainingConfig, fresh: bool) -> Reporter:
    """`reporter`, teed to out_dir/events.jsonl and, with training.tensorboard, to
    out_dir/tensorboard/. `fresh`: the run starts at step 0 rather than resuming, so an
    earlier run's files there are moved aside. Nothing is opened before the first event."""
    out = Path(training.out_dir)
    recorders: list[Reporter] = [EventLogReporter(out / EVENTS, fresh)]
    if training.tensorboard:
        recorders.append(TensorBoardReporter(out / TENSORBOARD, fresh))
    return TeeReporter(reporter, *recorders)


def _move_aside(path: Path) -> None:
    """Rename `path` (if it exists) to the first free NAME.old-N (before the suffix)."""
    if not path.exists():
        return
    n = 1
    while (aside := path.with_name(f"{path.stem}.old-{n}{path.suffix}")).exists():
        n += 1
    path.rename(aside)
    log.warning("run_files_moved_aside", path=str(path), to=str(aside),
                reason="a fresh run in an out_dir that holds an earlier run's")


class EventLogReporter:
    """Appends each event to `path` as one JSON line (as `--json` prints it), flushed per
    line so that a killed run keeps every event it emitted."""

    def __init__(self, path: str | Path, fresh: bool = False) -> None:
        self.path = Path(path)
        self.fresh = fresh
        self._file: TextIO | None = None
        self._lines: JsonLinesReporter | None = None
        self._closed = False

    def _open(self) -> JsonLinesReporter:
        if self._lines is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.fresh:
                _move_aside(self.path)
                self.fresh = False  # once: reopening appends to this run's own log
            self._file = self.path.open("a+", encoding="utf-8")
            # A run killed mid-line leaves a torn last line: start on a line of our own.
            if self._file.tell() > 0:
                self._file.seek(self._file.tell() - 1)
                if self._file.read(1) != "\n":
                    self._file.write("\n")
            self._lines = JsonLinesReporter(self._file)
        return self._lines

    def start(self, total_steps: int, first_step: int) -> None:
        self._open()

    def emit(self, event: str, **fields: Any) -> None:
        self._open().emit(event, **fields)
        if self._closed:  # an event after the run closed (stopping a process): kept, and
            self.close()  # the file not left open

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._lines = None
        self._closed = True


def check_tensorboard(training: TrainingConfig) -> None:
    """ConfigError when training.tensorboard is on and tensorboardX cannot be imported."""
    if not training.tensorboard:
        return
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise ConfigError(f"training.tensorboard: true needs tensorboardX, which is not "
                          f"installed: {TENSORBOARD_INSTALL}, or set training.tensorboard: "
                          f"false") from None


class TensorBoardReporter:
    """Writes the scalars of the events to TensorBoard event files in `logdir`: loss, lr,
    tokens_per_s or samples_per_s and time/PHASE at each step; val_loss at each eval, and
    the done event's (the whole validation split) at its step.

    Steps written again (a resumed run, a rollback to a checkpoint) replace the earlier
    ones: the writer reopens with tensorboardX's purge_step there, which TensorBoard's
    reader honours."""

    def __init__(self, logdir: str | Path, fresh: bool = False, flush_secs: int = 5) -> None:
        self.logdir = Path(logdir)
        self.fresh = fresh
        self.flush_secs = flush_secs  # a killed run loses at most this much
        self._writer: Any = None
        self._val_steps: set[int] = set()

    def _open(self, purge_step: int | None) -> Any:
        from tensorboardX import SummaryWriter

        if self._writer is not None:
            self._writer.close()
        elif self.fresh:
            _move_aside(self.logdir)
            self.fresh = False  # once: this run's own files stay
        # tensorboardX names the file by the second it was made and the host: a writer
        # opened in the same second (a rollback, a quick resume) would truncate another's.
        # purge_step None: a fresh start, which purges nothing.
        self._writer = SummaryWriter(str(self.logdir), flush_secs=self.flush_secs,
                                     purge_step=purge_step,
                                     filename_suffix=f".{os.getpid()}.{next(_writers):04d}")
        return self._writer

    def start(self, total_steps: int, first_step: int) -> None:
        self._open(first_step + 1 if first_step else None)

    def emit(self, event: str, **fields: Any) -> None:
        if event == "restart" and "rolled_back_to" in fields and self._writer is not None:
            self._open(fields["rolled_back_to"] + 1)  # the steps after it are redone
            return
        w = self._writer
        if w is None:  # events before start (placement) carry no scalars
            return
        step = fields.get("step")
        if event == "step":
            for key in ("loss", "lr", "tokens_per_s", "samples_per_s"):
                if key in fields:
                    w.add_scalar(key, float(fields[key]), step)
            for phase, seconds in (fields.get("timings") or {}).items():
                w.add_scalar(f"time/{phase}", float(seconds), step)
        elif event == "eval":
            self._val_steps.add(step)
            w.add_scalar("val_loss", float(fields["val_loss"]), step)
        elif event == "done":
            val, at = fields.get("val_loss"), fields.get("val_step")
            # after an interrupt done repeats the last eval's value: written already
            if val is not None and at is not None and at not in self._val_steps:
                w.add_scalar("val_loss", float(val), at)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_events(run: str | Path) -> list[dict[str, Any]]:
    """The events a run recorded (RUN/events.jsonl, or that file itself), in order. Lines
    that are not JSON objects (a torn last line of a killed run) are skipped, with a
    warning; NaN and inf, which JSON writes as strings, come back as floats."""
    path = Path(run)
    if path.is_dir():
        path = path / EVENTS
    if not path.is_file():
        raise ConfigError(f"{run}: no {EVENTS} here; a run directory (training.out_dir) "
                          f"holds one once its run has started")
    events, skipped = [], 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("event"), str):
                events.append({k: _float_back(v) for k, v in record.items()})
            elif line.strip():
                skipped += 1
    if skipped:
        log.warning("events_skipped", path=str(path), lines=skipped,
                    reason="not a JSON event (a run killed mid-line?)")
    return events


def _float_back(value: Any) -> Any:
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return value

