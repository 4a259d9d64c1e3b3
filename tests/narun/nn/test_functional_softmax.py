import numpy as np
import pytest

import narun
from narun.errors import DTypeError, ShapeError
from narun.nn import functional as F
from tests.opcheck import check_op


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x, axis):
    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


@pytest.mark.parametrize("shape,dim", [((5,), 0), ((3, 4), -1), ((3, 4), 0), ((2, 3, 4), 1)])
def test_softmax(shape, dim):
    x = np.random.default_rng(1).standard_normal(shape) * 3
    check_op(lambda t: F.softmax(t, dim), lambda a: np_softmax(a, dim), [x],
             torch_fn=lambda t: t.softmax(dim))


@pytest.mark.parametrize("shape,dim", [((5,), 0), ((3, 4), -1), ((2, 3, 4), 1)])
def test_log_softmax(shape, dim):
    x = np.random.default_rng(2).standard_normal(shape) * 3
    check_op(lambda t: F.log_softmax(t, dim), lambda a: np_log_softmax(a, dim), [x],
             torch_fn=lambda t: t.log_softmax(dim))


def test_softmax_is_stable_for_huge_logits_and_keeps_float32():
    x = narun.tensor(np.array([[1000.0, 1001.0, -1000.0]], dtype=np.float32),
                     requires_grad=True)
    y = F.softmax(x, -1)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.numpy(), np_softmax(x.numpy().astype(np.float64), -1),
                               rtol=1e-6)
    ls = F.log_softmax(x, -1)
    np.testing.assert_allclose(ls.numpy(), [[-1.3132616, -0.3132616, -2001.3132616]],
                               rtol=1e-6)
    (y * narun.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    assert x.grad.dtype == np.float32 and np.isfinite(x.grad.numpy()).all()


def test_softmax_rejects_bad_arguments():
    with pytest.raises(ShapeError, match="dim 2 is out of range"):
        F.softmax(narun.tensor(np.ones((2, 2))), 2)
    with pytest.raises(DTypeError, match="floating point"):
        F.log_softmax(narun.tensor(np.ones(3, dtype=np.int64)), 0)


def test_reexported_activations_are_the_tensor_ops():
    from narun.tensor import gelu, linear

    assert F.gelu is gelu and F.linear is linear
    x = narun.tensor(np.linspace(-2, 2, 5))
    np.testing.assert_allclose(F.relu(x).numpy(), np.maximum(np.linspace(-2, 2, 5), 0))
    np.testing.assert_allclose(F.gelu(x, approximate="tanh").numpy()[-1], 1.9545977, rtol=1e-6)
    for name in ("relu", "gelu", "silu", "sigmoid", "tanh", "linear"):
        assert name in F.__all__ and callable(getattr(F, name))
