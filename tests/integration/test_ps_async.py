"""ps-async with real processes: converges, and refuses pushes staler than max_staleness."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import uvloop

from narun.checkpoint import load_checkpoint
from narun.config import config_from_dict, to_dict
from narun.events import JsonLinesReporter
from narun.runtime import Coordinator
from tests.integration.conftest import Recorder, assert_all_gone


def run(cfg, coordinator_class=Coordinator, **options):
    out = io.StringIO()
    coordinator = coordinator_class(cfg, JsonLinesReporter(out), bucket_bytes=512,
                                    wait_timeout=30.0, **options)
    try:
        done = uvloop.run(coordinator.run())
    finally:
        assert_all_gone(coordinator.pids)
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    if coordinator_class is Coordinator:
        return done, events
    return done, events, coordinator


def with_staleness(cfg, n):
    data = to_dict(cfg)
    data["runtime"]["max_staleness"] = n
    return config_from_dict(data)


@pytest.mark.timeout(60)
def test_ps_async_converges_on_the_mlp(make_config):
    cfg = make_config("ps-async", 2, steps=40, lr=1e-2, schedule="constant", warmup_steps=0)
    done, events = run(cfg)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 41))
    assert done["val_loss"] < min(0.1, steps[0]["loss"] / 4), (steps[0]["loss"],
                                                                done["val_loss"])
    assert load_checkpoint(done["checkpoint"]).step == 40


@pytest.mark.timeout(60)
def test_ps_async_with_one_trainer_clips_like_one_process(make_config):
    """One trainer's pushes are one process's steps; with grad_clip the trainer clips its
    own gradient before pushing (0.05 clips every step)."""
    from narun.train import train as local_train
    from tests.integration.conftest import assert_same_checkpoint

    reference = local_train(make_config("local", 0, out="local", grad_clip=0.05),
                            JsonLinesReporter(io.StringIO()))
    done, _ = run(make_config("ps-async", 1, out="dist", grad_clip=0.05))
    assert_same_checkpoint(reference["checkpoint"], done["checkpoint"])


@pytest.mark.timeout(60)
def test_ps_async_refuses_stale_pushes_and_still_trains(make_config):
    """Trainer 1 sleeps 0.2 s before each step, trainer 0 only 0.03 s: while trainer 0 runs,
    each of trainer 1's pushes is ~6 versions old, over max_staleness 1, so it is refused;
    trainer 1 re-pulls, recomputes at once, and the job still finishes."""
    cfg = with_staleness(make_config("ps-async", 2, steps=12, schedule="constant",
                                     warmup_steps=0), 1)
    done, events = run(cfg, delays={0: 0.03, 1: 0.2})
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 13))
    assert steps[-1]["stale"] >= 2  # refusals so far, summed over trainers
    assert np.isfinite(done["val_loss"]) and done["val_loss"] < 1.0


@pytest.mark.timeout(60)
def test_ps_async_bound_large_enough_refuses_nothing(make_config):
    cfg = with_staleness(make_config("ps-async", 2, steps=8), 100)
    done, events = run(cfg, delays={1: 0.05})
    assert [e for e in events if e["event"] == "step"][-1]["stale"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("staleness", [1, 2])
def test_ps_async_keeps_every_trainer_within_max_staleness_of_the_slowest(make_config,
                                                                          staleness):
    """The SSP bound, from the trainers' step_done reports as the coordinator receives them.

    A trainer reports step s + 1 once its pushes of step s returned, and a shard lets a push
    of step s through only when every other trainer has pushed step >= s - max_staleness;
    a trainer pushes step c only after reporting c. So when a trainer's report s + 1
    arrives, every other has reported at least s - max_staleness: the reports never differ
    by more than max_staleness + 1 (reports sent before a push arrive before the answers
    that push caused). Trainer 1 is slow (0.15 s per step), so trainer 0 runs into the
    bound: the test also asserts it was reached."""
    cfg = with_staleness(make_config("ps-async", 2, steps=12, schedule="constant",
                                     warmup_steps=0), staleness)
    done, events, coordinator = run(cfg, Recorder, delays={1: 0.15})
    assert done["step"] == 12 and not done["interrupted"]
    latest = {0: 0, 1: 0}
    spreads = []
    for rank, step, _pid in coordinator.reports:
        latest[rank] = max(latest[rank], step)
        spreads.append(max(latest.values()) - min(latest.values()))
    assert max(spreads) == staleness + 1, (max(spreads), coordinator.reports)
