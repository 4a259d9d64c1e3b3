"""narun.nn.init: fans and gains against torch, distributions by their statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

import narun
from narun.errors import ConfigError, DTypeError, ShapeError
from narun.nn import init
from tests.opcheck import HAS_TORCH, compare_with_torch

if HAS_TORCH:
    import torch

    torch.set_num_threads(1)  # its spinning worker threads crawl on a shared 2-core box

N = 200_000  # draws per statistic: the mean's standard error is std / 447


def _draw(fn, *args, shape=(400, 500), dtype=np.float32, **kw) -> np.ndarray:
    t = narun.zeros(*shape, dtype=dtype)
    before = t.data
    assert fn(t, *args, **kw) is t
    assert t.data is before  # filled in place
    return t.numpy().astype(np.float64)


def _check_moments(x: np.ndarray, mean: float, std: float) -> None:
    se = std / math.sqrt(x.size)
    assert abs(x.mean() - mean) < 5 * se, (x.mean(), mean)
    assert abs(x.std() - std) < 0.01 * std, (x.std(), std)


SHAPES = [(3, 4), (8, 3, 3, 3), (5, 2, 7), (4, 6, 1, 2, 3), (1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_fans_match_torch_formula(shape):
    receptive = math.prod(shape[2:])
    assert init.calculate_fan_in_and_fan_out(narun.zeros(shape)) == (
        shape[1] * receptive, shape[0] * receptive)
    if compare_with_torch("fans"):
        from torch.nn.init import _calculate_fan_in_and_fan_out
        assert init.calculate_fan_in_and_fan_out(narun.zeros(shape)) == \
            _calculate_fan_in_and_fan_out(torch.zeros(shape))


def test_fans_need_two_dims():
    with pytest.raises(ShapeError, match="at least 2 dims"):
        init.calculate_fan_in_and_fan_out(narun.zeros(5))


@pytest.mark.parametrize("name,param,expected", [
    ("linear", None, 1.0), ("conv2d", None, 1.0), ("sigmoid", None, 1.0),
    ("tanh", None, 5 / 3), ("relu", None, math.sqrt(2)), ("selu", None, 0.75),
    ("leaky_relu", None, math.sqrt(2 / (1 + 0.01**2))),
    ("leaky_relu", math.sqrt(5), math.sqrt(2 / 6)),
])
def test_gain(name, param, expected):
    assert init.calculate_gain(name, param) == pytest.approx(expected, rel=1e-12)
    if compare_with_torch("gain"):
        assert init.calculate_gain(name, param) == pytest.approx(
            torch.nn.init.calculate_gain(name, param), rel=1e-12)


def test_gain_unknown():
    with pytest.raises(ConfigError, match="unsupported nonlinearity 'swish'"):
        init.calculate_gain("swish")


def test_uniform_and_normal_statistics():
    x = _draw(init.uniform_, -0.5, 1.5)
    assert x.min() >= -0.5 and x.max() <= 1.5
    _check_moments(x, 0.5, 2 / math.sqrt(12))
    _check_moments(_draw(init.normal_, 3.0, 0.25), 3.0, 0.25)
    x64 = narun.zeros(N, dtype=np.float64)
    init.normal_(x64)
    assert x64.dtype == np.float64
    _check_moments(x64.numpy(), 0.0, 1.0)


def test_xavier_and_kaiming_scales():
    shape = (300, 200, 3)  # fan_in 600, fan_out 900
    bound = 2.0 * math.sqrt(6 / 1500)
    x = _draw(init.xavier_uniform_, 2.0, shape=shape)
    assert x.min() >= -bound and x.max() <= bound
    _check_moments(x, 0.0, bound / math.sqrt(3))
    _check_moments(_draw(init.xavier_normal_, shape=shape), 0.0, math.sqrt(2 / 1500))

    x = _draw(init.kaiming_uniform_, math.sqrt(5), shape=shape)
    bound = math.sqrt(2 / 6) * math.sqrt(3 / 600)  # = 1/sqrt(fan_in): torch's Linear init
    assert bound == pytest.approx(1 / math.sqrt(600))
    assert x.min() >= -bound and x.max() <= bound and x.max() > 0.99 * bound
    _check_moments(x, 0.0, bound / math.sqrt(3))
    x = _draw(init.kaiming_normal_, mode="fan_out", nonlinearity="relu", shape=shape)
    _check_moments(x, 0.0, math.sqrt(2) / math.sqrt(900))
    with pytest.raises(ConfigError, match="fan_in"):
        init.kaiming_normal_(narun.zeros(3, 3), mode="fan")


def _truncated_moments(mean, std, a, b):
    al, be = (a - mean) / std, (b - mean) / std
    pdf = [math.exp(-v * v / 2) / math.sqrt(2 * math.pi) for v in (al, be)]
    z = 0.5 * (math.erf(be / math.sqrt(2)) - math.erf(al / math.sqrt(2)))
    m = (pdf[0] - pdf[1]) / z
    var = 1 + (al * pdf[0] - be * pdf[1]) / z - m * m
    return mean + std * m, std * math.sqrt(var)


@pytest.mark.parametrize("mean,std,a,b", [
    (0.0, 1.0, -2.0, 2.0),      # the default: sampled from the normal itself
    (0.5, 2.0, -1.0, 4.0),      # asymmetric
    (0.0, 1.0, 0.1, 0.3),       # narrow: sampled uniformly, accepted by density ratio
    (0.0, 0.02, -2.0, 2.0),     # GPT-style: the bounds never bind
])
def test_trunc_normal_statistics(mean, std, a, b):
    x = _draw(init.trunc_normal_, mean, std, a, b)
    assert x.min() >= a and x.max() <= b
    m, s = _truncated_moments(mean, std, a, b)
    _check_moments(x, m, s)


def test_trunc_normal_refuses_empty_tail():
    with pytest.raises(ConfigError, match="too little"):
        init.trunc_normal_(narun.zeros(10), 0.0, 1.0, 6.0, math.inf)
    with pytest.raises(ConfigError, match="a < b"):
        init.trunc_normal_(narun.zeros(10), a=1.0, b=1.0)


def test_constants():
    t = narun.zeros(3, 2)
    assert init.constant_(t, 2.5) is t
    np.testing.assert_array_equal(t.numpy(), np.full((3, 2), 2.5))
    np.testing.assert_array_equal(init.ones_(t).numpy(), np.ones((3, 2)))
    np.testing.assert_array_equal(init.zeros_(t).numpy(), np.zeros((3, 2)))
    ints = narun.tensor([1, 2, 3])
    np.testing.assert_array_equal(init.constant_(ints, 7).numpy(), [7, 7, 7])


def test_random_init_rejects_integer_tensors():
    with pytest.raises(DTypeError, match="int64"):
        init.normal_(narun.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="narun Tensor"):
        init.normal_(np.zeros(3))


def test_seed_reproduces_and_generator_argument():
    narun.manual_seed(11)
    a = init.normal_(narun.zeros(50)).numpy().copy()
    narun.manual_seed(11)
    b = init.normal_(narun.zeros(50)).numpy().copy()
    np.testing.assert_array_equal(a, b)
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    c = init.trunc_normal_(narun.zeros(50), generator=g1).numpy().copy()
    d = init.trunc_normal_(narun.zeros(50), generator=g2).numpy().copy()
    np.testing.assert_array_equal(c, d)
    assert not np.array_equal(a, c)


def test_non_contiguous_and_half_tensors_are_written_through():
    base = narun.zeros(6, 8)
    view = narun.Tensor._wrap(base.data[:, ::2])  # a strided view of base
    init.uniform_(view, 1.0, 2.0)
    assert (base.numpy()[:, ::2] >= 1).all() and (base.numpy()[:, 1::2] == 0).all()
    half = narun.zeros(1000, dtype=np.float16)
    init.normal_(half, 0.0, 1.0)
    assert half.dtype == np.float16 and 0.8 < half.numpy().astype(np.float64).std() < 1.2


def test_layers_with_zero_fan_in_get_zero_bias_not_garbage():
    from narun import nn

    conv = nn.Conv2d(0, 3, kernel_size=2)
    lin = nn.Linear(0, 3)
    np.testing.assert_array_equal(conv.bias.numpy(), np.zeros(3, np.float32))
    np.testing.assert_array_equal(lin.bias.numpy(), np.zeros(3, np.float32))
