"""The coordinator records a distributed run as one-process training does (narun.runlog):
events.jsonl holds every event it emitted, placement included under launch, and
TensorBoard holds the steps' scalars, step time by phase too."""

from __future__ import annotations

import io
import json
import signal

import numpy as np
import pytest
import uvloop

from narun.events import JsonLinesReporter, ListReporter
from narun.runlog import read_events
from narun.runtime import Coordinator, train
from narun.runtime.coordinator import TIMINGS
from narun.runtime.launch import launch
from narun.runtime.supervision import RestartBudgetExhausted
from tests.integration.agents import AgentProcess
from tests.integration.conftest import Faults, assert_all_gone
from tests.narun.test_runlog import as_json, assert_same_scalars, expected_scalars, scalars

pytest.importorskip("tensorboard")
pytest.importorskip("tensorboardX")


@pytest.mark.timeout(120)
def test_a_ps_sync_run_records_its_events_and_tensorboard_scalars(make_config):
    cfg = make_config("ps-sync", 2, eval_every=5, tensorboard=True)
    reporter = ListReporter()
    done = train(cfg, reporter, wait_timeout=30.0)
    assert done["step"] == 10
    run = cfg.training.out_dir
    assert read_events(run) == as_json(reporter.events)
    got = scalars(f"{run}/tensorboard")
    steps = [e for e in reporter.events if e["event"] == "step"]
    phases = {f"time/{p}": [(e["step"], e["timings"][p]) for e in steps]
              for p in TIMINGS}
    assert_same_scalars(got, expected_scalars(reporter.events) | phases)
    assert [s for s, _ in got["val_loss"]] == [5, 10]


@pytest.mark.timeout(120)
def test_launch_records_placement_with_the_rest(make_config, tmp_path):
    agent = AgentProcess("tcp://127.0.0.1:0", tmp_path / "agent", slots=4)
    try:
        cfg = make_config("ps-sync", 2, steps=4)
        cfg.runtime.hosts = [agent.endpoint.removeprefix("tcp://")]
        out = io.StringIO()
        done = launch(cfg, None, JsonLinesReporter(out), wait_timeout=30.0)
    finally:
        assert agent.stop() == 0
    shown = [json.loads(line) for line in out.getvalue().splitlines()]
    assert done["step"] == 4 and shown[0]["event"] == "placement"
    recorded = read_events(cfg.training.out_dir)
    assert recorded == shown
    np.testing.assert_array_equal([e["step"] for e in recorded if e["event"] == "step"],
                                  [1, 2, 3, 4])


@pytest.mark.timeout(60)
def test_a_failed_job_closes_its_records(make_config):
    cfg = make_config("ps-sync", 2, steps=200, max_restarts=0, tensorboard=True)
    reporter = Faults({3: ("trainer", 1, signal.SIGKILL)})
    coordinator = Coordinator(cfg, reporter, wait_timeout=30.0)
    reporter.coordinator = coordinator
    try:
        with pytest.raises(RestartBudgetExhausted):
            uvloop.run(coordinator.run())
    finally:
        assert_all_gone(coordinator.pids)
    tee = coordinator.reporter
    _, log, tensorboard = tee.reporters
    assert tee.closed and log._file is None and tensorboard._writer is None
    recorded = read_events(cfg.training.out_dir)
    assert recorded == as_json([{"event": e, **f} for e, f in reporter.events])
    assert [e["step"] for e in recorded if e["event"] == "step"][:3] == [1, 2, 3]
    assert scalars(f"{cfg.training.out_dir}/tensorboard")["loss"][:3] == [
        (e["step"], pytest.approx(e["loss"], rel=1e-6)) for e in recorded[:3]]
