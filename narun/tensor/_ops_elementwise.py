"""Elementwise ops: arithmetic, unary math, activations, casts and device moves.

Backward rules never write into the incoming gradient (it may be shared); they build a fresh
temporary first and then work on it in place, so each rule costs as few passes as it can.
"""

from __future__ import annotations

import math
from typing import Any

from narun.tensor import _backend
from narun.tensor._tensor import Tensor, as_tensor_like, check_same_device, make

_SCALAR = (int, float, bool)


def _operands(op: str, a: Any, b: Any) -> tuple[Any, Any]:
    """Tensors stay tensors, Python scalars stay scalars (NumPy keeps the tensor's dtype)."""
    if isinstance(a, Tensor):
        if isinstance(b, Tensor):
            check_same_device(op, a, b)
            return a, b
        return a, (b if isinstance(b, _SCALAR) else as_tensor_like(b, a))
    return (a if isinstance(a, _SCALAR) else as_tensor_like(a, b)), b


def _d(x: Any) -> Any:
    return x.data if isinstance(x, Tensor) else x


def _needs(x: Any) -> bool:
    return isinstance(x, Tensor) and x.requires_grad


def _parents(*xs: Any) -> tuple[Tensor, ...]:
    return tuple(x for x in xs if isinstance(x, Tensor))


def _grads(a: Any, b: Any, ga: Any, gb: Any) -> tuple[Any, ...]:
    """One gradient per tensor operand, in order (scalars have no slot)."""
    return tuple(g for x, g in ((a, ga), (b, gb)) if isinstance(x, Tensor))


# ---- binary arithmetic ---------------------------------------------------------------------
def add(a: Any, b: Any) -> Tensor:
    a, b = _operands("add", a, b)
    return make(_d(a) + _d(b), _parents(a, b), lambda g: _grads(a, b, g, g), "add")


def sub(a: Any, b: Any) -> Tensor:
    a, b = _operands("sub", a, b)
    return make(_d(a) - _d(b), _parents(a, b),
                lambda g: _grads(a, b, g, -g if _needs(b) else None), "sub")


def mul(a: Any, b: Any) -> Tensor:
    a, b = _operands("mul", a, b)
    ad, bd = _d(a), _d(b)

    def backward(g: Any) -> tuple[Any, ...]:
        return _grads(a, b, g * bd if _needs(a) else None, g * ad if _needs(b) else None)

    return make(ad * bd, _parents(a, b), backward, "mul")


def div(a: Any, b: Any) -> Tensor:
    a, b = _operands("div", a, b)
    ad, bd = _d(a), _d(b)
    out = ad / bd

    def backward(g: Any) -> tuple[Any, ...]:
        ga = g / bd if _needs(a) else None
        gb = None
        if _needs(b):
            gb = g * out
            gb /= bd
            gb *= -1
        return _grads(a, b, ga, gb)

    return make(out, _parents(a, b), backward, "div")


def _integer_zero_divisor(op: str, symbol: str, a: Any, b: Any) -> None:
    # NumPy quietly yields 0 for an integer division by zero; Python and torch raise.
    kinds = {x.dtype.kind if isinstance(x, Tensor) else type(x).__name__ for x in (a, b)}
    divisor = _d(b)
    if kinds <= {"i", "u", "b", "int", "bool"} and not _backend.get_array_module(divisor).all(
            divisor != 0):
        raise ZeroDivisionError(f"{op}: integer {symbol} by zero (the divisor holds a 0); "
                                f"mask the zeros first, or use float tensors for inf/nan")


def floor_divide(a: Any, b: Any) -> Tensor:
    """a // b, rounded toward negative infinity as Python and torch do.

    Piecewise constant, so it carries no gradient (as the comparisons): torch raises on its
    backward, and a silent zero would hide a loss that cannot train.
    """
    a, b = _operands("floor_divide", a, b)
    _integer_zero_divisor("floor_divide", "//", a, b)
    xp = _backend.get_array_module(_d(a), _d(b))
    return Tensor._wrap(xp.floor_divide(_d(a), _d(b)))


def remainder(a: Any, b: Any) -> Tensor:
    """a % b with the sign of the divisor (Python's and torch's %, not C's fmod)."""
    a, b = _operands("remainder", a, b)
    _integer_zero_divisor("remainder", "%", a, b)
    ad, bd = _d(a), _d(b)
    xp = _backend.get_array_module(ad, bd)

    def backward(g: Any) -> tuple[Any, ...]:
        # a % b = a - b * floor(a / b): d/da = 1, d/db = -floor(a / b), away from the jumps.
        return _grads(a, b, g, -g * xp.floor_divide(ad, bd) if _needs(b) else None)

    return make(xp.remainder(ad, bd), _parents(a, b), backward, "remainder")


