"""A BatchNorm model in ps-sync: each trainer keeps its own running statistics (DDP
without SyncBatchNorm), the shards average gradients, and the coordinator evaluates and
checkpoints with trainer 0's statistics. Checked against that process simulated in one:
two copies of the model, each on its half of the batch, one optimizer stepping on the
mean gradient."""

from __future__ import annotations

import copy
import signal

import numpy as np
import pytest
import uvloop

from narun.checkpoint import load_checkpoint
from narun.config import config_from_dict
from narun.data import make_shapes_npz
from narun.runtime import Coordinator
from narun.train import build_job
from tests.integration.conftest import Faults, assert_all_gone

STEPS, EVAL_AT = 4, 2


def resnet_config(data, out_dir, mode: str, workers: int):
    return config_from_dict({
        "model": {"name": "resnet", "num_classes": 4, "channels": [4, 8], "blocks": [1, 1]},
        "data": {"kind": "arrays", "path": str(data), "val_fraction": 0.25},
        "training": {"steps": STEPS, "batch_size": 16, "optimizer": "adam", "lr": 1e-2,
                     "weight_decay": 0.0, "schedule": "constant", "warmup_steps": 0,
                     "grad_clip": None, "eval_every": EVAL_AT, "checkpoint_every": 0,
                     "out_dir": str(out_dir)},
        "runtime": {"mode": mode, "workers": workers, "ps_shards": 2,
                    "heartbeat_interval": 0.5, "heartbeat_timeout": 5.0}})


def simulate(cfg, workers: int):
    """The ps-sync job in one process: per step, each replica's loss on its slice of the
    batch (its BatchNorm statistics its own), the gradients' mean into replica 0, one
    optimizer step, the new values copied to the others."""
    job = build_job(cfg)
    replicas = [job.model] + [copy.deepcopy(job.model) for _ in range(workers - 1)]
    evals = {}
    for step in range(STEPS):
        x, y = job.batch(step)
        share = len(x) // workers
        for r, model in enumerate(replicas):
            job.model = model
            model.zero_grad()
            job.loss(x[r * share:(r + 1) * share], y[r * share:(r + 1) * share]).backward()
        job.model = replicas[0]
        for ps in zip(*(m.parameters() for m in replicas)):
            mean = sum(p.grad.numpy() for p in ps) * np.float32(1.0 / workers)
            ps[0].grad.data[...] = mean
        job.optimizer.step()
        job.scheduler.step()
        for other in replicas[1:]:
            for mine, theirs in zip(replicas[0].parameters(), other.parameters()):
                theirs.data[...] = mine.data
        if step + 1 == EVAL_AT:
            evals[step + 1] = job.evaluate()
    return job, replicas, evals


class Held(Faults):
    """Counts the statistics the coordinator holds at each step."""

    def __init__(self) -> None:
        super().__init__({})
        self.held: list[int] = []

    def emit(self, event: str, **fields) -> None:
        super().emit(event, **fields)
        if event == "step":
            ahead = self.coordinator._latest[0] - fields["step"]
            self.held.append((len(self.coordinator._buffers), ahead))


def run(cfg, reporter, **options):
    coordinator = Coordinator(cfg, reporter, wait_timeout=30.0, **options)
    reporter.coordinator = coordinator
    try:
        done = uvloop.run(coordinator.run())
    finally:
        assert_all_gone(coordinator.pids)
    assert done["step"] == STEPS and not done["interrupted"]
    return done


def assert_trainer_zeros_statistics(done, replicas):
    ckpt = load_checkpoint(done["checkpoint"])
    state = replicas[0].state_dict()
    assert set(ckpt.model) == set(state)
    stats = [k for k in state if k.endswith(("running_mean", "running_var"))]
    assert stats  # the model has BatchNorm statistics to check
    for name, value in state.items():
        np.testing.assert_allclose(ckpt.model[name], value.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    # trainer 0's, not trainer 1's (they saw other images), nor the initial ones
    other = replicas[1].state_dict()
    for name in stats:
        assert np.abs(other[name].numpy() - state[name].numpy()).max() > 1e-4, name
    assert int(ckpt.model["bn.num_batches_tracked"]) == STEPS


@pytest.mark.timeout(90)
def test_ps_sync_resnet_keeps_trainer_zeros_batchnorm_statistics(tmp_path):
    data = make_shapes_npz(tmp_path / "shapes.npz", n=64, size=16)
    job, replicas, evals = simulate(resnet_config(data, tmp_path / "sim", "local", 1), 2)
    want_val = job.evaluate(None)
    reporter = Held()
    done = run(resnet_config(data, tmp_path / "dist", "ps-sync", 2), reporter)
    assert_trainer_zeros_statistics(done, replicas)
    # the coordinator keeps the statistics of the last completed step (or the latest before
    # it) and those of steps trainer 0 finished since, no more
    assert all(held <= 1 + ahead for held, ahead in reporter.held), reporter.held
    # evaluation in the middle and at the end ran with those statistics
    assert [e["step"] for e in reporter.of("eval")] == [EVAL_AT]
    assert reporter.of("eval")[0]["val_loss"] == pytest.approx(evals[EVAL_AT], rel=1e-5)
    assert done["val_loss"] == pytest.approx(want_val, rel=1e-5)


@pytest.mark.timeout(120)
def test_a_replaced_trainer_zero_goes_on_from_the_statistics_it_reported(tmp_path):
    """Killed (-9) while it waits to start step 2 (a delay before each of its steps), trainer
    0's replacement rejoins at step 2 with the statistics the coordinator holds from its
    last report: the job ends where the unbroken one does (fresh statistics would not)."""
    data = make_shapes_npz(tmp_path / "shapes.npz", n=64, size=16)
    _, replicas, _ = simulate(resnet_config(data, tmp_path / "sim", "local", 1), 2)
    reporter = Faults({2: ("trainer", 0, signal.SIGKILL)})
    done = run(resnet_config(data, tmp_path / "dist", "ps-sync", 2), reporter,
               delays={0: 0.5})
    assert [(r["rank"], r["rejoins_at"]) for r in reporter.of("restart")] == [(0, 2)]
    assert_trainer_zeros_statistics(done, replicas)


@pytest.mark.timeout(90)
def test_ps_async_checkpoints_and_evaluates_with_trainer_zeros_statistics(tmp_path):
    """No one-process equal in ps-async; what must hold: the checkpoint holds trainer 0's
    statistics (it took all STEPS steps), and the final validation loss is that checkpoint's."""
    data = make_shapes_npz(tmp_path / "shapes.npz", n=64, size=16)
    done = run(resnet_config(data, tmp_path / "dist", "ps-async", 2), Faults({}))
    ckpt = load_checkpoint(done["checkpoint"])
    assert int(ckpt.model["bn.num_batches_tracked"]) == STEPS
    assert np.abs(ckpt.model["bn.running_var"] - 1.0).max() > 1e-3  # moved from the start
    job = build_job(resnet_config(data, tmp_path / "check", "local", 1))
    job.model.load_state_dict(ckpt.model)
    assert done["val_loss"] == pytest.approx(job.evaluate(None), rel=1e-5)
