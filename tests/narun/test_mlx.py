"""The engine on MLX's CPU device (mlx:cpu): tensors, modules, optimizers, clipping and
checkpoints give what the same code gives on NumPy. The ops themselves are checked on
mlx:cpu by every check_op call (tests/opcheck.py)."""

import numpy as np
import pytest

import narun
from narun import nn
from narun.errors import DeviceError, DeviceMismatchError

mx = pytest.importorskip("mlx.core", reason="needs MLX (pip install 'mlx[cpu]')")

DEV = "mlx:cpu"


def test_tensors_move_and_keep_numpy_dtypes():
    x = narun.tensor([[1.5, 2.0], [3.0, -4.0]], device=DEV)
    assert x.device == DEV and x.dtype == np.float32 and x.shape == (2, 2)
    assert narun.tensor(np.arange(3), device=DEV).dtype == np.int64
    d = narun.tensor(np.ones(2), device=DEV)  # float64 stays float64 (MLX would make float32)
    assert d.dtype == np.float64 and d.numpy().dtype == np.float64
    np.testing.assert_array_equal(x.numpy(), [[1.5, 2.0], [3.0, -4.0]])
    back = x.to("cpu")
    assert back.device == "cpu" and isinstance(back.data, np.ndarray)
    assert narun.tensor([1.0]).to(DEV).device == DEV
    assert x.to(dtype=np.float64).dtype == np.float64
    assert float(x.sum()) == 2.5 and x.max().item() == 3.0 and len(x) == 2
    assert narun.zeros(2, 3, device=DEV).device == DEV
    assert narun.randn(4, device=DEV).numpy().tolist() != [0.0] * 4
    with pytest.raises(DeviceMismatchError):
        x + narun.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert "device='mlx:cpu'" in repr(x)


def test_integer_tensors_promote_as_on_numpy():
    """NumPy divides integers, and combines them with Python floats, in float64; MLX would
    in float32 (and lose integers past 2**24)."""
    for device in ("cpu", DEV):
        i = narun.tensor(np.array([5, 16777217]), device=device)
        assert [str(t.dtype) for t in (i / 2, i / i, 2 / i, i * 2.5, i + 1, i // 2)] == [
            "float64", "float64", "float64", "float64", "int64", "int64"], device
        np.testing.assert_array_equal((i / 2).numpy(), [2.5, 8388608.5])
        np.testing.assert_array_equal((i > 16777216.5).numpy(), [False, True])


def test_to_cpu_is_differentiable_and_grads_land_on_mlx():
    w = narun.tensor(np.array([1.0, 2.0, 3.0]), device=DEV, requires_grad=True)
    loss = (w.to("cpu") * narun.tensor(np.array([4.0, 5.0, 6.0]))).sum()
    loss.backward()
    assert w.grad.device == DEV
    np.testing.assert_array_equal(w.grad.numpy(), [4.0, 5.0, 6.0])


def test_mps_needs_metal():
    if mx.metal.is_available():
        pytest.skip("this machine has Metal")
    with pytest.raises(DeviceError, match="Metal"):
        narun.tensor([1.0], device="mps")


def _mlp(seed=0):
    narun.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3))


def _batch():
    rng = np.random.default_rng(1)
    return rng.standard_normal((8, 6)).astype(np.float32), rng.integers(0, 3, 8)


