"""What a run records beside its checkpoints: events.jsonl (every run) and TensorBoard event
files (training.tensorboard), read back and compared with the events the run emitted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import narun.models  # noqa: F401  (registers model fields)
from narun.config import config_from_dict
from narun.data import make_classification_npz
from narun.errors import ConfigError
from narun.events import ListReporter
from narun.runlog import EventLogReporter, TensorBoardReporter, read_events
from narun.train import check_job, train

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")
pytest.importorskip("tensorboardX")


ROOT = Path(__file__).resolve().parents[2]


def narun_cli(*args, missing=()):
    """`narun ARGS` in a subprocess, as if the modules `missing` were not installed."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({list(missing)!r})); "
            f"from narun.cli import main; sys.exit(main({list(map(str, args))!r}))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          encoding="utf-8", timeout=60,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return make_classification_npz(tmp_path_factory.mktemp("data") / "blobs.npz", n=400,
                                   seed=1)


def mlp(blobs, out_dir, **training):
    t = {"steps": 20, "batch_size": 16, "optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0,
         "schedule": "cosine", "warmup_steps": 3, "grad_clip": None, "eval_every": 5,
         "checkpoint_every": 0, "out_dir": str(out_dir)}
    return config_from_dict({
        "model": {"name": "mlp", "sizes": [16, 32, 4], "activation": "relu"},
        "data": {"kind": "arrays", "path": str(blobs), "val_fraction": 0.2},
        "training": {**t, **training}})


def as_json(events):
    """The events as `--json` writes them (paths and floats as JSON has them)."""
    return [json.loads(json.dumps(e)) for e in events]


def scalars(logdir):
    acc = event_accumulator.EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def expected_scalars(events):
    """Each step's loss, lr and throughput; val_loss of each eval and of each done (the
    whole split), at its step; a done after an interrupt repeats an eval's step and value."""
    steps = [e for e in events if e["event"] == "step"]
    val = {e["step"]: e["val_loss"] for e in events if e["event"] == "eval"}
    for e in events:
        if e["event"] == "done" and e["val_step"] is not None:
            assert val.setdefault(e["val_step"], e["val_loss"]) == e["val_loss"]
    return {key: [(e["step"], e[key]) for e in steps]
            for key in ("loss", "lr", "samples_per_s")} | {"val_loss": sorted(val.items())}


def assert_same_scalars(got, expected):
    assert got.keys() == expected.keys()
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in points],
                                   rtol=1e-6, atol=0, err_msg=tag)  # stored as float32


def test_a_run_records_its_events_and_tensorboard_scalars(blobs, tmp_path):
    run = tmp_path / "run"
    reporter = ListReporter()
    train(mlp(blobs, run, tensorboard=True), reporter)
    events = reporter.events
    assert [e["event"] for e in events].count("step") == 20
    assert [e["step"] for e in events if e["event"] == "eval"] == [5, 10, 15]
    assert read_events(run) == as_json(events)
    assert_same_scalars(scalars(run / "tensorboard"), expected_scalars(events))


def test_a_resumed_run_appends_and_a_fresh_one_moves_the_old_record_aside(blobs, tmp_path):
    run = tmp_path / "run"
    first, second = ListReporter(), ListReporter()
    train(mlp(blobs, run, tensorboard=True), first, stop_at=12)
    train(mlp(blobs, run, tensorboard=True), second, resume="auto")
    both = first.events + second.events
    assert second.events[0]["event"] == "resumed" and second.events[1]["step"] == 13
    assert read_events(run) == as_json(both)
    assert [e["val_step"] for e in both if e["event"] == "done"] == [10, 20]
    assert_same_scalars(scalars(run / "tensorboard"), expected_scalars(both))

    fresh = ListReporter()
    train(mlp(blobs, run, steps=4, eval_every=0, tensorboard=True), fresh, overwrite=True)
    assert read_events(run) == as_json(fresh.events)
    assert read_events(run / "events.old-1.jsonl") == as_json(both)
    assert [s for s, _ in scalars(run / "tensorboard")["loss"]] == [1, 2, 3, 4]
    assert len(scalars(run / "tensorboard.old-1")["loss"]) == 20


