"""Process lifecycle: failures are reported at once and no process is ever left behind."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import uvloop
import yaml

from narun.checkpoint import latest_good, load_checkpoint, verify_checkpoint
from narun.config import to_dict
from narun.errors import ActorDiedError, ConfigError
from narun.events import JsonLinesReporter
from narun.runtime import Coordinator
from narun.runtime.supervision import StartupFailure
from tests.integration.conftest import Faults, assert_all_gone

ROOT = Path(__file__).resolve().parents[2]


def run_killing(cfg, role, rank, sig, **options):
    reporter = Faults({2: (role, rank, sig)})
    coordinator = Coordinator(cfg, reporter, bucket_bytes=512, wait_timeout=30.0,
                              delays={0: 0.05, 1: 0.05}, **options)
    reporter.coordinator = coordinator
    began = time.monotonic()
    try:
        with pytest.raises(ActorDiedError) as info:
            uvloop.run(coordinator.run())
    finally:
        assert_all_gone(coordinator.pids)
    return str(info.value), time.monotonic() - began


@pytest.mark.timeout(60)
@pytest.mark.parametrize("role, rank", [("trainer", 1), ("ps", 0)])
def test_a_killed_process_fails_the_job_at_once_without_restarts(make_config, role, rank):
    cfg = make_config("ps-sync", 2, steps=200, max_restarts=0)
    text, seconds = run_killing(cfg, role, rank, signal.SIGKILL)
    assert f"{role} {rank}" in text and "killed by signal 9" in text, text
    assert "exceed runtime.max_restarts 0" in text, text
    assert seconds < 20  # not a timeout: found by the process exit


@pytest.mark.timeout(60)
def test_a_hung_trainer_is_found_by_its_missing_heartbeats(make_config):
    cfg = make_config("ps-sync", 2, steps=200, heartbeat_timeout=2.0, max_restarts=0)
    text, seconds = run_killing(cfg, "trainer", 0, signal.SIGSTOP)
    assert seconds < 15
    assert "trainer 0" in text and "no heartbeat" in text, text


def test_unsupported_settings_fail_before_any_process_starts(make_config):
    cfg = make_config("ps-sync", 2, grad_accum=4)  # divides the batch 12, not its half
    with pytest.raises(ConfigError, match="training.grad_accum: 4 does not divide the "
                                          "per-trainer batch 6"):
        Coordinator(cfg, JsonLinesReporter(io.StringIO()))
    with pytest.raises(ConfigError, match="runtime.mode"):
        Coordinator(make_config("local", 0), JsonLinesReporter(io.StringIO()))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl-c"])
def test_cli_signal_drains_checkpoints_and_exits_as_one_process_does(make_config, tmp_path,
                                                                    ctrl_c):
    """`narun train --workers 2 --ps-shards 2 --mode ps-sync`, then SIGTERM (exit 0) or
    Ctrl-C, SIGINT to the whole foreground process group (exit 130), as one process: the
    trainers finish their step, the coordinator writes a checkpoint that resumes, nothing is
    left."""
    cfg = to_dict(make_config("ps-sync", 2, steps=500))
    path = tmp_path / "job.yaml"
    cfg["runtime"].update(workers=0, mode="local")  # the flags below set them
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "narun.cli", "train", str(path), "--workers", "2",
         "--ps-shards", "2", "--mode", "ps-sync", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True)  # its own process group, as a shell's foreground job
    try:
        events = []
        for line in proc.stdout:
            events.append(json.loads(line))
            if events[-1]["event"] == "step" and events[-1]["step"] == 3:
                assert len(_workers_mentioning(str(tmp_path))) == 4
                if ctrl_c:
                    os.killpg(proc.pid, signal.SIGINT)
                else:
                    proc.send_signal(signal.SIGTERM)
                break
        events += [json.loads(line) for line in proc.stdout]
        assert proc.wait(timeout=30) == (130 if ctrl_c else 0), proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    done = events[-1]
    assert done["event"] == "done" and done["interrupted"], events[-3:]
    assert 3 <= done["step"] < 500
    assert done["checkpoint"].endswith(f"step-{done['step']:06d}")
    verify_checkpoint(done["checkpoint"])  # complete: every shard's slice, checksums match
    assert load_checkpoint(done["checkpoint"]).step == done["step"]
    assert _workers_mentioning(str(tmp_path)) == []


@pytest.mark.timeout(120)
def test_a_coordinator_killed_with_sigkill_leaves_no_worker_and_resume_auto_finishes(
        make_config, tmp_path):
    """No cleanup code runs in a SIGKILLed coordinator: the workers still go (their parent-
    death signal, and the coordinator connection dropping). `--resume auto` then continues
    from the newest checkpoint, losing no step before it, to the unfaulted result."""
    cfg = make_config("ps-sync", 2, steps=120, checkpoint_every=10)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    proc = subprocess.Popen([sys.executable, "-m", "narun.cli", "train", str(path), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=ROOT)
    try:
        for line in proc.stdout:
            if json.loads(line)["event"] == "checkpoint":
                break
        assert len(_workers_mentioning(str(tmp_path))) == 4
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while _workers_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _workers_mentioning(str(tmp_path)) == []

    newest = latest_good(Path(cfg.training.out_dir) / "checkpoints")
    assert newest is not None
    saved = int(newest.name.removeprefix("step-"))
    out = subprocess.run([sys.executable, "-m", "narun.cli", "train", str(path), "--json",
                          "--resume", "auto"], capture_output=True, text=True, cwd=ROOT,
                         timeout=90)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == list(range(saved + 1, 121))  # from the checkpoint on, nothing skipped
    # the line and the event a one-process resume gives (issue 12, item 6)
    assert [e for e in events if e["event"] == "resumed"] == [
        {"event": "resumed", "step": saved, "checkpoint": str(newest)}]
    assert "resumed" in out.stderr and str(newest) in out.stderr, out.stderr
    unfaulted = uvloop.run(Coordinator(make_config("ps-sync", 2, out="base", steps=120),
                                       JsonLinesReporter(io.StringIO())).run())
    assert events[-1]["val_loss"] == pytest.approx(unfaulted["val_loss"], rel=1e-6)


def _workers_mentioning(text: str) -> list[int]:
    """Pids of live `python -m workers` processes whose command line holds `text` (the spec
    carries the run's out_dir, unique to this test)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "-m\x00workers\x00" in cmdline and text in cmdline:
                found.append(int(entry.name))
    return found


class SkewedSpec(Coordinator):
    """Hands its workers a spec with a key they do not know, as a coordinator of another
    narun version might."""

    def _spec(self, **changes):
        spec = super()._spec(**changes)
        text = spec.to_json()
        spec.to_json = lambda: text[:-1] + ',"from_the_future":1}'  # type: ignore[method-assign]
        return spec


@pytest.mark.timeout(60)
def test_a_worker_failing_before_it_joins_fails_the_job_at_once_without_restarts(make_config):
    coordinator = SkewedSpec(make_config("ps-sync", 2, max_restarts=3),
                             JsonLinesReporter(io.StringIO()))
    began = time.monotonic()
    try:
        with pytest.raises(StartupFailure, match="from_the_future") as info:
            uvloop.run(coordinator.run())
    finally:
        assert_all_gone(coordinator.pids)
    assert "before joining the job" in str(info.value)
    assert len(coordinator.pids) == 4  # nobody was restarted
    assert time.monotonic() - began < 20


@pytest.mark.timeout(60)
def test_wait_timeout_bounds_each_wait_not_the_whole_job(make_config):
    cfg = make_config("ps-sync", 2, steps=150)
    coordinator = Coordinator(cfg, JsonLinesReporter(io.StringIO()), wait_timeout=5.0,
                              delays={0: 0.05, 1: 0.05})
    began = time.monotonic()
    try:
        assert uvloop.run(coordinator.run())["step"] == 150
    finally:
        assert_all_gone(coordinator.pids)
    assert time.monotonic() - began > 7.5  # the job outlived one wait_timeout


class StallAt(JsonLinesReporter):
    """Blocks the coordinator's loop for `seconds` when `step` is reported."""

    def __init__(self, step: int, seconds: float) -> None:
        super().__init__(io.StringIO())
        self.step, self.seconds = step, seconds

    def emit(self, event: str, **fields) -> None:
        super().emit(event, **fields)
        if event == "step" and fields["step"] == self.step:
            time.sleep(self.seconds)


@pytest.mark.timeout(60)
def test_trainers_that_finish_before_the_coordinator_catches_up_still_count(make_config):
    """The coordinator stalls (a slow checkpoint, a loaded machine) while the trainers run
    to the end and exit: their reports still complete every step."""
    coordinator = Coordinator(make_config("ps-sync", 2, steps=30), StallAt(2, 3.0),
                              wait_timeout=8.0)
    try:
        done = uvloop.run(coordinator.run())
    finally:
        assert_all_gone(coordinator.pids)
    assert done["step"] == 30 and not done["interrupted"]
