"""One process trains where `runtime.device` says: the cpu, a GPU through CuPy, or MLX."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import narun.models  # noqa: F401  (registers model fields)
from narun.checkpoint import load_checkpoint
from narun.config import load_config
from narun.errors import ConfigError
from narun.events import JsonLinesReporter
from narun.train import build_job, check_job, train
from tests.integration.conftest import gpu_count

ROOT = Path(__file__).resolve().parents[3]


class Events(JsonLinesReporter):
    def __init__(self):
        self.events = []

    def emit(self, event, **fields):
        self.events.append({"event": event, **fields})


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


# The devices one process trains on besides the cpu: a GPU through CuPy (marked cuda, not
# run here), and MLX's CPU device (slow: its matmul is many times OpenBLAS's time here).
# Each: (device, marks, steps of the fp16 run, tolerance of a resumed run's parameters:
# GPU atomics may reorder float32 sums; MLX's CPU device repeats itself exactly).
DEVICES = [
    pytest.param("cuda:0", 20, 1e-5, marks=[pytest.mark.cuda, needs_gpu], id="cuda"),
    pytest.param("mlx:cpu", 3, 0.0, marks=[
        pytest.mark.slow,
        pytest.mark.skipif(not has_mlx(), reason="needs MLX (pip install 'mlx[cpu]')")],
        id="mlx"),
]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("device,fp16_steps,resume_rtol", DEVICES)
def test_one_process_on_a_device_follows_the_numpy_losses(tmp_path, device, fp16_steps,
                                                           resume_rtol):
    """20 quickstart steps on the device (model, batches and optimizer state there) give
    the NumPy run's loss within 1e-3 relative at every step, and a checkpoint of host
    arrays that load anywhere."""
    cpu, dev = Events(), Events()
    reference = train(quickstart(tmp_path / "cpu"), cpu)
    done = train(quickstart(tmp_path / "dev", device), dev)
    assert len(losses(dev.events)) == 20
    np.testing.assert_allclose(losses(dev.events), losses(cpu.events), rtol=1e-3)
    assert done["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-3)
    a, b = load_checkpoint(reference["checkpoint"]), load_checkpoint(done["checkpoint"])
    for name, value in a.model.items():
        assert isinstance(b.model[name], np.ndarray)
        np.testing.assert_allclose(b.model[name], value, rtol=1e-2, atol=1e-3, err_msg=name)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device,fp16_steps,resume_rtol", DEVICES)
def test_fp16_on_a_device_follows_fp32(tmp_path, device, fp16_steps, resume_rtol):
    """training.precision fp16: float16 compute on the device over float32 masters, with
    loss scaling, stays within 2% of the float32 NumPy losses."""
    cpu, half = Events(), Events()
    train(quickstart(tmp_path / "cpu", steps=fp16_steps), cpu)
    train(quickstart(tmp_path / "fp16", device, steps=fp16_steps, precision="fp16"), half)
    np.testing.assert_allclose(losses(half.events), losses(cpu.events), rtol=2e-2)
    assert all("loss_scale" in e for e in half.events if e["event"] == "step")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device,fp16_steps,resume_rtol", DEVICES)
def test_a_resumed_run_on_a_device_ends_where_the_unbroken_one_does(tmp_path, device,
                                                                   fp16_steps, resume_rtol):
    """Stopped at step 2 and resumed: the checkpoint's host arrays go back onto the device
    (model and optimizer state) and step 4 holds the unbroken run's parameters."""
    straight = train(quickstart(tmp_path / "a", device, steps=4), Events())
    train(quickstart(tmp_path / "b", device, steps=4), Events(), stop_at=2)
    resumed = train(quickstart(tmp_path / "b", device, steps=4), Events(), resume="auto")
    a, b = load_checkpoint(straight["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for name, value in a.model.items():
        np.testing.assert_allclose(b.model[name], value, rtol=resume_rtol, atol=0,
                                   err_msg=name)


@pytest.mark.slow
@pytest.mark.skipif(not has_mlx() or importlib.util.find_spec("ml_dtypes") is None,
                    reason="needs MLX and ml_dtypes (pip install 'mlx[cpu]' ml_dtypes)")
@pytest.mark.timeout(300)
def test_bf16_on_mlx_follows_fp32_without_loss_scaling(tmp_path):
    """training.precision bf16 on mlx:cpu: the model computes in bfloat16 over float32
    masters, with no loss scaling, and its losses follow the float32 NumPy run's within
    1e-3 relative. Measured: 1.3e-5 at most over these 3 steps (3.7e-5 over 10): the loss is
    taken in float32 (at_least_float32), so only the bfloat16 forward and gradients
    differ. 1e-3 is under half of bfloat16's own spacing near a loss of 5 (2**-5 / 5.4 =
    5.8e-3): a loss taken in bfloat16 rounds by up to 2.9e-3 and fails it."""
    cpu, bf = Events(), Events()
    train(quickstart(tmp_path / "cpu", steps=3), cpu)
    done = train(quickstart(tmp_path / "bf16", "mlx:cpu", steps=3, precision="bf16"), bf)
    steps = [e for e in bf.events if e["event"] == "step"]
    assert len(steps) == 3
    np.testing.assert_allclose(losses(bf.events), losses(cpu.events), rtol=1e-3)
    assert not any(e["skipped"] for e in steps)
    assert not any("loss_scale" in e for e in steps)
    c = load_checkpoint(done["checkpoint"])
    assert {v.dtype for v in c.model.values()} == {np.dtype(np.float32)}
    assert all(isinstance(v, np.ndarray) for v in c.model.values())
    assert c.extra["amp"] == {"scaler": None}


def test_bf16_is_refused_where_the_arrays_have_no_bfloat16(tmp_path):
    """NumPy (cpu) and CuPy (cuda, and auto, which picks one of them) have no bfloat16
    arrays: bf16 is refused before anything is built, naming why and what to use."""
    for device in ("cpu", "cuda:0", "auto"):
        with pytest.raises(ConfigError, match=r"training.precision: bf16 needs bfloat16 "
                           r"arrays, which NumPy \(cpu\) and CuPy \(cuda\) do not have; use "
                           r"fp16 .*or train bf16 on an MLX device"):
            check_job(quickstart(tmp_path, device, precision="bf16"), here=False)
    for device in ("mlx:cpu", "mps"):  # MLX has bfloat16; off mode local, fp32 only
        check_job(quickstart(tmp_path, device, precision="bf16"), here=False)
        with pytest.raises(ConfigError, match="bf16 trains in mode local"):
            check_job(quickstart(tmp_path, device, precision="bf16", **{
                "runtime.mode": "ps-sync", "runtime.workers": 1}), here=False)


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
