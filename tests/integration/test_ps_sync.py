"""ps-sync with real processes equals one process training on the concatenated batch."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys

import numpy as np
import pytest
import uvloop

from narun.checkpoint import load_checkpoint
from narun.events import JsonLinesReporter
from narun.runtime import Coordinator
from narun.train import train as local_train
from tests.integration.conftest import assert_all_gone, assert_same_checkpoint, gpu_count

BUCKET = 512  # bytes: the 676-parameter MLP is cut into 6 buckets over 2 shards


def run(cfg, resume=None, **options):
    out = io.StringIO()
    coordinator = Coordinator(cfg, JsonLinesReporter(out), resume, bucket_bytes=BUCKET,
                              wait_timeout=30.0, **options)
    try:
        done = uvloop.run(coordinator.run())
    finally:
        assert_all_gone(coordinator.pids)
    # on one host the shards serve on Unix sockets, gone with the job
    for endpoint in coordinator.shard_endpoints:
        assert endpoint.startswith("ipc://"), endpoint
        assert not os.path.exists(os.path.dirname(endpoint.removeprefix("ipc://")))
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    return done, events


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [2, 3])
def test_ps_sync_equals_one_process(make_config, workers):
    reference = local_train(make_config("local", 0, out="local"),
                            JsonLinesReporter(io.StringIO()))
    done, events = run(make_config("ps-sync", workers, out="dist", eval_every=5))
    assert done["step"] == 10 and not done["interrupted"]
    assert_same_checkpoint(reference["checkpoint"], done["checkpoint"])
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 11))
    assert [e["event"] for e in events][-2:] == ["checkpoint", "done"]
    assert any(e["event"] == "eval" and e["step"] == 5 for e in events)
    assert done["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-4)
    assert done["val_step"] == reference["val_step"] == 10  # the whole split, at the end


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [2, 3])
def test_ps_sync_clips_by_the_global_norm_like_one_process(make_config, workers):
    """grad_clip 0.05 clips every step (the MLP's gradient norm starts near 1): no shard
    holds the whole gradient, yet the result is one process's clip_grad_norm_ run. SGD:
    Adam's steps barely change when every gradient is scaled."""
    sgd = {"optimizer": "sgd", "lr": 0.5}
    reference = local_train(make_config("local", 0, out="local", grad_clip=0.05, **sgd),
                            JsonLinesReporter(io.StringIO()))
    unclipped = local_train(make_config("local", 0, out="unclipped", **sgd),
                            JsonLinesReporter(io.StringIO()))
    done, _ = run(make_config("ps-sync", workers, out="dist", grad_clip=0.05, **sgd))
    assert done["step"] == 10
    assert_same_checkpoint(reference["checkpoint"], done["checkpoint"])
    clipped, free = (load_checkpoint(r["checkpoint"]).model for r in (reference, unclipped))
    assert max(np.abs(clipped[k] - free[k]).max() for k in free) > 1e-2  # clipping acted


@pytest.mark.timeout(60)
def test_an_interrupted_run_says_which_validation_its_done_event_reports(make_config):
    done, events = run(make_config("ps-sync", 2, out="dist", eval_every=4), stop_at=6)
    assert done["interrupted"] and done["step"] == 6
    (last_eval,) = [e for e in events if e["event"] == "eval"]
    assert done["val_step"] == last_eval["step"] == 4  # not step 6's weights
    assert done["val_loss"] == last_eval["val_loss"]


@pytest.mark.timeout(60)
def test_ps_sync_resumes_from_its_own_checkpoint(make_config):
    """Stop at step 6 (checkpoint), resume in a new job: equal to 10 uninterrupted steps."""
    reference = local_train(make_config("local", 0, out="local"),
                            JsonLinesReporter(io.StringIO()))
    cfg = make_config("ps-sync", 2, out="dist", checkpoint_every=3)
    first, _ = run(cfg, stop_at=6)
    assert first["step"] == 6 and first["interrupted"]
    done, events = run(cfg, resume="auto")
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(7, 11))
    assert_same_checkpoint(reference["checkpoint"], done["checkpoint"])



