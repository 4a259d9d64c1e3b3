"""The coordinator's initial-state file (narun.runtime.shard_start): the shards start from it,
a rollback before the first checkpoint starts them from it again, it exists while the run
does and not after, and files that killed coordinators left behind are removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import uvloop

from narun.checkpoint import load_checkpoint
from narun.checkpoint._fs import temp_tag
from narun.runtime import Coordinator
from tests.integration.conftest import Faults, assert_all_gone


class Watch(Faults):
    """Faults that also lists the coordinator's directory at every step event."""

    def __init__(self, plan, directory: Path) -> None:
        super().__init__(plan)
        self.directory = directory
        self.seen: set[str] = set()

    def emit(self, event: str, **fields) -> None:
        if event == "step":
            self.seen.update(p.name for p in self.directory.iterdir())
        super().emit(event, **fields)


def run(cfg, reporter):
    coordinator = Coordinator(cfg, reporter, wait_timeout=30.0, delays={0: 0.05, 1: 0.05})
    reporter.coordinator = coordinator
    try:
        return uvloop.run(coordinator.run())
    finally:
        assert_all_gone(coordinator.pids)


@pytest.mark.timeout(90)
def test_a_shard_killed_before_the_first_checkpoint_restarts_from_the_init_file(make_config):
    """Shard 1 dies at step 4, before the step-10 checkpoint: every process restarts from
    the initial values and the run ends bit for bit where an unfaulted one does."""
    options = dict(steps=12, lr=3e-3, checkpoint_every=10)
    unfaulted = run(make_config("ps-sync", 2, out="unfaulted", **options), Faults({}))
    cfg = make_config("ps-sync", 2, out="dist", **options)
    directory = Path(cfg.training.out_dir) / ".coordinator"
    directory.mkdir(parents=True)
    host = temp_tag().split("-")[1]
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    (directory / f"init-{host}-{gone}.safetensors").write_bytes(b"a killed coordinator's")
    other = f"init-{host}-{os.getppid()}.safetensors"  # a live process's: another job's
    (directory / other).write_bytes(b"a running coordinator's")
    ours = f"init-{host}-{os.getpid()}.safetensors"  # the coordinator runs in this process

    reporter = Watch({4: ("ps", 1, signal.SIGKILL)}, directory)
    done = run(cfg, reporter)
    assert done["step"] == 12 and done["restarts"] == 1
    (restart,) = reporter.of("restart")
    assert (restart["role"], restart["rank"], restart["step"]) == ("ps", 1, 0)
    assert [s["step"] for s in reporter.of("step")].count(1) == 2  # redone from the start
    a, b = load_checkpoint(unfaulted["checkpoint"]), load_checkpoint(done["checkpoint"])
    for name, value in a.model.items():
        np.testing.assert_array_equal(b.model[name], value, err_msg=name)
    assert reporter.seen == {ours, other}  # ours while running; the dead one's removed
    assert sorted(p.name for p in directory.iterdir()) == [other]
