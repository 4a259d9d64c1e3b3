"""The job service's jobs on disk: what survives a coordinator killed with -9.

    STATE_DIR/jobs/JOB/config.json    the job's config, as submitted (written once)
    STATE_DIR/jobs/JOB/state.json     state, step, steps, message, attempts, ... (replaced)
    STATE_DIR/jobs/JOB/events.jsonl   its `--json` events, one per line, each with its `seq`
    STATE_DIR/jobs/JOB/run/           its out_dir, unless the config names an absolute one

A submit is acknowledged only after config.json and state.json are fsynced and renamed
into place, so no acknowledged job is ever lost. state.json is replaced atomically on every
change of state. Each event line is flushed before any client sees the event, so a killed
coordinator loses none (the OS holds the bytes); events.jsonl is fsynced at each change of
state, which is what a machine crash could otherwise take back.
"""

from __future__ import annotations

import json
import os
import re
from array import array
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from narun.checkpoint._fs import fsync_dir

FINAL = ("done", "failed", "cancelled")
_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class JobState:
    """What `status` answers, and what the service needs to run the job again."""

    job: str
    name: str
    seq: int  # submit order
    steps: int
    state: str = "queued"
    step: int = 0
    message: str = ""
    attempts: int = 0  # runs started, retries included
    resume: bool = False  # the next run continues from the newest checkpoint
    cancel: bool = False  # a cancel was asked; the running job is draining
    submitted: float = 0.0
    started: float | None = None  # wall clock of the first run's start (deadline)
    ended: float | None = None
    not_before: float = 0.0  # a retry waits out its back-off

    def status(self) -> dict[str, Any]:
        return {"job": self.job, "state": self.state, "step": self.step, "steps": self.steps,
                "message": self.message}


class StoredJob:
    """One job: its state and config, and its events in events.jsonl. Events stay on disk
    (an index of line offsets, 8 bytes each, and the newest TAIL in memory): a long job's
    million steps would otherwise hold hundreds of MB in the service for its whole life."""

    TAIL = 1024  # newest events kept in memory: what live followers ask for

    def __init__(self, state: JobState, directory: Path, config: dict[str, Any]) -> None:
        self.state = state
        self.directory = directory
        self.config = config
        self._offsets = array("q")  # byte offset of each event's line
        self._tail: deque[dict[str, Any]] = deque(maxlen=self.TAIL)
        self._log: BinaryIO | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.config["training"]["out_dir"])

    @property
    def count(self) -> int:
        """Events so far (the next one's seq)."""
        return len(self._offsets)

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Number an event, write and flush it; the numbered event."""
        numbered = {"seq": self.count, **event}
        if self._log is None:
            self._log = open(self.directory / "events.jsonl", "ab")  # noqa: SIM115 (held open for the job's life)
        offset = self._log.tell()
        self._log.write((json.dumps(numbered) + "\n").encode())
        self._log.flush()
        self._tail.append(numbered)
        self._offsets.append(offset)  # last: a reader counts only lines written whole
        return numbered

    def read(self, start: int, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` events from seq `start`: the newest from memory, older ones from
        events.jsonl."""
        stop = min(self.count, start + limit)
        first_kept = self.count - len(self._tail)
        if start >= first_kept:
            return [self._tail[i - first_kept] for i in range(start, stop)]
        return self._read_disk(start, stop)

    def _read_disk(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Events `start` to `stop` (exclusive, <= count) from events.jsonl."""
        if start >= stop:
            return []
        with open(self.directory / "events.jsonl", "rb") as f:
            f.seek(self._offsets[start])
            end = self._offsets[stop] if stop < len(self._offsets) else None
            data = f.read() if end is None else f.read(end - self._offsets[start])
        return [json.loads(line) for line in data.splitlines()[:stop - start]]

    def save_state(self) -> None:
        if self._log is not None:
            os.fsync(self._log.fileno())
        _write_atomic(self.directory / "state.json", json.dumps(asdict(self.state)))

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class JobStore:
    """Every job the service knows, loaded from and written to `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, StoredJob] = {}
        for directory in sorted(self.root.iterdir()):
            job = _load(directory)
            if job is not None:
                self.jobs[job.state.job] = job
        self._next = max((j.state.seq for j in self.jobs.values()), default=0) + 1

    def ordered(self) -> list[StoredJob]:
        return sorted(self.jobs.values(), key=lambda j: j.state.seq)

    def add(self, name: str, config: dict[str, Any], now: float) -> StoredJob:
        """A new queued job, durable before this returns. A relative out_dir is placed in
        the job's directory (the service's cwd means nothing to the client)."""
        seq = self._next
        self._next += 1
        safe = _NAME.sub("-", name).strip("-.")[:48] or "job"
        job_id = f"{safe}-{seq:04d}"
        directory = self.root / job_id
        directory.mkdir(parents=True)
        out_dir = Path(config["training"]["out_dir"])
        if not out_dir.is_absolute():
            config["training"]["out_dir"] = str(directory / "run")
        _write_atomic(directory / "config.json", json.dumps(config))
        job = StoredJob(JobState(job_id, name, seq, config["training"]["steps"],
                                 submitted=now), directory, config)
        job.save_state()
        fsync_dir(self.root)
        self.jobs[job_id] = job
        return job


def _load(directory: Path) -> StoredJob | None:
    try:
        config = json.loads((directory / "config.json").read_text())
        state = JobState(**json.loads((directory / "state.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None  # a submit that never completed (never acknowledged)
    job = StoredJob(state, directory, config)
    events = directory / "events.jsonl"
    if events.exists():
        offset = 0
        with open(events, "rb") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    break  # a line cut by a crash: the last one, never delivered whole
                if not line.endswith(b"\n") or event.get("seq") != job.count:
                    break
                job._offsets.append(offset)
                job._tail.append(event)
                offset += len(line)
        with open(events, "r+b") as f:  # drop what was not read whole: appends follow it
            f.truncate(offset)
    return job


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