@pytest.mark.timeout(60)
def test_ps_sync_gpt_with_tied_weights_equals_one_process(tmp_path):
    """A tiny byte GPT (tied embedding: one leaf used twice, text data, weight decay on
    matrices only) over 2 trainers and 2 shards matches one process. SGD, not Adam: the key
    bias of attention has a gradient that is exactly 0 in exact arithmetic (softmax ignores
    a per-row constant), and Adam would scale its float32 rounding noise up to full steps."""
    import narun.models  # noqa: F401
    from narun.config import config_from_dict

    def make(mode, workers, out):
        return config_from_dict({
            "model": {"name": "gpt", "preset": "gpt2-tiny", "n_layer": 1, "n_embd": 16,
                      "n_head": 2, "block_size": 16, "dropout": 0.0, "tie_weights": True},
            "data": {"kind": "text", "seq_len": 16},
            "training": {"steps": 4, "batch_size": 4, "optimizer": "sgd", "lr": 0.5,
                         "weight_decay": 0.1, "schedule": "linear", "warmup_steps": 1,
                         "grad_clip": None, "eval_every": 0, "checkpoint_every": 0,
                         "out_dir": str(tmp_path / out)},
            "runtime": {"mode": mode, "workers": workers, "ps_shards": 2}})

    reference = local_train(make("local", 0, "local"), JsonLinesReporter(io.StringIO()))
    out = io.StringIO()
    coordinator = Coordinator(make("ps-sync", 2, "dist"), JsonLinesReporter(out),
                              bucket_bytes=4096, wait_timeout=30.0)
    try:
        done = uvloop.run(coordinator.run())
    finally:
        assert_all_gone(coordinator.pids)
    ca, cb = load_checkpoint(reference["checkpoint"]), load_checkpoint(done["checkpoint"])
    for name in ca.model:
        np.testing.assert_allclose(cb.model[name], ca.model[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA GPU and CuPy")
@pytest.mark.timeout(120)
def test_ps_sync_on_the_gpu_equals_one_process_on_the_cpu(make_config):
    """Trainers on cuda:0 (model, batches and bucket packing on the GPU; one pinned copy
    each way per bucket) give the parameters of one CPU process, to float32 GEMM noise."""
    reference = local_train(make_config("local", 0, out="local"),
                            JsonLinesReporter(io.StringIO()))
    done, _ = run(make_config("ps-sync", 2, out="gpu", device="cuda:0"))
    ca, cb = load_checkpoint(reference["checkpoint"]), load_checkpoint(done["checkpoint"])
    for name in ca.model:
        np.testing.assert_allclose(cb.model[name], ca.model[name], rtol=1e-3, atol=1e-5,
                                   err_msg=name)
    assert done["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-3)


@pytest.mark.skipif(gpu_count() > 0, reason="a GPU is here")
def test_a_device_this_machine_lacks_stops_the_job_before_any_process_starts(make_config):
    from narun.errors import ConfigError

    with pytest.raises(ConfigError, match=r"runtime.device: device 'cuda.*(needs CuPy|not "
                                          r"usable)"):
        Coordinator(make_config("ps-sync", 2, device="cuda:0"),
                    JsonLinesReporter(io.StringIO()), wait_timeout=30.0)


def test_auto_trains_on_the_cpu_without_a_gpu_and_mlx_not_in_a_pipeline(make_config,
                                                                        monkeypatch):
    from narun.errors import ConfigError
    from workers.executor import training_device

    monkeypatch.setitem(__import__("sys").modules, "cupy", None)
    assert training_device("auto") == "cpu"
    assert training_device("cuda") == "cuda:0"
    assert training_device("mlx:cpu") == training_device("mlx:cpu", "ps-sync") == "mlx:cpu"
    with pytest.raises(ConfigError, match="'mps' \\(MLX\\) does not run mode pipeline"):
        training_device("mps", "pipeline")
    if not _metal():  # a job whose trainers could not start is refused before they do
        with pytest.raises(ConfigError, match="runtime.device: device 'mps' needs"):
            Coordinator(make_config("ps-sync", 2, device="mps"),
                        JsonLinesReporter(io.StringIO()))


def _metal() -> bool:
    try:
        import mlx.core as mx
    except ImportError:
        return False
    return sys.platform == "darwin" and bool(mx.metal.is_available())


@pytest.mark.skipif(importlib.util.find_spec("mlx") is None,
                    reason="needs MLX (pip install 'mlx[cpu]')")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["ps-sync", "ps-async"])
def test_trainers_on_mlx_equal_one_process_on_mlx(make_config, mode):
    """Trainers on mlx:cpu (model, batches and bucket packing as MLX arrays; gradients
    and values cross to the shards as NumPy) give one mlx:cpu process's parameters: ps-sync
    always, ps-async with one trainer (no staleness), as on the cpu."""
    workers = 2 if mode == "ps-sync" else 1
    reference = local_train(make_config("local", 0, out="local", device="mlx:cpu"),
                            JsonLinesReporter(io.StringIO()))
    done, events = run(make_config(mode, workers, out="mlx", device="mlx:cpu"))
    assert done["step"] == 10 and not done["interrupted"]
    assert_same_checkpoint(reference["checkpoint"], done["checkpoint"])
    assert done["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-4)