def pow(a: Any, b: Any) -> Tensor:  # noqa: A001 - the op's PyTorch name
    a, b = _operands("pow", a, b)
    ad, bd = _d(a), _d(b)
    out = ad**bd

    def backward(g: Any) -> tuple[Any, ...]:
        ga = gb = None
        if _needs(a):
            if isinstance(bd, _SCALAR):
                ga = g * (bd * ad ** (bd - 1)) if bd != 2 else g * (2 * ad)
            else:
                ga = g * (bd * ad ** (bd - 1))
        if _needs(b):
            xp = _backend.get_array_module(ad, bd)
            gb = g * out * xp.log(ad)
        return _grads(a, b, ga, gb)

    return make(out, _parents(a, b), backward, "pow")


def maximum(a: Any, b: Any) -> Tensor:
    a, b = _operands("maximum", a, b)
    ad, bd = _d(a), _d(b)
    xp = _backend.get_array_module(ad, bd)
    out = xp.maximum(ad, bd)

    def backward(g: Any) -> tuple[Any, ...]:
        take_a = ad >= bd  # ties go to the first operand
        return _grads(a, b, xp.where(take_a, g, 0) if _needs(a) else None,
                      xp.where(take_a, 0, g) if _needs(b) else None)

    return make(out, _parents(a, b), backward, "maximum")


def minimum(a: Any, b: Any) -> Tensor:
    return neg(maximum(neg(a) if isinstance(a, Tensor) else -a,
                       neg(b) if isinstance(b, Tensor) else -b))


# ---- unary math ----------------------------------------------------------------------------
def neg(a: Tensor) -> Tensor:
    return make(-a.data, (a,), lambda g: (-g,), "neg")


def exp(a: Tensor) -> Tensor:
    out = a.xp.exp(a.data)
    return make(out, (a,), lambda g: (g * out,), "exp")


def log(a: Tensor) -> Tensor:
    x = a.data
    return make(a.xp.log(x), (a,), lambda g: (g / x,), "log")


def sqrt(a: Tensor) -> Tensor:
    out = a.xp.sqrt(a.data)

    def backward(g: Any) -> tuple[Any]:
        gx = g / out
        gx *= 0.5
        return (gx,)

    return make(out, (a,), backward, "sqrt")


def rsqrt(a: Tensor) -> Tensor:
    out = 1 / a.xp.sqrt(a.data)

    def backward(g: Any) -> tuple[Any]:
        gx = out**3
        gx *= g
        gx *= -0.5
        return (gx,)

    return make(out, (a,), backward, "rsqrt")


def abs(a: Tensor) -> Tensor:  # noqa: A001
    x = a.data
    return make(a.xp.abs(x), (a,), lambda g: (g * a.xp.sign(x),), "abs")


def tanh(a: Tensor) -> Tensor:
    out = a.xp.tanh(a.data)

    def backward(g: Any) -> tuple[Any]:
        gx = out * out
        gx -= 1
        gx *= g
        gx *= -1
        return (gx,)

    return make(out, (a,), backward, "tanh")


def _sigmoid(xp: Any, x: Any) -> Any:
    # Through tanh: never overflows, unlike 1 / (1 + exp(-x)) for very negative x.
    s = xp.tanh(x * 0.5)
    s *= 0.5
    s += 0.5
    return s


def sigmoid(a: Tensor) -> Tensor:
    out = _sigmoid(a.xp, a.data)

    def backward(g: Any) -> tuple[Any]:
        gx = 1 - out
        gx *= out
        gx *= g
        return (gx,)

    return make(out, (a,), backward, "sigmoid")


def relu(a: Tensor) -> Tensor:
    out = a.xp.maximum(a.data, 0)
    return make(out, (a,), lambda g: (g * (out > 0),), "relu")


def silu(a: Tensor) -> Tensor:
    x = a.data
    s = _sigmoid(a.xp, x)

    def backward(g: Any) -> tuple[Any]:
        # d/dx x*s(x) = s * (1 + x * (1 - s))
        gx = 1 - s
        gx *= x
        gx += 1
        gx *= s
        gx *= g
        return (gx,)

    return make(x * s, (a,), backward, "silu")


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_tanh_forward(xp: Any, x: Any) -> tuple[Any, Any]:
    """The tanh GELU of array x (a new array) and the tanh its backward reuses; inference
    calls it on raw arrays."""
    inner = x * x
    inner *= 0.044715
    inner += 1
    inner *= x
    inner *= _SQRT_2_OVER_PI
    t = xp.tanh(inner, out=inner)
    out = t + 1
    out *= x
    out *= 0.5
    return out, t


