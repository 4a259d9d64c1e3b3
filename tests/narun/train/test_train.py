"""The single-process training loop: exact resume, fallback to a good checkpoint, signals."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

import narun.models  # noqa: F401  (registers model fields)
from narun.checkpoint import latest_good, list_checkpoints, load_checkpoint, run_id_of
from narun.config import config_from_dict
from narun.data import augment_images, make_shapes_npz
from narun.errors import CheckpointError, ConfigError
from narun.events import JsonLinesReporter
from narun.train import build_job, train

TINY = {
    "model": {"name": "gpt", "preset": "gpt2-tiny", "n_layer": 2, "n_embd": 32, "n_head": 2,
              "block_size": 32, "dropout": 0.1},
    "data": {"kind": "text", "seq_len": 32},
    "training": {"steps": 20, "batch_size": 4, "lr": 1e-3, "warmup_steps": 3,
                 "eval_every": 0, "checkpoint_every": 0, "keep_checkpoints": 5},
}


def cfg(tmp_path, dropout=None, **training):
    data = json.loads(json.dumps(TINY))
    if dropout is not None:
        data["model"]["dropout"] = dropout
    data["training"].update(out_dir=str(tmp_path), **training)
    return config_from_dict(data)


class Events(JsonLinesReporter):
    def __init__(self):
        self.events = []

    def emit(self, event, **fields):
        self.events.append({"event": event, **fields})


def final_params(path):
    return load_checkpoint(path).model


def test_resume_is_bit_exact(tmp_path):
    straight = train(cfg(tmp_path / "a"), Events())
    first = train(cfg(tmp_path / "b"), Events(), stop_at=10)
    assert first["step"] == 10 and first["interrupted"]
    second = train(cfg(tmp_path / "b"), Events(), resume="auto")
    assert second["step"] == 20
    a, b = final_params(straight["checkpoint"]), final_params(second["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_takes_a_run_folder_as_generate_and_evaluate_do(tmp_path):
    # issue 12: --resume runs/NAME failed; `generate runs/NAME` took the newest good one
    train(cfg(tmp_path / "b", steps=12, checkpoint_every=5), Events(), stop_at=10)
    ev = Events()
    done = train(cfg(tmp_path / "b", steps=12), ev, resume=str(tmp_path / "b"))
    assert [e for e in ev.events if e["event"] == "resumed"] == [
        {"event": "resumed", "step": 10,
         "checkpoint": str(tmp_path / "b" / "checkpoints" / "step-000010")}]
    assert [e["step"] for e in ev.events if e["event"] == "step"] == [11, 12]
    assert done["step"] == 12
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"--resume .*empty: no checkpoint here"):
        train(cfg(tmp_path / "c"), Events(), resume=str(tmp_path / "empty"))


def test_a_fresh_run_refuses_an_out_dir_with_another_runs_checkpoints(tmp_path):
    # issue 12: a 4-step run into the out_dir of a finished 20-step one reported a
    # checkpoint its own pruning had deleted, and `latest` meant the old run's step 20
    old = train(cfg(tmp_path, checkpoint_every=5), Events())
    with pytest.raises(ConfigError, match=r"already holds checkpoints of another run .*"
                       r"--resume auto.*training.out_dir.*--overwrite"):
        train(cfg(tmp_path, steps=4, keep_checkpoints=1), Events())
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "step-000005", "step-000010", "step-000015", "step-000020"]
    new = train(cfg(tmp_path, steps=4, keep_checkpoints=1), Events(), overwrite=True)
    assert Path(new["checkpoint"]).is_dir()
    assert latest_good(tmp_path / "checkpoints") == Path(new["checkpoint"])
    aside = tmp_path / "checkpoints.old-1"  # moved aside, not deleted
    assert Path(old["checkpoint"]).name in [p.name for p in list_checkpoints(aside)]
    # resuming keeps the lineage: the new run's pruning never touches the old run's
    run_id = run_id_of(new["checkpoint"])
    resumed = train(cfg(tmp_path, steps=6, keep_checkpoints=1), Events(), resume="auto")
    assert run_id is not None and run_id_of(resumed["checkpoint"]) == run_id
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000006"]


def test_extending_a_finished_run_rebuilds_the_schedule(tmp_path):
    # issue 12: resuming a finished run with more training.steps kept the finished cosine
    # schedule: every new step at lr 0.0, the weights bit-identical, no warning
    first = train(cfg(tmp_path, steps=8), Events())
    ev = Events()
    with capture_logs() as logs:
        second = train(cfg(tmp_path, steps=14), ev, resume="auto")
    lrs = [e["lr"] for e in ev.events if e["event"] == "step"]
    assert second["step"] == 14 and len(lrs) == 6
    # the lr of steps 8..13 of a 14-step cosine schedule with 3 warmup steps
    fresh = build_job(cfg(tmp_path / "ref", steps=14))
    expected = []
    for _ in range(14):
        expected.append(fresh.scheduler.get_last_lr()[0])
        fresh.scheduler.step()
    np.testing.assert_allclose(lrs, expected[8:], rtol=1e-12)
    assert all(lr > 0 for lr in lrs)
    a, b = final_params(first["checkpoint"]), final_params(second["checkpoint"])
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    rebuilt = [e for e in logs if e["event"] == "schedule_rebuilt"]
    assert len(rebuilt) == 1 and rebuilt[0]["steps_before"] == 8 and rebuilt[0]["steps"] == 14
    with pytest.raises(ConfigError, match=r"training.steps: 10 is below step 14 of the "
                       r"checkpoint"):
        train(cfg(tmp_path, steps=10), Events(), resume="auto")


def vit_cfg(tmp_path, data, **training):
    return config_from_dict({
        "model": {"name": "vit", "num_classes": 4, "image_size": 16, "patch_size": 4,
                  "dim": 16, "depth": 1, "heads": 2},
        "data": {"kind": "arrays", "path": str(data), "val_fraction": 0.25,
                 "augment": ["hflip", "vflip", "shift"], "max_shift": 2},
        "training": {"steps": 8, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2,
                     "eval_every": 0, "checkpoint_every": 0, "out_dir": str(tmp_path),
                     **training},
    })


def test_augmented_batches_are_drawn_per_step_and_resume_bit_exact(tmp_path):
    data = make_shapes_npz(tmp_path / "shapes.npz", n=64, size=16, seed=0)
    job = build_job(vit_cfg(tmp_path / "j", data))
    unaugmented = vit_cfg(tmp_path / "p", data)
    unaugmented.data.augment = []
    plain = build_job(unaugmented)
    for step in (5, 0, 5):  # any order: a step's batch is a function of (seed, step)
        x, y = job.batch(step)
        px, py = plain.batch(step)
        np.testing.assert_array_equal(y, py)
        np.testing.assert_array_equal(x, augment_images(px, ("hflip", "vflip", "shift"), 2,
                                                        seed=0, step=step))
        assert not np.array_equal(x, px)
    straight = train(vit_cfg(tmp_path / "a", data), Events())
    first = train(vit_cfg(tmp_path / "b", data), Events(), stop_at=4)
    assert first["step"] == 4 and first["interrupted"]
    second = train(vit_cfg(tmp_path / "b", data), Events(), resume="auto")
    a, b = final_params(straight["checkpoint"]), final_params(second["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("optimizer, lr", [("adamw", 1e-3), ("sgd", 0.1)])
def test_grad_accum_gives_the_same_step_as_the_full_batch(tmp_path, optimizer, lr):
    """Two micro-batches of 2 give the full batch's gradient, so 3 steps end on the same
    parameters to float32 rounding. Dropout off (micro-batches draw its masks in another
    order) and no clipping (it would hide a wrongly scaled gradient). The tolerance is 1e-5
    relative plus 1/1000 of how far each tensor moved: rounding uses at most a quarter of
    it (Adam, in elements whose gradient nearly cancels). A dropped micro-batch fails both
    optimizers on most elements; a loss scaled 37x (or not divided by grad_accum) fails
    SGD on most elements, Adam, which divides the gradient's scale away, only on the few
    whose gradient is near its eps."""
    options = dict(steps=3, warmup_steps=0, optimizer=optimizer, lr=lr, grad_clip=None)
    init = {n: p.data.copy()
            for n, p in build_job(cfg(tmp_path / "i", dropout=0.0, **options)).model
            .named_parameters()}
    one = train(cfg(tmp_path / "a", dropout=0.0, **options), Events())
    two = train(cfg(tmp_path / "b", dropout=0.0, grad_accum=2, **options), Events())
    a, b = final_params(one["checkpoint"]), final_params(two["checkpoint"])
    assert a.keys() == b.keys() and init.keys() <= a.keys()
    for k in init:
        moved = np.abs(a[k] - init[k]).max()
        assert moved > 0, f"{k} did not move: the comparison would compare nothing"
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-3 * moved,
                                   err_msg=f"{k} (moved up to {moved:.3g})")


def test_resume_auto_skips_a_corrupted_newest_checkpoint(tmp_path):
    ev = Events()
    train(cfg(tmp_path, steps=12, warmup_steps=3, checkpoint_every=5), ev, stop_at=10)
    newest = tmp_path / "checkpoints" / "step-000010" / "model.safetensors"
    raw = bytearray(newest.read_bytes())
    raw[-1] ^= 0xFF
    newest.write_bytes(bytes(raw))
    ev2 = Events()
    done = train(cfg(tmp_path, steps=12, warmup_steps=3), ev2, resume="auto")
    steps = [e["step"] for e in ev2.events if e["event"] == "step"]
    assert steps[0] == 6, "resume should fall back to step 5, the last good checkpoint"
    assert done["step"] == 12


def test_events_are_json_lines_with_the_documented_fields(tmp_path):
    ev = Events()
    train(cfg(tmp_path, steps=4, warmup_steps=1, eval_every=2, checkpoint_every=2), ev)
    kinds = [e["event"] for e in ev.events]
    assert kinds.count("step") == 4 and "eval" in kinds and kinds[-1] == "done"
    step = next(e for e in ev.events if e["event"] == "step")
    assert {"step", "loss", "lr", "tokens_per_s"} <= step.keys()
    done = ev.events[-1]
    assert {"step", "val_loss", "checkpoint", "seconds"} <= done.keys()
    assert np.isfinite(done["val_loss"]) and done["val_loss"] < np.log(256) + 0.5


def test_an_interrupted_run_says_which_validation_its_done_event_reports(tmp_path):
    ev = Events()
    done = train(cfg(tmp_path / "a", steps=10, eval_every=4), ev, stop_at=7)
    (last_eval,) = [e for e in ev.events if e["event"] == "eval"]
    assert done["interrupted"] and done["step"] == 7
    assert done["val_step"] == last_eval["step"] == 4  # not step 7's weights
    assert done["val_loss"] == last_eval["val_loss"]
    none = train(cfg(tmp_path / "b", steps=10, eval_every=0), Events(), stop_at=3)
    assert none["val_step"] is None and none["val_loss"] is None
    full = train(cfg(tmp_path / "c", steps=3, eval_every=0), Events())
    assert full["val_step"] == 3 and not full["interrupted"]


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    config = tmp_path / "job.yaml"
    import yaml

    data = json.loads(json.dumps(TINY))
    data["training"].update(steps=100000, out_dir=str(tmp_path / "run"), warmup_steps=1)
    config.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "narun.cli", "train", str(config), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    try:
        for line in proc.stdout:
            if json.loads(line)["event"] == "step" and json.loads(line)["step"] >= 3:
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    events = [json.loads(x) for x in out.splitlines()]
    done = events[-1]
    assert done["event"] == "done" and done["interrupted"] is True
    ckpt = load_checkpoint(done["checkpoint"])
    assert ckpt.step == done["step"] >= 3
    assert Path(done["checkpoint"]).name == f"step-{done['step']:06d}"


def test_train_refuses_a_context_longer_than_the_model_before_any_step(tmp_path):
    # Was a ShapeError from GPT.forward mid-step (exit 1); it is a config error (exit 2).
    job = cfg(tmp_path)
    job.data.seq_len = 64
    events = Events()
    with pytest.raises(ConfigError, match=r"data\.seq_len: 64 exceeds the model's block_size "
                                          r"32 .*set data\.seq_len <= 32"):
        train(job, events)
    assert events.events == [] and not (tmp_path / "checkpoints").exists()


def test_bad_config_fails_fast_with_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("training:\n  lrr: 0.1\n")
    out = subprocess.run([sys.executable, "-m", "narun.cli", "train", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "training.lrr" in out.stderr and "did you mean 'lr'" in out.stderr


@pytest.mark.parametrize("name", ["quickstart.yaml", "mlp.yaml", "resnet.yaml", "vit.yaml",
                                  "bert.yaml", "clip.yaml"])
def test_shipped_configs_pass_config_check(name, tmp_path):
    root = Path(__file__).resolve().parents[3]
    check = [sys.executable, "-m", "narun.cli", "config", "check", str(root / "configs" / name)]
    env = {**os.environ, "PYTHONPATH": str(root)}  # this checkout's narun, whatever cwd is
    data = {"mlp.yaml": "blobs", "resnet.yaml": "shapes", "vit.yaml": "shapes",
            "clip.yaml": "shapes"}.get(name)
    if data:  # made by `narun data blobs|shapes runs/NAME.npz`, in cwd
        missing = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=60)
        assert missing.returncode == 2
        assert f"data.path: no such file 'runs/{data}.npz'" in missing.stderr
        assert f"narun data {data}" in missing.stderr
        made = subprocess.run([sys.executable, "-m", "narun.cli", "data", data,
                               f"runs/{data}.npz", "--n", "64"], cwd=tmp_path, env=env,
                              timeout=60)
        assert made.returncode == 0
    out = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "training:" in out.stdout and "model:" in out.stdout
