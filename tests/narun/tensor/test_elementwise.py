import math

import numpy as np
import pytest

import narun
from narun.tensor import erf
from tests.opcheck import HAS_TORCH, check_op

if HAS_TORCH:
    import torch

rng = np.random.default_rng(0)
SHAPES = [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((3, 1), (1, 5)), ((), (2, 3))]


def tf(name):
    return lambda *a: getattr(torch, name)(*a)


@pytest.mark.parametrize("sa,sb", SHAPES)
@pytest.mark.parametrize("name,ref", [
    ("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
])
def test_binary_broadcasting(name, ref, sa, sb):
    a, b = rng.standard_normal(sa), rng.standard_normal(sb)
    check_op(lambda x, y: getattr(x, name)(y), ref, [a, b], torch_fn=tf(name))


@pytest.mark.parametrize("sa,sb", SHAPES)
def test_div(sa, sb):
    a, b = rng.standard_normal(sa), rng.uniform(0.5, 2.0, sb) * rng.choice([-1, 1], sb)
    check_op(lambda x, y: x / y, np.divide, [a, b], torch_fn=tf("div"))


def test_pow_tensor_exponent():
    a, b = rng.uniform(0.5, 2.0, (3, 4)), rng.standard_normal((4,))
    check_op(lambda x, y: x**y, np.power, [a, b], torch_fn=tf("pow"))


@pytest.mark.parametrize("p", [2, 3, 0.5, -1.5])
def test_pow_scalar_exponent(p):
    a = rng.uniform(0.5, 2.0, (3, 4))
    check_op(lambda x: x**p, lambda x: x**p, [a],
             torch_fn=lambda x: x**p)


def test_scalar_operands_on_both_sides():
    a = rng.standard_normal((2, 3))
    check_op(lambda x: 2.0 - x * 3 + 1 / (x * x + 1) - x / 4,
             lambda x: 2.0 - x * 3 + 1 / (x * x + 1) - x / 4, [a])


def _erf(x):
    return np.vectorize(math.erf)(x)


UNARY = [
    ("neg", lambda x: -x, lambda x: -x, None),
    ("exp", lambda x: x.exp(), np.exp, "exp"),
    ("log", lambda x: x.log(), np.log, "log"),
    ("sqrt", lambda x: x.sqrt(), np.sqrt, "sqrt"),
    ("rsqrt", lambda x: x.rsqrt(), lambda x: 1 / np.sqrt(x), "rsqrt"),
    ("abs", lambda x: x.abs(), np.abs, "abs"),
    ("builtin_abs", lambda x: abs(x), np.abs, None),
    ("pos", lambda x: +x, lambda x: +x, None),
    ("tanh", lambda x: x.tanh(), np.tanh, "tanh"),
    ("sigmoid", lambda x: x.sigmoid(), lambda x: 1 / (1 + np.exp(-x)), "sigmoid"),
    ("relu", lambda x: x.relu(), lambda x: np.maximum(x, 0), "relu"),
    ("silu", lambda x: x.silu(), lambda x: x / (1 + np.exp(-x)), None),
    ("gelu", lambda x: x.gelu(), lambda x: 0.5 * x * (1 + _erf(x / np.sqrt(2))), None),
    ("gelu_tanh", lambda x: x.gelu("tanh"),
     lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))), None),
]


def _torch_unary(name):
    fns = {"neg": lambda x: torch.neg(x), "builtin_abs": abs, "pos": lambda x: +x,
           "silu": lambda x: torch.nn.functional.silu(x),
           "gelu": lambda x: torch.nn.functional.gelu(x),
           "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}
    return fns.get(name) or tf(name)


@pytest.mark.parametrize("name,fn,ref,_", UNARY, ids=[u[0] for u in UNARY])
@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_unary(name, fn, ref, _, shape):
    x = rng.standard_normal(shape)
    if name in ("log", "sqrt", "rsqrt"):
        x = np.abs(x) + 0.5
    if name in ("abs", "builtin_abs", "relu"):
        x = np.where(np.abs(x) < 0.05, 0.3, x)  # keep finite differences off the kink
    check_op(fn, ref, [x], torch_fn=_torch_unary(name))


def test_sigmoid_and_silu_do_not_overflow():
    x = narun.tensor([-1000.0, -100.0, 0.0, 100.0, 1000.0])
    np.testing.assert_allclose(x.sigmoid().numpy(), [0, 0, 0.5, 1, 1], atol=1e-30)
    np.testing.assert_allclose(x.silu().numpy(), [0, 0, 0, 100, 1000], atol=1e-30)


def test_erf_is_accurate_to_float64():
    x = np.linspace(-8, 8, 4001)
    np.testing.assert_allclose(erf(x), _erf(x), rtol=0, atol=4e-15)


def test_maximum_minimum_clamp():
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4,))
    check_op(lambda x, y: x.maximum(y), np.maximum, [a, b])
    check_op(lambda x, y: x.minimum(y), np.minimum, [a, b])
    x = rng.standard_normal((4, 5))
    x = np.where(np.abs(np.abs(x) - 0.5) < 0.05, 0.1, x)
    check_op(lambda t: t.clamp(-0.5, 0.5), lambda t: np.clip(t, -0.5, 0.5), [x],
             torch_fn=lambda t: t.clamp(-0.5, 0.5))


@pytest.mark.parametrize("fn,ref", [
    (lambda x: 2.0 / x, lambda x: 2.0 / x), (lambda x: 3.0 - x, lambda x: 3.0 - x),
    (lambda x: 1.5 ** x, lambda x: 1.5 ** x), (lambda x: 0.5 + x, lambda x: 0.5 + x),
    (lambda x: 4.0 * x, lambda x: 4.0 * x),
], ids=["rtruediv", "rsub", "rpow", "radd", "rmul"])
def test_reflected_operators_with_a_python_number_on_the_left(fn, ref):
    x = np.abs(rng.standard_normal((3, 4))) + 0.5
    check_op(fn, ref, [x], torch_fn=fn)


