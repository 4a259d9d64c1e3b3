"""One process trains where `runtime.device` says: the cpu, a GPU through CuPy, or MLX."""

from pathlib import Path

import numpy as np
import pytest

import narun.models  # noqa: F401  (registers model fields)
from narun.checkpoint import load_checkpoint
from narun.config import load_config
from narun.errors import ConfigError
from narun.events import JsonLinesReporter
from narun.train import build_job, check_job, train

ROOT = Path(__file__).resolve().parents[3]


class Events(JsonLinesReporter):
    def __init__(self):
        self.events = []

    def emit(self, event, **fields):
        self.events.append({"event": event, **fields})


def gpu_count() -> int:
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # not installed, no driver: no GPU here
        return 0


needs_gpu = pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA GPU and CuPy")


def quickstart(out, device="cpu", steps=20, **training):
    sets = [f"training.steps={steps}", "training.eval_every=0", "training.checkpoint_every=0",
            f"training.out_dir={out}", f"runtime.device={device}"]
    sets += [f"{k}={v}" if "." in k else f"training.{k}={v}" for k, v in training.items()]
    return load_config(ROOT / "configs" / "quickstart.yaml", sets)


def losses(events):
    return np.array([e["loss"] for e in events if e["event"] == "step"])


def has_mlx() -> bool:
    try:
        import mlx.core  # noqa: F401
        return True
    except ImportError:
        return False


def test_mlx_off_local_and_a_missing_device_are_named_before_anything_is_built(tmp_path):
    for device in ("mps", "mlx:cpu"):
        with pytest.raises(ConfigError, match=f"'{device}' \\(MLX\\) does not run mode pipeline"):
            check_job(quickstart(tmp_path, device, **{"runtime.mode": "pipeline",
                                                      "runtime.stages": 2}))
    if not has_mlx():
        with pytest.raises(ConfigError, match="runtime.device: device 'mps' needs MLX"):
            check_job(quickstart(tmp_path, "mlx:cpu"))
    elif not __import__("mlx.core").core.metal.is_available():
        with pytest.raises(ConfigError, match="runtime.device: device 'mps' needs a Metal"):
            check_job(quickstart(tmp_path, "mps"))
    if gpu_count() == 0:  # no CuPy or no driver here: said so, with how to get it
        with pytest.raises(ConfigError, match=r"runtime.device: device 'cuda.*(needs CuPy|"
                                              r"not usable)"):
            train(quickstart(tmp_path, "cuda:0"), Events())


def test_auto_trains_on_the_cpu_where_there_is_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "cupy", None)  # as if CuPy were absent
    events = Events()
    done = train(quickstart(tmp_path / "auto", "auto", steps=2), events)
    reference = train(quickstart(tmp_path / "cpu", "cpu", steps=2), Events())
    assert done["val_loss"] == reference["val_loss"]
    assert build_job(quickstart(tmp_path, "cpu")).device == "cpu"


