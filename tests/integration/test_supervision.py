"""What the coordinator does not let slip: a failing background task, a rejoin held up by a
slow shard, checkpoint slices left on disk, and growth over a long job."""

from __future__ import annotations

import asyncio
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import uvloop

from narun._process import rss_bytes
from narun.config import config_from_dict, to_dict
from narun.events import JsonLinesReporter
from narun.runtime import Coordinator
from protocol import message
from tests.integration.conftest import assert_all_gone


def run(coordinator: Coordinator) -> dict:
    try:
        return uvloop.run(coordinator.run())
    finally:
        assert_all_gone(coordinator.pids)


class BrokenWatchdog(Coordinator):
    async def _watchdog(self) -> None:
        await asyncio.sleep(0.5)
        raise RuntimeError("the watchdog's own bug")


@pytest.mark.timeout(60)
def test_a_failing_background_task_fails_the_job_at_once(make_config):
    """Hang detection that stops must not stop silently."""
    cfg = make_config("ps-sync", 2, steps=100000)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="the watchdog's own bug"):
        run(BrokenWatchdog(cfg, JsonLinesReporter(io.StringIO()), bucket_bytes=512,
                           wait_timeout=30.0))
    assert time.monotonic() - began < 20


class NeverAnswers:
    """A shard link whose shard takes forever to answer."""

    def __init__(self) -> None:
        self.asked: list[list[int]] = []

    async def call(self, msg, **kwargs):
        self.asked.append(msg["ranks"])
        await asyncio.Event().wait()


class Control:
    def revive(self, route):
        pass


def test_a_rejoining_trainer_is_welcomed_while_a_shard_is_slow_to_take_it_back(make_config):
    """The trainer's hello waits heartbeat_timeout; what the shards take (bounded by
    wait_timeout) must not hold the welcome, or a slow shard turns a rejoin into a failure."""
    cfg = make_config("ps-sync", 2, heartbeat_timeout=1.0)
    coordinator = Coordinator(cfg, JsonLinesReporter(io.StringIO()), wait_timeout=60.0)

    async def main():
        coordinator.control = Control()
        link = NeverAnswers()
        coordinator.shard_links = [link]
        coordinator.members = {0}  # trainer 1 missed rejoin_timeout
        hello = message("hello", 5, role="trainer", rank=1, software="x")
        welcome = await asyncio.wait_for(coordinator._welcome(hello, b"trainer-1", None),
                                         cfg.runtime.heartbeat_timeout)
        assert welcome.type == "welcome" and welcome.id == 5
        assert coordinator.members == {0, 1}
        await asyncio.sleep(0.01)
        assert link.asked == [[0, 1]]  # the shards are told, in the background
        coordinator._tasks.cancel()
    asyncio.run(main())


class StaleStagingCheck(JsonLinesReporter):
    def __init__(self, stale: Path) -> None:
        super().__init__(io.StringIO())
        self.stale = stale
        self.seen_at_first_step: bool | None = None

    def emit(self, event: str, **fields) -> None:
        super().emit(event, **fields)
        if event == "step" and self.seen_at_first_step is None:
            self.seen_at_first_step = self.stale.exists()


@pytest.mark.timeout(60)
def test_slices_an_interrupted_checkpoint_left_are_removed_at_start(make_config, tmp_path):
    cfg = make_config("ps-sync", 2, steps=6, checkpoint_every=3)
    stale = Path(cfg.training.out_dir) / ".shards" / "step-000099"
    stale.mkdir(parents=True)
    (stale / "ps-0.safetensors").write_bytes(b"\0" * 4096)
    reporter = StaleStagingCheck(stale)
    run(Coordinator(cfg, reporter, bucket_bytes=512, wait_timeout=30.0))
    assert reporter.seen_at_first_step is False
    assert list((Path(cfg.training.out_dir) / ".shards").glob("step-*")) == []


class FailingSave(Coordinator):
    def _save(self, step, files):
        assert all(Path(f).exists() for f in files)  # the slices were written
        raise OSError(28, "No space left on device")


@pytest.mark.timeout(60)
def test_a_failed_checkpoint_leaves_no_slices_behind(make_config):
    cfg = make_config("ps-sync", 2, steps=6, checkpoint_every=3)
    with pytest.raises(OSError, match="No space left"):
        run(FailingSave(cfg, JsonLinesReporter(io.StringIO()), bucket_bytes=512,
                        wait_timeout=30.0))
    assert list((Path(cfg.training.out_dir) / ".shards").glob("step-*")) == []