def test_a_rollback_replaces_the_redone_steps_in_tensorboard(tmp_path):
    r = TensorBoardReporter(tmp_path / "tb")
    r.start(10, 0)
    for step in range(1, 6):
        r.emit("step", step=step, loss=float(step), lr=0.1, samples_per_s=5.0)
    # a shard died at step 5; every process restarts from the step-2 checkpoint
    r.emit("restart", role="ps", rank=0, reason="exit -9", step=2, rolled_back_to=2)
    for step in range(3, 5):
        r.emit("step", step=step, loss=100.0 + step, lr=0.1, samples_per_s=5.0)
    r.close()
    assert scalars(tmp_path / "tb")["loss"] == [(1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0)]


def test_the_event_log_starts_after_a_torn_line_and_reading_skips_it(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "step", "step": 1, "loss": 2.0}\n{"event": "st')  # killed
    log = EventLogReporter(path)
    log.start(3, 1)
    log.emit("step", step=2, loss=float("nan"), lr=0.5)
    log.close()
    assert path.read_text().splitlines()[1:] == [
        '{"event": "st', '{"event": "step", "step": 2, "loss": "nan", "lr": 0.5}']
    events = read_events(tmp_path)
    assert [e["step"] for e in events] == [1, 2] and np.isnan(events[1]["loss"])
    with pytest.raises(ConfigError, match=r"nowhere: no events.jsonl here"):
        read_events(tmp_path / "nowhere")


def test_tensorboard_without_tensorboardx_is_refused_with_the_install_command(
        blobs, tmp_path, monkeypatch):
    cfg = mlp(blobs, tmp_path / "run", tensorboard=True)
    check_job(cfg)  # installed here
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"^training.tensorboard: .*pip install "
                                          r"'narun\[tensorboard\]'"):
        check_job(cfg)
    with pytest.raises(ConfigError):
        train(cfg, ListReporter())
    assert not (tmp_path / "run").exists()  # refused before anything was written
    check_job(mlp(blobs, tmp_path / "run"))  # off: tensorboardX is not needed
    for command in ("config", "check"), ("train", "--json"):
        out = narun_cli(*command, "configs/mlp.yaml", "--set", f"data.path={blobs}",
                        "--set", f"training.out_dir={tmp_path / 'cli'}",
                        "--set", "training.tensorboard=true", missing=["tensorboardX"])
        assert out.returncode == 2, out.stderr
        assert "training.tensorboard: true needs tensorboardX, which is not installed: pip " \
               "install 'narun[tensorboard]'" in out.stderr
        assert "[from --set training.tensorboard=true]" in out.stderr
    assert not (tmp_path / "cli").exists()


def test_an_event_after_close_is_appended_without_keeping_the_file_open(tmp_path):
    (tmp_path / "events.jsonl").write_text('{"event": "done", "step": 9}\n')  # a run before
    log = EventLogReporter(tmp_path / "events.jsonl", fresh=True)
    log.emit("step", step=1, loss=1.0)
    log.close()
    log.emit("host_lost", host="node2", reason="silent")  # while its processes stopped
    assert log._file is None
    assert [e["event"] for e in read_events(tmp_path)] == ["step", "host_lost"]
    assert read_events(tmp_path / "events.old-1.jsonl") == [{"event": "done", "step": 9}]


def test_tensorboard_moves_an_earlier_runs_files_aside_once(tmp_path):
    earlier = TensorBoardReporter(tmp_path / "tb")
    earlier.start(3, 0)
    earlier.emit("step", step=1, loss=9.0, lr=0.1)
    earlier.close()
    r = TensorBoardReporter(tmp_path / "tb", fresh=True)
    r.start(3, 0)
    r.emit("step", step=1, loss=1.0, lr=0.1)
    r.close()
    r.start(3, 1)  # the same reporter started again (a runner's second leg): kept
    r.emit("step", step=2, loss=2.0, lr=0.1)
    r.close()
    assert scalars(tmp_path / "tb")["loss"] == [(1, 1.0), (2, 2.0)]
    assert scalars(tmp_path / "tb.old-1")["loss"] == [(1, 9.0)]
    assert not (tmp_path / "tb.old-2").exists()