@pytest.mark.cuda
@needs_gpu
@pytest.mark.timeout(300)
def test_one_process_on_the_gpu_follows_the_cpu_losses(tmp_path):
    """20 quickstart steps on cuda:0 (model, batches and optimizer state on the GPU) give
    the CPU run's loss within 1e-3 relative at every step; the checkpoint holds host arrays
    that load anywhere, and a GPU run resumed halfway ends where the unbroken one does."""
    cpu, gpu = Events(), Events()
    reference = train(quickstart(tmp_path / "cpu"), cpu)
    done = train(quickstart(tmp_path / "gpu", "cuda:0"), gpu)
    np.testing.assert_allclose(losses(gpu.events), losses(cpu.events), rtol=1e-3)
    assert done["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-3)
    a, b = load_checkpoint(reference["checkpoint"]), load_checkpoint(done["checkpoint"])
    for name, value in a.model.items():
        assert isinstance(b.model[name], np.ndarray)
        np.testing.assert_allclose(b.model[name], value, rtol=1e-2, atol=1e-3, err_msg=name)

    train(quickstart(tmp_path / "half", "cuda:0"), Events(), stop_at=10)
    resumed = train(quickstart(tmp_path / "half", "cuda:0"), Events(), resume="auto")
    c = load_checkpoint(resumed["checkpoint"])
    for name, value in b.model.items():  # GPU atomics may reorder float32 sums
        np.testing.assert_allclose(c.model[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.timeout(300)
def test_fp16_on_the_gpu_follows_fp32(tmp_path):
    """training.precision fp16 on cuda:0: float16 compute over float32 masters, with loss
    scaling, stays within 2% of the float32 CPU losses over 20 quickstart steps."""
    cpu, half = Events(), Events()
    train(quickstart(tmp_path / "cpu"), cpu)
    train(quickstart(tmp_path / "fp16", "cuda:0", precision="fp16"), half)
    np.testing.assert_allclose(losses(half.events), losses(cpu.events), rtol=2e-2)
    assert all("loss_scale" in e for e in half.events if e["event"] == "step")


@pytest.mark.slow
@pytest.mark.skipif(not has_mlx(), reason="needs MLX (pip install 'mlx[cpu]')")
@pytest.mark.timeout(900)
def test_one_process_on_mlx_cpu_follows_the_numpy_losses(tmp_path):
    """20 quickstart steps on mlx:cpu (model, batches and optimizer state as MLX arrays)
    give the NumPy run's loss within 1e-3 relative at every step, and a checkpoint of host
    arrays. MLX's CPU device is several times slower than NumPy here (its matmul is)."""
    cpu, mlx = Events(), Events()
    reference = train(quickstart(tmp_path / "cpu"), cpu)
    done = train(quickstart(tmp_path / "mlx", "mlx:cpu"), mlx)
    assert len(losses(mlx.events)) == 20
    np.testing.assert_allclose(losses(mlx.events), losses(cpu.events), rtol=1e-3)
    assert done["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-3)
    a, b = load_checkpoint(reference["checkpoint"]), load_checkpoint(done["checkpoint"])
    for name, value in a.model.items():
        assert isinstance(b.model[name], np.ndarray)
        np.testing.assert_allclose(b.model[name], value, rtol=1e-2, atol=1e-3, err_msg=name)


@pytest.mark.slow
@pytest.mark.skipif(not has_mlx(), reason="needs MLX (pip install 'mlx[cpu]')")
@pytest.mark.timeout(300)
def test_fp16_on_mlx_cpu_follows_fp32(tmp_path):
    """training.precision fp16 on mlx:cpu: float16 MLX compute over float32 masters, with
    loss scaling, stays within 2% of the float32 NumPy losses over 3 quickstart steps."""
    cpu, half = Events(), Events()
    train(quickstart(tmp_path / "cpu", steps=3), cpu)
    train(quickstart(tmp_path / "fp16", "mlx:cpu", steps=3, precision="fp16"), half)
    np.testing.assert_allclose(losses(half.events), losses(cpu.events), rtol=2e-2)
    assert all("loss_scale" in e for e in half.events if e["event"] == "step")


@pytest.mark.slow
@pytest.mark.skipif(not has_mlx(), reason="needs MLX (pip install 'mlx[cpu]')")
@pytest.mark.timeout(300)
def test_a_resumed_mlx_cpu_run_ends_where_the_unbroken_one_does(tmp_path):
    """Stopped at step 2 and resumed: the checkpoint's host arrays go back onto mlx:cpu
    (model and optimizer state) and step 4 holds the unbroken run's parameters exactly."""
    straight = train(quickstart(tmp_path / "a", "mlx:cpu", steps=4), Events())
    train(quickstart(tmp_path / "b", "mlx:cpu", steps=4), Events(), stop_at=2)
    resumed = train(quickstart(tmp_path / "b", "mlx:cpu", steps=4), Events(), resume="auto")
    a, b = load_checkpoint(straight["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for name, value in a.model.items():
        np.testing.assert_array_equal(b.model[name], value, err_msg=name)


MODELS = {"mlp": "classification", "resnet": "shapes", "vit": "shapes", "clip": "shapes",
          "bert": None}


@pytest.mark.slow
@pytest.mark.skipif(not has_mlx(), reason="needs MLX (pip install 'mlx[cpu]')")
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_on_mlx_cpu_as_on_numpy(tmp_path, name):
    """3 steps of each other shipped config (convolutions, BatchNorm, patches, two towers,
    masked language modelling) on mlx:cpu give the NumPy losses within 1e-3 relative."""
    from narun.data import make_classification_npz, make_shapes_npz

    sets = ["training.steps=3", "training.eval_every=0", "training.checkpoint_every=0",
            "training.batch_size=8", "training.warmup_steps=0"]
    if MODELS[name] == "shapes":
        sets.append(f"data.path={make_shapes_npz(tmp_path / 'd.npz', n=64, size=32, seed=0)}")
    elif MODELS[name]:
        sets.append(f"data.path={make_classification_npz(tmp_path / 'd.npz', n=256, seed=0)}")
    else:
        sets += ["data.seq_len=32", "model.block_size=32"]
    runs = {}
    for device in ("cpu", "mlx:cpu"):
        events = Events()
        train(load_config(ROOT / "configs" / f"{name}.yaml", sets + [
            f"training.out_dir={tmp_path / device.replace(':', '-')}",
            f"runtime.device={device}"]), events)
        runs[device] = losses(events.events)
    assert len(runs["mlx:cpu"]) == 3
    np.testing.assert_allclose(runs["mlx:cpu"], runs["cpu"], rtol=1e-3)