def _steps(model, opt, device, n=5, clip=None):
    x, y = _batch()
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(narun.tensor(x, device=device)),
                                           narun.tensor(y, device=device))
        loss.backward()
        if clip is not None:
            losses.append(float(nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        losses.append(float(loss))
    return losses


OPTIMIZERS = {
    "adam": lambda p: narun.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: narun.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "adam-coupled-maximize": lambda p: narun.optim.Adam(p, lr=1e-2, weight_decay=0.1,
                                                         maximize=True),
    "sgd": lambda p: narun.optim.SGD(p, lr=0.1),
    "sgd-nesterov-wd": lambda p: narun.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True,
                                                 weight_decay=0.01),
    "sgd-dampening": lambda p: narun.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5),
    "lion": lambda p: narun.optim.Lion(p, lr=1e-3, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_module_to_and_optimizers_follow_numpy(name):
    ref, mine = _mlp(), _mlp().to(DEV)
    assert all(p.device == DEV for p in mine.parameters())
    want = _steps(ref, OPTIMIZERS[name](ref.parameters()), "cpu", clip=0.5)
    got = _steps(mine, OPTIMIZERS[name](mine.parameters()), DEV, clip=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    for (k, a), b in zip(ref.state_dict().items(), mine.state_dict().values()):
        assert b.device == DEV
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5, err_msg=k)


def test_state_dicts_and_checkpoints_cross_devices(tmp_path):
    model = _mlp().to(DEV)
    opt = narun.optim.AdamW(model.parameters(), lr=1e-2)
    _steps(model, opt, DEV, n=2)
    path = narun.save(model, tmp_path / "m.safetensors")
    loaded = narun.load(path)
    assert all(isinstance(v, np.ndarray) for v in loaded.values())
    host = _mlp(seed=7)
    host.load_state_dict(loaded)  # mlx:cpu -> cpu
    again = _mlp(seed=7).to(DEV)
    again.load_state_dict(host.state_dict())  # cpu -> mlx:cpu
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=k)

    # The optimizer's state goes to the host and back; both continue alike.
    opt2 = narun.optim.AdamW(again.parameters(), lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    np.testing.assert_allclose(_steps(again, opt2, DEV, n=2), _steps(model, opt, DEV, n=2),
                               rtol=1e-6)


def test_repeated_indices_accumulate_after_the_adapter_served_a_plain_add():
    """xp.add(...) and xp.add.at(...) are one object: serving the first must not replace
    the second, or an indexed gradient drops repeats."""
    from narun.tensor import _backend

    xp = _backend.module_for_device(DEV)
    np.testing.assert_array_equal(xp.add(xp.zeros(2, np.float32), 1.0).get(), [1.0, 1.0])
    w = narun.tensor(np.zeros(3), device=DEV, requires_grad=True)
    w[narun.tensor(np.array([0, 0, 2]), device=DEV)].sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), [2.0, 0.0, 1.0])


def test_bfloat16_tensors_require_grad_and_backpropagate_close_to_float32():
    """MLX's bfloat16 arrays report ml_dtypes' bfloat16 (NumPy has none) and count as
    floating point: they require grad, and a matmul + sum backpropagates gradients within
    bfloat16's rounding (8 mantissa bits: 2**-8 relative per value) of float32's."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    x32 = narun.tensor(rng.standard_normal((16, 32)).astype(np.float32), device=DEV)
    w32 = narun.tensor(rng.standard_normal((32, 8)).astype(np.float32), device=DEV,
                       requires_grad=True)
    x = x32.to(dtype=bf16)
    w = w32.detach().to(dtype=bf16).requires_grad_()
    assert x.dtype == bf16 and w.requires_grad and w.is_leaf
    loss = (x @ w * 0.5).sum()
    loss.backward()
    (x32 @ w32 * 0.5).sum().backward()
    assert loss.dtype == bf16 and w.grad.dtype == bf16 and w.grad.device == DEV
    host = w.grad.numpy()
    assert host.dtype == bf16  # values reach the host as ml_dtypes' bfloat16
    # d/dw sum(x @ w * 0.5) = 0.5 * x.T @ ones: column sums of x, rounded to bfloat16
    want = w32.grad.numpy()
    np.testing.assert_allclose(host.astype(np.float32), want, rtol=2 ** -7, atol=2 ** -6)
    assert not np.array_equal(host.astype(np.float32), want)  # bfloat16 really rounded
    assert float(loss) == pytest.approx(float((x32 @ w32 * 0.5).sum()), rel=2e-2)
    # and back: a bfloat16 host array goes onto MLX as bfloat16, values unchanged
    again = narun.tensor(host, device=DEV)
    assert again.dtype == bf16
    np.testing.assert_array_equal(again.numpy().astype(np.float32), host.astype(np.float32))