class Vitals(JsonLinesReporter):
    """The coordinator's own task count and RSS at every step."""

    def __init__(self) -> None:
        super().__init__(io.StringIO())
        self.samples: list[dict] = []

    def emit(self, event: str, **fields) -> None:
        super().emit(event, **fields)
        if event == "step":
            self.samples.append({"step": fields["step"], "tasks": len(asyncio.all_tasks()),
                                 "rss": rss_bytes()})


def _worker_vitals(log_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for log in sorted(log_dir.glob("*.log")):
        lines = (json.loads(x) for x in log.read_text().splitlines() if x.startswith("{"))
        out[log.stem] = [e for e in lines if e.get("event") == "actor.vitals"]
    return out


def assert_flat(name: str, samples: list[dict], steps: int) -> None:
    """After warm-up (the first fifth of the steps), neither the task count nor the RSS
    grows: the last fifth's median task count and peak RSS are within a small margin of the
    second fifth's. (A task count's peak catches requests being served at that instant,
    which a loaded machine makes pile up; a leak raises the median.)"""
    warm = [s for s in samples if steps // 5 <= s["step"] < 2 * steps // 5]
    late = [s for s in samples if s["step"] >= 4 * steps // 5]
    assert len(warm) >= 3 and len(late) >= 3, (name, len(warm), len(late))
    tasks = tuple(statistics.median(s["tasks"] for s in part) for part in (warm, late))
    rss = (max(s["rss"] for s in warm), max(s["rss"] for s in late))
    assert tasks[1] <= tasks[0] + 2, f"{name}: tasks grew from {tasks[0]} to {tasks[1]}"
    assert rss[1] - rss[0] < 8 << 20, f"{name}: RSS grew by {(rss[1] - rss[0]) >> 20} MiB"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_long_job_keeps_every_process_flat(make_config, monkeypatch):
    """2,000 ps-sync steps of a 1 MB MLP with an eval every 10 steps and a checkpoint every
    100: what any of those leaves behind per step (a task, a snapshot of a bucket, a
    staged slice) would show as growth of a process's task count or RSS."""
    monkeypatch.setenv("NARUN_LOG_LEVEL", "debug")  # workers log actor.vitals each beat
    steps = 2000
    data = to_dict(make_config("ps-sync", 2, steps=steps, eval_every=10,
                               checkpoint_every=100, keep_checkpoints=2, warmup_steps=10))
    data["model"]["sizes"] = [16, 512, 512, 4]
    data["runtime"]["heartbeat_interval"] = 0.2
    cfg = config_from_dict(data)
    reporter = Vitals()
    done = run(Coordinator(cfg, reporter, wait_timeout=60.0))
    assert done["step"] == steps and np.isfinite(done["val_loss"])
    assert_flat("coordinator", reporter.samples, steps)
    workers = _worker_vitals(Path(cfg.training.out_dir) / "logs")
    assert sorted(workers) == ["ps-0", "ps-1", "trainer-0", "trainer-1"]
    for name, samples in workers.items():
        assert_flat(name, samples, steps)
    assert list((Path(cfg.training.out_dir) / ".shards").glob("step-*")) == []


class SlowEvals(JsonLinesReporter):
    """A slow consumer of eval events (a dashboard, a slow disk): the coordinator lags."""

    def __init__(self) -> None:
        super().__init__(io.StringIO())
        self.coordinator: Coordinator | None = None
        self.leads: list[int] = []

    def emit(self, event: str, **fields) -> None:
        super().emit(event, **fields)
        if event == "eval":
            assert self.coordinator is not None
            self.leads.append(max(self.coordinator._latest.values()) - fields["step"])
            time.sleep(0.1)


@pytest.mark.timeout(120)
def test_trainers_wait_for_a_slow_coordinator_instead_of_piling_up_snapshots(make_config):
    """Each eval step leaves every shard a copy of its buckets until the coordinator takes
    it; without a bound, trainers ahead of a slow coordinator leave one copy per eval step
    they pass (unbounded memory). With it they stay within MAX_SNAPSHOTS eval steps."""
    from workers.parameter_server import MAX_SNAPSHOTS

    every = 5
    cfg = make_config("ps-sync", 2, steps=200, eval_every=every)
    reporter = SlowEvals()
    reporter.coordinator = Coordinator(cfg, reporter, bucket_bytes=512, wait_timeout=30.0)
    run(reporter.coordinator)
    assert len(reporter.leads) == 200 // every - 1
    # a trainer may finish the step after the newest snapshot before it is held
    assert max(reporter.leads) <= every * MAX_SNAPSHOTS + 1, reporter.leads
