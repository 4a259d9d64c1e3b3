import numpy as np
import pytest

import narun
from narun.errors import ShapeError
from narun.nn import functional as F
from tests.opcheck import HAS_TORCH, check_op

if HAS_TORCH:
    import torch
    import torch.nn.functional as TF


def np_layer_norm(x, k, w=None, b=None, eps=1e-5):
    axes = tuple(range(x.ndim - k, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    return y * (1 if w is None else w) + (0 if b is None else b)


def np_rms_norm(x, k, w=None, eps=None):
    eps = np.finfo(x.dtype).eps if eps is None else eps
    axes = tuple(range(x.ndim - k, x.ndim))
    y = x / np.sqrt((x * x).mean(axis=axes, keepdims=True) + eps)
    return y * (1 if w is None else w)


@pytest.mark.parametrize("xshape,ns", [((4, 6), (6,)), ((2, 3, 5), (5,)), ((2, 3, 4), (3, 4))])
def test_layer_norm_with_affine(xshape, ns):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(xshape) * 2 + 1
    w, b = rng.standard_normal(ns), rng.standard_normal(ns)
    check_op(lambda a, c, d: F.layer_norm(a, ns, c, d), lambda a, c, d: np_layer_norm(a, len(ns),
             c, d), [x, w, b], torch_fn=lambda a, c, d: TF.layer_norm(a, ns, c, d))


def test_layer_norm_weight_only_bias_only_and_none():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 5)), rng.standard_normal(5)
    check_op(lambda a, c: F.layer_norm(a, 5, c, eps=1e-3),
             lambda a, c: np_layer_norm(a, 1, c, eps=1e-3), [x, w],
             torch_fn=lambda a, c: TF.layer_norm(a, (5,), c, eps=1e-3))
    check_op(lambda a, d: F.layer_norm(a, 5, bias=d), lambda a, d: np_layer_norm(a, 1, b=d),
             [x, w], torch_fn=lambda a, d: TF.layer_norm(a, (5,), bias=d))
    check_op(lambda a: F.layer_norm(a, (5,)), lambda a: np_layer_norm(a, 1), [x],
             torch_fn=lambda a: TF.layer_norm(a, (5,)))


@pytest.mark.parametrize("xshape,ns", [((4, 6), (6,)), ((2, 3, 4), (3, 4))])
def test_rms_norm(xshape, ns):
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal(xshape), rng.standard_normal(ns)
    check_op(lambda a, c: F.rms_norm(a, ns, c), lambda a, c: np_rms_norm(a, len(ns), c), [x, w],
             torch_fn=lambda a, c: TF.rms_norm(a, ns, c))
    check_op(lambda a: F.rms_norm(a, ns, eps=1e-4), lambda a: np_rms_norm(a, len(ns), eps=1e-4),
             [x], torch_fn=lambda a: TF.rms_norm(a, ns, eps=1e-4))


def test_rms_norm_default_eps_is_the_dtype_epsilon():
    x = np.zeros((2, 3), dtype=np.float32)
    x[0, 0] = 1e-4
    out = F.rms_norm(narun.tensor(x), 3).numpy()
    expected = 1e-4 / np.sqrt(1e-8 / 3 + np.finfo(np.float32).eps)
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-5)


def test_norms_keep_float32_in_forward_and_backward():
    rng = np.random.default_rng(3)
    x = narun.tensor(rng.standard_normal((4, 8)).astype(np.float32), requires_grad=True)
    w = narun.tensor(np.ones(8, dtype=np.float32), requires_grad=True)
    b = narun.tensor(np.zeros(8, dtype=np.float32), requires_grad=True)
    (F.layer_norm(x, 8, w, b) * F.rms_norm(x, 8, w)).sum().backward()
    for t in (x, w, b):
        assert t.grad.dtype == np.float32


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_layer_norm_float32_gpt_shape_matches_torch():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 16, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    g = rng.standard_normal((4, 16, 64)).astype(np.float32)
    ts = [narun.tensor(a, requires_grad=True) for a in (x, w, b)]
    F.layer_norm(ts[0], 64, ts[1], ts[2]).backward(narun.tensor(g))
    tt = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (x, w, b)]
    TF.layer_norm(tt[0], (64,), tt[1], tt[2]).backward(torch.tensor(g))
    for mine, theirs in zip(ts, tt):
        np.testing.assert_allclose(mine.grad.numpy(), theirs.grad.numpy(), rtol=2e-4,
                                   atol=2e-4)


def test_norm_shape_errors():
    x = narun.tensor(np.ones((2, 3)))
    with pytest.raises(ShapeError, match="suffix"):
        F.layer_norm(x, (2,))
    with pytest.raises(ShapeError, match=r"weight has shape \(2,\), expected"):
        F.rms_norm(x, 3, narun.tensor(np.ones(2)))
