import numpy as np
import pytest

import narun
from narun.errors import ConfigError, DTypeError, ShapeError
from narun.nn import functional as F
from tests.opcheck import HAS_TORCH, check_op

if HAS_TORCH:
    import torch
    import torch.nn.functional as TF


def np_cross_entropy(x, t, w=None, ignore_index=-100, reduction="mean", smoothing=0.0):
    """Straight from the definition: class dim 1, explicit smoothed one-hot targets."""
    C = x.shape[1]
    z = x - x.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    valid = t != ignore_index
    onehot = np.moveaxis(np.eye(C)[np.where(valid, t, 0)], -1, 1)
    q = (1 - smoothing) * onehot + smoothing / C
    w = np.ones(C) if w is None else w
    wshape = (1, C) + (1,) * (x.ndim - 2)
    per = -(q * logp * w.reshape(wshape)).sum(axis=1) * valid
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / (w[np.where(valid, t, 0)] * valid).sum()


def targets(rng, shape, C, ignore_index=None, frac=0.3):
    t = rng.integers(0, C, shape)
    if ignore_index is not None:
        t[rng.random(shape) < frac] = ignore_index
    return t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_2d(reduction, smoothing):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5)) * 2
    t = targets(rng, 6, 5, ignore_index=-100)
    check_op(lambda a, b: F.cross_entropy(a, b, reduction=reduction, label_smoothing=smoothing),
             lambda a, b: np_cross_entropy(a, b, reduction=reduction, smoothing=smoothing),
             [x, t],
             torch_fn=lambda a, b: TF.cross_entropy(a, b, reduction=reduction,
                                                    label_smoothing=smoothing))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_class_weights_and_custom_ignore_index(reduction, smoothing):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 4))
    t = targets(rng, 7, 4, ignore_index=2)  # ignoring a real class, as torch allows
    w = rng.uniform(0.5, 2.0, 4)
    kw = dict(ignore_index=2, reduction=reduction)
    check_op(lambda a, b, c: F.cross_entropy(a, b, c, label_smoothing=smoothing, **kw),
             lambda a, b, c: np_cross_entropy(a, b, c, smoothing=smoothing, **kw),
             [x, t, w], grad=[True, False, False],
             torch_fn=lambda a, b, c: TF.cross_entropy(a, b, c, label_smoothing=smoothing,
                                                       **kw))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_spatial_class_dim_1(reduction):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 3, 2))  # (N, C, d1, d2)
    t = targets(rng, (2, 3, 2), 4, ignore_index=-1)
    check_op(lambda a, b: F.cross_entropy(a, b, ignore_index=-1, reduction=reduction,
                                          label_smoothing=0.1),
             lambda a, b: np_cross_entropy(a, b, ignore_index=-1, reduction=reduction,
                                           smoothing=0.1),
             [x, t],
             torch_fn=lambda a, b: TF.cross_entropy(a, b, ignore_index=-1,
                                                    reduction=reduction, label_smoothing=0.1))


def test_cross_entropy_unbatched():
    x = np.array([0.5, -1.0, 2.0])
    t = np.array(2)
    check_op(lambda a, b: F.cross_entropy(a, b),
             lambda a, b: np_cross_entropy(a[None], b[None]), [x, t],
             torch_fn=lambda a, b: TF.cross_entropy(a, b))


def test_cross_entropy_float32_hot_path_matches_float64():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 33)) * 4).astype(np.float32)
    t = rng.integers(0, 33, 64)
    lt = narun.tensor(x, requires_grad=True)
    loss = F.cross_entropy(lt, narun.tensor(t))
    loss.backward()
    assert loss.dtype == np.float32 and lt.grad.dtype == np.float32
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(loss.item(), np_cross_entropy(x64, t), rtol=1e-6)
    p = np.exp(x64 - x64.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(64), t] -= 1
    np.testing.assert_allclose(lt.grad.numpy(), p / 64, rtol=1e-4, atol=1e-7)


