"""Pipeline-parallel jobs with real stage processes: what `narun train` local gives, for
both schedules, with clipping across stages and the GPT's tied embedding split over the end
stages; checkpoints that are ordinary ones; a stage killed with -9 rolls the job back and it
completes; nothing is left running."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from narun.checkpoint import load_checkpoint
from narun.config import config_from_dict
from narun.errors import ConfigError
from narun.models import load_trained
from narun.runtime import launcher
from narun.runtime.pipeline import PipelineCoordinator
from narun.train import check_job
from narun.train import train as local_train
from tests.integration.conftest import Faults


def gpt_config(out: Path, mode: str = "pipeline", stages: int = 2, micro_batches: int = 4,
               schedule: str = "1f1b", workers: int = 0, ps_shards: int = 1, **training):
    t = {"steps": 10, "batch_size": 8, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.1,
         "schedule": "cosine", "warmup_steps": 2, "grad_clip": 1.0, "eval_every": 5,
         "checkpoint_every": 5, "out_dir": str(out), **training}
    return config_from_dict({
        "model": {"name": "gpt", "preset": "gpt2-tiny", "block_size": 32, "n_layer": 4},
        "data": {"kind": "text", "seq_len": 32},
        "training": t,
        "runtime": {"mode": mode, "stages": stages if mode == "pipeline" else 0,
                    "workers": workers if mode == "pipeline" else 0, "ps_shards": ps_shards,
                    "micro_batches": micro_batches, "schedule": schedule,
                    "heartbeat_interval": 0.5, "heartbeat_timeout": 5.0}})


def run_pipeline(cfg, reporter=None, **options):
    reporter = reporter or Faults({})
    coordinator = PipelineCoordinator(cfg, reporter, **options)
    if isinstance(reporter, Faults):
        reporter.coordinator = coordinator
    import uvloop

    return uvloop.run(coordinator.run()), reporter, coordinator


def assert_close_models(a: str, b: str, rtol: float = 1e-5) -> None:
    """Parameters norm-relative within rtol as a whole, and elementwise at the tolerances
    torch.distributed.pipelining's tests use (rtol 1e-5, atol 4e-5): a near-zero bias's
    Adam step divides by its tiny gradient's own scale, so float32 rounding of the summed
    micro-batch gradients moves it by ~1e-6."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step and set(ca.model) == set(cb.model)
    diff = np.sqrt(sum(float(np.sum((ca.model[k] - cb.model[k]) ** 2)) for k in cb.model))
    norm = np.sqrt(sum(float(np.sum(cb.model[k] ** 2)) for k in cb.model))
    assert diff / norm <= rtol
    for name in cb.model:
        np.testing.assert_allclose(ca.model[name], cb.model[name], rtol=rtol, atol=4e-5,
                                   err_msg=name)
    assert ca.extra["scheduler"] == cb.extra["scheduler"]


