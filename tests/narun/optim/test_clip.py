"""clip_grad_norm_ and clip_grad_value_ against NumPy and torch.nn.utils."""

from __future__ import annotations

import math

import numpy as np
import pytest

import narun
from narun import nn, optim
from narun.errors import GradError
from narun.nn.utils import clip_grad_norm_, clip_grad_value_
from tests.opcheck import HAS_TORCH

if HAS_TORCH:
    import torch

    torch.set_num_threads(1)  # its spinning worker threads crawl on a shared 2-core box

SHAPES = [(4, 3), (5,), (2, 2, 2)]


def _params(seed: int, dtype=np.float32, scale: float = 1.0) -> list[nn.Parameter]:
    rng = np.random.default_rng(seed)
    params = []
    for s in SHAPES:
        p = nn.Parameter(narun.zeros(s, dtype=dtype))
        p.grad = narun.tensor(rng.standard_normal(s) * scale, dtype=dtype)
        params.append(p)
    return params


def _np_norm(grads: list[np.ndarray], norm_type: float) -> float:
    flat = np.concatenate([g.ravel().astype(np.float64) for g in grads])
    if norm_type == math.inf:
        return float(np.abs(flat).max())
    return float((np.abs(flat) ** norm_type).sum() ** (1 / norm_type))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_numpy(norm_type, max_norm):
    params = _params(0, np.float64)
    before = [p.grad.numpy().copy() for p in params]
    total = clip_grad_norm_(params, max_norm, norm_type)
    expected = _np_norm(before, norm_type)
    assert isinstance(total, narun.Tensor) and total.shape == ()
    assert total.item() == pytest.approx(expected, rel=1e-12)
    coef = min(max_norm / (expected + 1e-6), 1.0)
    for p, g in zip(params, before):
        np.testing.assert_allclose(p.grad.numpy(), g * coef, rtol=1e-12)
    if max_norm < expected:
        assert _np_norm([p.grad.numpy() for p in params], norm_type) == pytest.approx(
            max_norm, rel=1e-5)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clip_grad_norm_matches_torch(norm_type):
    params = _params(1, np.float32, scale=3.0)
    tparams = []
    for p in params:
        tp = torch.nn.Parameter(torch.zeros(p.shape, dtype=torch.float32))
        tp.grad = torch.tensor(p.grad.numpy().copy())
        tparams.append(tp)
    total = clip_grad_norm_(params, 1.0, norm_type)
    ttotal = torch.nn.utils.clip_grad_norm_(tparams, 1.0, norm_type)
    assert total.dtype == np.float32
    assert total.item() == pytest.approx(ttotal.item(), rel=1e-6)
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.grad.numpy(), tp.grad.numpy(), rtol=1e-6, atol=1e-7)
        assert p.grad.dtype == np.float32


def test_clip_grad_norm_skips_missing_grads_and_takes_one_tensor():
    params = _params(2)
    params[1].grad = None
    expected = _np_norm([params[0].grad.numpy(), params[2].grad.numpy()], 2.0)
    assert clip_grad_norm_(iter(params), 10.0).item() == pytest.approx(expected, rel=1e-6)
    one = params[0]
    g = one.grad.numpy().copy()
    clip_grad_norm_(one, 0.1)
    np.testing.assert_allclose(np.linalg.norm(one.grad.numpy()), 0.1, rtol=1e-5)
    np.testing.assert_allclose(one.grad.numpy() / np.linalg.norm(one.grad.numpy()),
                               g / np.linalg.norm(g), rtol=1e-5)
    assert clip_grad_norm_([nn.Parameter(narun.zeros(2))], 1.0).item() == 0.0


def test_clip_grad_norm_nonfinite():
    params = _params(3)
    params[0].grad.data[0, 0] = np.inf
    with pytest.raises(GradError, match="non-finite"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert math.isinf(clip_grad_norm_(params, 1.0).item())


def test_clip_grad_value():
    params = _params(4, scale=2.0)
    before = [p.grad.numpy().copy() for p in params]
    arrays = [p.grad.data for p in params]
    clip_grad_value_(params, 0.7)
    for p, g, arr in zip(params, before, arrays):
        assert p.grad.data is arr  # in place
        np.testing.assert_array_equal(p.grad.numpy(), np.clip(g, -0.7, 0.7))
    assert optim.clip_grad_value_ is clip_grad_value_ and optim.clip_grad_norm_ is \
        clip_grad_norm_