def test_cross_entropy_backward_twice_with_retain_graph_and_input_untouched():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 3))
    lt = narun.tensor(x, requires_grad=True)
    loss = F.cross_entropy(lt * 1.0, narun.tensor(np.array([0, 1, 2, 1, 0])),
                           label_smoothing=0.1)
    loss.backward(retain_graph=True)
    first = lt.grad.numpy().copy()
    loss.backward()  # the first backward consumed the saved buffer; this one recomputes it
    np.testing.assert_allclose(lt.grad.numpy(), 2 * first, rtol=1e-12)
    np.testing.assert_array_equal(lt.numpy(), x)


def test_cross_entropy_all_ignored_is_nan_with_zero_grad_as_torch():
    lt = narun.tensor(np.ones((3, 4)), requires_grad=True)
    loss = F.cross_entropy(lt, narun.tensor(np.full(3, -100)))
    assert np.isnan(loss.item())
    loss.backward()
    np.testing.assert_array_equal(lt.grad.numpy(), np.zeros((3, 4)))


def test_cross_entropy_errors():
    x = narun.tensor(np.zeros((3, 4)), requires_grad=True)
    with pytest.raises(IndexError, match="target 4 is out of bounds for 4 classes"):
        F.cross_entropy(x, narun.tensor(np.array([0, 4, 1])))
    with pytest.raises(ShapeError, match=r"expected target shape \(3,\)"):
        F.cross_entropy(x, narun.tensor(np.array([0, 1])))
    with pytest.raises(DTypeError, match="integer"):
        F.cross_entropy(x, narun.tensor(np.zeros((3, 4))))
    with pytest.raises(ConfigError, match="reduction"):
        F.cross_entropy(x, narun.tensor(np.array([0, 1, 2])), reduction="avg")
    with pytest.raises(ConfigError, match="label_smoothing"):
        F.cross_entropy(x, narun.tensor(np.array([0, 1, 2])), label_smoothing=1.5)
    with pytest.raises(ShapeError, match=r"weight must have shape \(4,\)"):
        F.cross_entropy(x, narun.tensor(np.array([0, 1, 2])), narun.tensor(np.ones(3)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss(reduction):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4))
    t = targets(rng, (2, 4), 3, ignore_index=-100)
    w = rng.uniform(0.5, 2.0, 3)

    def ref(a, b, c):
        valid = b != -100
        bs = np.where(valid, b, 0)
        picked = np.take_along_axis(a, bs[:, None], axis=1)[:, 0]
        per = -picked * c[bs] * valid
        if reduction == "none":
            return per
        return per.sum() if reduction == "sum" else per.sum() / (c[bs] * valid).sum()

    check_op(lambda a, b, c: F.nll_loss(a, b, c, reduction=reduction), ref, [x, t, w],
             grad=[True, False, False],
             torch_fn=lambda a, b, c: TF.nll_loss(a, b, c, reduction=reduction))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss(reduction):
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))

    def ref(x, y):
        d = (x - y) ** 2
        return d if reduction == "none" else (d.sum() if reduction == "sum" else d.mean())

    check_op(lambda x, y: F.mse_loss(x, y, reduction), ref, [a, b],
             torch_fn=lambda x, y: TF.mse_loss(x, y, reduction=reduction))


def test_mse_loss_broadcasts_target_and_accepts_arrays():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal(4)
    check_op(lambda x, y: F.mse_loss(x, y), lambda x, y: ((x - y) ** 2).mean(), [a, b])
    x = narun.tensor(a.astype(np.float32), requires_grad=True)
    loss = F.mse_loss(x, b)
    loss.backward()
    assert loss.dtype == np.float32 and x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad.numpy(), 2 * (a - b) / 12, rtol=1e-5)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_cross_entropy_matches_torch_on_a_larger_float32_batch():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((256, 50)).astype(np.float32) * 3
    t = targets(rng, 256, 50, ignore_index=-100, frac=0.1)
    lt = narun.tensor(x, requires_grad=True)
    F.cross_entropy(lt, narun.tensor(t), label_smoothing=0.05).backward()
    tt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    TF.cross_entropy(tt, torch.tensor(t), label_smoothing=0.05).backward()
    np.testing.assert_allclose(lt.grad.numpy(), tt.grad.numpy(), rtol=1e-4, atol=1e-7)