def test_pipeline_x_data_parallel_trains_as_one_process(tmp_path):
    """p = 2 stages x r = 2 replicas, each replica a quarter of each batch in 2 micro-batches;
    each stage's replicas average through its own shard, which steps the stage (clipped by
    the norm over both shards, the tied embedding counted once)."""
    local = Faults({})
    want = local_train(gpt_config(tmp_path / "local", mode="local"), local)
    done, faults, _ = run_pipeline(gpt_config(tmp_path / "pipe", workers=2, micro_batches=2))
    assert done["step"] == 10 and not done["interrupted"]
    [placement] = faults.of("placement")
    assert placement["replicas"] == 2
    assert len(faults.of("step")[-1]["stages"]) == 4  # p x r stage processes reported
    np.testing.assert_allclose([e["loss"] for e in faults.of("step")],
                               [e["loss"] for e in local.of("step")], rtol=1e-5)
    assert done["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    for step in (5, 10):
        assert_close_models(f"{tmp_path}/pipe/checkpoints/step-{step:06d}",
                            f"{tmp_path}/local/checkpoints/step-{step:06d}")
    assert launcher.live_pids() == []


@pytest.mark.parametrize("schedule,stages", [("1f1b", 2), ("gpipe", 3)])
def test_a_pipelined_gpt_trains_as_one_process(tmp_path, schedule, stages):
    want = local_train(gpt_config(tmp_path / "local", mode="local"), Faults({}))
    done, faults, _ = run_pipeline(gpt_config(tmp_path / "pipe", stages=stages,
                                              schedule=schedule))
    assert done["step"] == 10 and not done["interrupted"]
    [placement] = faults.of("placement")
    assert [s["stage"] for s in placement["stages"]] == list(range(stages))
    # the activations each stage held at most: 1F1B p - stage, GPipe all 4 micro-batches
    held = [s["held"] for s in faults.of("step")[-1]["stages"]]
    assert held == ([stages - s for s in range(stages)] if schedule == "1f1b" else
                    [4] * stages)
    assert done["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    for step in (5, 10):
        assert_close_models(f"{tmp_path}/pipe/checkpoints/step-{step:06d}",
                            f"{tmp_path}/local/checkpoints/step-{step:06d}")
    # an ordinary checkpoint: it loads as a model, and the tied weight is one array
    model, cfg, _, _ = load_trained(f"{tmp_path}/pipe/checkpoints/step-000010")
    assert model.config.tie_weights and cfg.runtime.mode == "pipeline"
    assert launcher.live_pids() == []


def test_losses_per_step_are_one_process_losses(tmp_path):
    local = Faults({})
    local_train(gpt_config(tmp_path / "local", mode="local", grad_clip=None), local)
    _, piped, _ = run_pipeline(gpt_config(tmp_path / "pipe", grad_clip=None, micro_batches=2))
    want = [e["loss"] for e in local.of("step")]
    got = [e["loss"] for e in piped.of("step")]
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("workers,victim", [
    (0, ("stage", 1)),
    (2, ("stage", 3)),  # replica 1 of stage 1
    (2, ("ps", 1)),     # the shard of stage 1, with its optimizer state
])
def test_a_stage_killed_with_sigkill_rolls_the_job_back_and_it_completes(tmp_path, workers,
                                                                          victim):
    faults = Faults({7: (*victim, signal.SIGKILL)})
    # the stages wait 0.1 s before each step, so the kill lands while they still run
    done, faults, coordinator = run_pipeline(
        gpt_config(tmp_path / "pipe", workers=workers, micro_batches=4 // max(workers, 1)),
        faults, delays={0: 0.1})
    assert done["step"] == 10 and not done["interrupted"] and done["restarts"] == 1
    [restart] = faults.of("restart")
    assert (restart["role"], restart["rank"]) == victim
    assert restart["rolled_back_to"] == 5  # the last checkpoint
    want = local_train(gpt_config(tmp_path / "local", mode="local"), Faults({}))
    assert done["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert_close_models(f"{tmp_path}/pipe/checkpoints/step-000010",
                        f"{tmp_path}/local/checkpoints/step-000010")
    assert launcher.live_pids() == []


@pytest.mark.parametrize("change,match", [
    ({"stages": 1}, "at least 2"),
    ({"stages": 5}, "at most 4"),
    ({"stages": 4, "micro_batches": 2}, "micro_batches"),
    ({"micro_batches": 3}, "batch_size"),
    # pipeline x data parallel: 8 rows split over 3 replicas, or 4 a replica in 8 micro-batches
    ({"workers": 3}, "multiple of 3"),
    ({"workers": 2, "micro_batches": 8}, "share of the batch"),
    ({"workers": 2, "ps_shards": 2}, "one shard per stage"),
])
def test_configs_that_cannot_run_are_refused_before_anything_starts(tmp_path, change, match):
    options = {"stages": 2, "micro_batches": 4, **change}
    with pytest.raises(ConfigError, match=match):
        check_job(gpt_config(tmp_path, **options))


@pytest.mark.parametrize("workers,slots", [(0, 1), (2, 3)])  # 2 stages; x 2 replicas + 2 shards
def test_narun_launch_runs_the_stages_on_agents_as_narun_train_does(tmp_path, workers, slots):
    import io
    import json

    from narun.events import JsonLinesReporter
    from narun.runtime.launch import launch
    from tests.integration.agents import AgentProcess

    agents = [AgentProcess("tcp://127.0.0.1:0", tmp_path / f"agent{i}", slots=slots)
              for i in range(2)]
    try:
        cfg = gpt_config(tmp_path / "launched", workers=workers,
                         micro_batches=4 // max(workers, 1))
        cfg.runtime.hosts = [a.endpoint.removeprefix("tcp://") for a in agents]
        out = io.StringIO()
        done = launch(cfg, None, JsonLinesReporter(out), wait_timeout=60.0)
    finally:
        codes = [a.stop() for a in agents]
    assert codes == [0, 0]
    assert done["step"] == 10 and not done["interrupted"]
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    hosts = {p["host"] for e in events if e["event"] == "placement" and "processes" in e
             for p in e["processes"]}
    assert len(hosts) == 2  # the processes spread over both agents
    local_train(gpt_config(tmp_path / "local", mode="local"), Faults({}))
    for step in (5, 10):  # slices fetched from the agents' hosts into ordinary checkpoints
        assert_close_models(f"{tmp_path}/launched/checkpoints/step-{step:06d}",
                            f"{tmp_path}/local/checkpoints/step-{step:06d}")


def test_a_pipeline_checkpoint_resumes_in_one_process(tmp_path):
    # 5 pipelined steps, then 5 more in one process from that checkpoint (model, optimizer
    # and schedule state all in it) end where 10 steps in one process end
    done, _, _ = run_pipeline(gpt_config(tmp_path / "pipe"), stop_at=5)
    assert done["step"] == 5 and done["interrupted"]
    local_train(gpt_config(tmp_path / "pipe", mode="local"), Faults({}),
                resume=str(tmp_path / "pipe/checkpoints/step-000005"))
    local_train(gpt_config(tmp_path / "local", mode="local"), Faults({}))
    assert_close_models(f"{tmp_path}/pipe/checkpoints/step-000010",
                        f"{tmp_path}/local/checkpoints/step-000010")