def test_bitwise_operators_on_masks_and_integers():
    a, b = rng.standard_normal(6) > 0, rng.standard_normal(6) > 0
    ta, tb = narun.tensor(a), narun.tensor(b)
    for got, want in (((ta & tb), a & b), ((ta | tb), a | b), ((ta ^ tb), a ^ b),
                      ((~ta), ~a), ((True & ta), True & a), ((ta | False), a | False)):
        assert got.dtype == np.bool_ and not got.requires_grad
        np.testing.assert_array_equal(got.numpy(), want)
    i, j = np.array([5, 12, -3]), np.array([3, 10, 7])
    ti, tj = narun.tensor(i), narun.tensor(j)
    for got, want in (((ti & tj), i & j), ((ti | 1), i | 1), ((6 ^ ti), 6 ^ i), ((~ti), ~i)):
        np.testing.assert_array_equal(got.numpy(), want)
    x = narun.tensor([1.0, -2.0], requires_grad=True)
    with pytest.raises(TypeError, match=r"&: needs bool or integer tensors, got float32"):
        x & ta[:2]
    with pytest.raises(TypeError, match=r"~: .*compare first"):
        _ = ~x


def test_comparisons_have_no_grad():
    a = narun.tensor([1.0, 2.0, 3.0], requires_grad=True)
    m = a > 1.5
    assert not m.requires_grad
    np.testing.assert_array_equal(m.numpy(), [False, True, True])
    np.testing.assert_array_equal((a == 2.0).numpy(), [False, True, False])
    np.testing.assert_array_equal((a <= 2).numpy(), [True, True, False])


def test_cast_is_differentiable_for_floats():
    x = narun.tensor([1.0, 2.0], dtype="float64", requires_grad=True)
    y = x.to(dtype="float32")
    assert y.dtype == np.float32
    (y * 3).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 3.0])
    assert not x.long().requires_grad


def _off_the_jumps(a, b):
    """Moves a away from whole multiples of b, where // and % jump."""
    frac = np.mod(a / b, 1.0)
    return np.where((frac < 0.1) | (frac > 0.9), a + 0.5 * b, a)


@pytest.mark.parametrize("sa,sb", SHAPES)
@pytest.mark.parametrize("sign", [1, -1])
def test_remainder_has_the_divisors_sign_and_its_gradients(sa, sb, sign):
    b = sign * (np.abs(rng.standard_normal(sb)) + 0.5)
    a = _off_the_jumps(3 * rng.standard_normal(sa), b)
    check_op(lambda x, y: x % y, np.remainder, [a, b], torch_fn=tf("remainder"))
    check_op(lambda x, y: x.remainder(y), np.remainder, [a, b])


@pytest.mark.parametrize("sa,sb", SHAPES)
def test_floor_divide_rounds_down_and_carries_no_gradient(sa, sb):
    b = np.abs(rng.standard_normal(sb)) + 0.5
    b = np.where(rng.standard_normal(sb) > 0, b, -b)
    a = _off_the_jumps(3 * rng.standard_normal(sa), b)
    check_op(lambda x, y: x // y, np.floor_divide, [a, b], grad=[False, False],
             torch_fn=tf("floor_divide"))
    x = narun.tensor(a, requires_grad=True)
    assert not (x // 2.0).requires_grad and not x.floor_divide(narun.tensor(b)).requires_grad


def test_floor_divide_and_remainder_on_integers_follow_python():
    i, j = np.array([-7, 7, -8, 9]), np.array([2, -3, 3, 4])
    ti, tj = narun.tensor(i), narun.tensor(j)
    for got, want in (((ti // tj), [-4, -3, -3, 2]), ((ti % tj), [1, -2, 1, 1]),
                      ((ti // 2), [-4, 3, -4, 4]), ((ti % 3), [2, 1, 1, 0]),
                      ((20 // tj), [10, -7, 6, 5]), ((20 % tj), [0, -1, 2, 0])):
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got.numpy(), want)
        np.testing.assert_array_equal(want, [int(w) for w in want])  # Python's own // and %
    np.testing.assert_array_equal((ti // tj).numpy(), [a // b for a, b in zip(i, j)])
    np.testing.assert_array_equal((ti % tj).numpy(), [a % b for a, b in zip(i, j)])
    if HAS_TORCH:
        ttj, tti = torch.tensor(j), torch.tensor(i)
        np.testing.assert_array_equal((ti // tj).numpy(), (tti // ttj).numpy())
        np.testing.assert_array_equal((ti % tj).numpy(), (tti % ttj).numpy())
    with pytest.raises(ZeroDivisionError, match=r"floor_divide: integer // by zero"):
        ti // narun.tensor([1, 0, 1, 1])
    with pytest.raises(ZeroDivisionError, match=r"remainder: integer % by zero"):
        ti % 0
    with pytest.warns(RuntimeWarning, match="divide by zero"):  # as float / does
        floats = narun.tensor([1.0, -1.0]) // 0.0
    np.testing.assert_array_equal(floats.numpy(), [np.inf, -np.inf])


def test_in_place_floor_divide_and_remainder_are_refused():
    t = narun.tensor([3.0, 4.0])
    with pytest.raises(TypeError, match=r"in-place //= .* write t = t // x"):
        t //= 2
    with pytest.raises(TypeError, match=r"in-place %= .* write t = t % x"):
        t %= 2
