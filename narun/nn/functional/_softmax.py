"""softmax and log_softmax: max-subtracted forward, closed-form fused backward."""

from __future__ import annotations

from typing import Any

from narun.nn.functional._common import require_float, sum_last
from narun.tensor._ops_reduce import normalize_dims
from narun.tensor._tensor import Tensor, make


def _axis(op: str, x: Tensor, dim: int) -> int:
    return normalize_dims(op, dim, x.ndim)[0]


def _shifted(xp: Any, x: Any, axis: int) -> Any:
    """x - max(x, axis) in a fresh C-contiguous buffer (whatever x's layout), for in-place work."""
    out = xp.empty(x.shape, dtype=x.dtype)
    xp.subtract(x, x.max(axis=axis, keepdims=True), out=out)
    return out


def _sum(xp: Any, a: Any, axis: int) -> Any:
    """a.sum(axis, keepdims=True), through BLAS for the usual last axis."""
    if axis == a.ndim - 1:
        return sum_last(xp, a)[..., None]
    return a.sum(axis=axis, keepdims=True)


def softmax_array(xp: Any, x: Any, axis: int) -> Any:
    """softmax of a raw array along `axis`, in one fresh buffer (no autograd)."""
    y = _shifted(xp, x, axis)
    xp.exp(y, out=y)
    s = _sum(xp, y, axis)
    # Multiplying by the reciprocal is cheaper than dividing every element.
    y *= xp.reciprocal(s, out=s)
    return y


def softmax(x: Tensor, dim: int) -> Tensor:
    """exp(x) / sum(exp(x)) along `dim`, computed as in torch.softmax.

    Backward is the closed form y * (g - sum(g * y)) from the saved output.
    """
    require_float("softmax", "input", x)
    xp = x.xp
    if x.ndim == 0:
        return make(xp.ones_like(x.data), (x,), lambda g: (xp.zeros_like(g),), "softmax")
    axis = _axis("softmax", x, dim)
    y = softmax_array(xp, x.data, axis)

    def backward(g: Any) -> tuple[Any]:
        gx = g * y
        s = _sum(xp, gx, axis)
        xp.subtract(g, s, out=gx)
        gx *= y
        return (gx,)

    return make(y, (x,), backward, "softmax")


def log_softmax(x: Tensor, dim: int) -> Tensor:
    """x - logsumexp(x) along `dim`, as torch.log_softmax.

    Backward is g - exp(y) * sum(g), recomputing exp(y) rather than keeping softmax alive.
    """
    require_float("log_softmax", "input", x)
    xp = x.xp
    if x.ndim == 0:
        return make(xp.zeros_like(x.data), (x,), lambda g: (xp.zeros_like(g),), "log_softmax")
    axis = _axis("log_softmax", x, dim)
    y = _shifted(xp, x.data, axis)
    e = xp.exp(y)
    s = _sum(xp, e, axis)
    del e
    y -= xp.log(s, out=s)

    def backward(g: Any) -> tuple[Any]:
        gx = xp.exp(y)
        gx *= -_sum(xp, g, axis)
        gx += g
        return (gx,)

    return make(y, (x,), backward, "log_softmax")
