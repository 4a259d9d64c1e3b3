import numpy as np
import pytest

import narun
from narun.errors import ConfigError
from narun.nn import functional as F
from tests.opcheck import check_op


def test_dropout_mask_is_the_seeded_generator_draw():
    x = np.random.default_rng(0).standard_normal((3, 4, 5))
    p = 0.3

    def fn(t):
        narun.manual_seed(11)
        return F.dropout(t, p)

    def ref(a):
        keep = np.random.default_rng(11).random(a.shape, dtype=np.float32) >= p
        return a * keep / (1 - p)

    check_op(fn, ref, [x])


def test_dropout_statistics():
    narun.manual_seed(1)
    x = narun.tensor(np.ones((200, 500), dtype=np.float32), requires_grad=True)
    y = F.dropout(x, 0.25)
    assert y.dtype == np.float32
    vals = y.numpy()
    kept = vals != 0
    np.testing.assert_allclose(vals[kept], 1 / 0.75, rtol=1e-6)
    # 100000 Bernoulli(0.75) draws: the kept fraction is within 5 sigma of 0.75
    assert abs(kept.mean() - 0.75) < 5 * np.sqrt(0.75 * 0.25 / kept.size)
    assert abs(vals.mean() - 1.0) < 0.02
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), vals)  # gradient is the same scaled mask


def test_dropout_identity_cases_and_p_one():
    x = narun.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    y = F.dropout(x, 1.0)
    np.testing.assert_array_equal(y.numpy(), np.zeros((2, 3)))
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="p must be in"):
        F.dropout(x, 1.5)