def gelu(a: Tensor, approximate: str = "none") -> Tensor:
    """GELU, exact (`approximate="none"`, via erf) or the tanh form GPT-2 uses ("tanh").

    Fused: one op, so backward reuses the forward's tanh (or Phi) instead of re-deriving it.
    """
    xp, x = a.xp, a.data
    if approximate == "tanh":
        out, t = gelu_tanh_forward(xp, x)

        def backward(g: Any) -> tuple[Any]:
            # 0.5(1+t) + 0.5 x (1-t^2) k (1 + 3*0.044715 x^2)
            d = x * x
            d *= 3 * 0.044715 * _SQRT_2_OVER_PI
            d += _SQRT_2_OVER_PI
            d *= x
            d *= 1 - t * t
            d += 1
            d += t
            d *= 0.5
            d *= g
            return (d,)

    elif approximate == "none":
        phi_cdf = erf(x * _INV_SQRT_2, xp)
        phi_cdf += 1
        phi_cdf *= 0.5
        out = x * phi_cdf

        def backward(g: Any) -> tuple[Any]:
            d = x * x
            d *= -0.5
            xp.exp(d, out=d)
            d *= x * _INV_SQRT_2PI
            d += phi_cdf
            d *= g
            return (d,)

    else:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return make(out, (a,), backward, "gelu")


def erf(x: Any, xp: Any = None) -> Any:
    """erf to float64 precision (NumPy has none; SciPy is not a dependency).

    |x| < 2.5: the all-positive series erf(x) = 2/sqrt(pi) e^{-x^2} sum 2^n x^{2n+1}/(2n+1)!!,
    which has no cancellation; beyond, the Laplace continued fraction for erfc.
    """
    xp = xp or _backend.get_array_module(x)
    ax = xp.abs(x)
    xs = xp.minimum(ax, 2.5)
    x2 = xs * xs
    term = xs.copy()
    total = xs.copy()
    for n in range(1, 60):
        term *= x2
        term *= 2.0 / (2 * n + 1)
        total += term
    small = total * xp.exp(-x2) * (2 / math.sqrt(math.pi))
    xl = xp.maximum(ax, 2.5)
    frac = xp.zeros_like(xl)
    for k in range(60, 0, -1):  # erfc(x) = e^{-x^2}/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/...)))
        frac = (k / 2) / (xl + frac)
    large = 1 - xp.exp(-xl * xl) / (math.sqrt(math.pi) * (xl + frac))
    return xp.sign(x) * xp.where(ax < 2.5, small, large)


# ---- comparisons (no gradient) -------------------------------------------------------------
def _compare(name: str, a: Any, b: Any) -> Tensor:
    a, b = _operands(name, a, b)
    fn = getattr(_backend.get_array_module(_d(a), _d(b)), name)
    return Tensor._wrap(fn(_d(a), _d(b)))


def eq(a: Any, b: Any) -> Tensor:
    return _compare("equal", a, b)


def ne(a: Any, b: Any) -> Tensor:
    return _compare("not_equal", a, b)


def lt(a: Any, b: Any) -> Tensor:
    return _compare("less", a, b)


def le(a: Any, b: Any) -> Tensor:
    return _compare("less_equal", a, b)


def gt(a: Any, b: Any) -> Tensor:
    return _compare("greater", a, b)


def ge(a: Any, b: Any) -> Tensor:
    return _compare("greater_equal", a, b)


# ---- bitwise (bool and integer tensors, no gradient): masks as `(a > 0) & (b < 1)` --------
def _bitwise(name: str, symbol: str, *xs: Any) -> Tensor:
    if len(xs) == 2:
        xs = _operands(name, *xs)
    for x in xs:
        kind = x.dtype.kind if isinstance(x, Tensor) else ("b" if isinstance(x, bool) else
                                                          "i" if isinstance(x, int) else "f")
        if kind not in "biu":
            what = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{symbol}: needs bool or integer tensors, got {what}; compare "
                            f"first (t > 0) or cast with .to(dtype=narun.bool_)")
    xp = _backend.get_array_module(*(_d(x) for x in xs))
    return Tensor._wrap(getattr(xp, name)(*(_d(x) for x in xs)))


def bitwise_and(a: Any, b: Any) -> Tensor:
    return _bitwise("bitwise_and", "&", a, b)


def bitwise_or(a: Any, b: Any) -> Tensor:
    return _bitwise("bitwise_or", "|", a, b)


def bitwise_xor(a: Any, b: Any) -> Tensor:
    return _bitwise("bitwise_xor", "^", a, b)


def bitwise_not(a: Tensor) -> Tensor:
    return _bitwise("invert", "~", a)


# ---- dtype and device ----------------------------------------------------------------------
def cast(a: Tensor, dtype: Any) -> Tensor:
    src = a.dtype
    out = a.data.astype(dtype)
    if not _backend.is_inexact(out.dtype):
        return Tensor._wrap(out)  # integer/bool results carry no gradient
    return make(out, (a,), lambda g: (g.astype(src),), "cast")


def move(a: Tensor, device: str) -> Tensor:
    src = a.device
    return make(_backend.to_device(a.data, device), (a,),
                lambda g: (_backend.to_device(g, src),), "to")


def clamp(a: Tensor, min: float | None = None, max: float | None = None) -> Tensor:  # noqa: A002
    x = a.data
    out = a.xp.clip(x, min, max)

    def backward(g: Any) -> tuple[Any]:
        inside = a.xp.ones(x.shape, dtype=bool)
        if min is not None:
            inside &= x >= min
        if max is not None:
            inside &= x <= max
        return (g * inside,)

    return make(out, (a,), backward, "clamp")
