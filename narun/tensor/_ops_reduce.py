"""Reductions: sum, mean, max, min, var, with PyTorch's dim/keepdim semantics."""

from __future__ import annotations

import builtins
from collections import namedtuple
from typing import Any

from narun.errors import ShapeError
from narun.tensor._tensor import Tensor, make

MaxMin = namedtuple("MaxMin", ["values", "indices"])

Dims = int | tuple[int, ...] | list[int] | None


def normalize_dims(op: str, dim: Dims, ndim: int) -> tuple[int, ...]:
    """Dims as a sorted tuple of non-negative axes; all axes for None."""
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = []
    n = builtins.max(ndim, 1)
    for d in dims:
        if not -n <= d < n:
            raise ShapeError(f"{op}: dim {d} is out of range for a tensor of {ndim} dims")
        out.append(d % n)
    if len(set(out)) != len(out):
        raise ShapeError(f"{op}: dim {dim} names an axis twice")
    return tuple(sorted(out))


def _expand_back(g: Any, shape: tuple[int, ...], axes: tuple[int, ...], keepdim: bool) -> Any:
    """Reshape a reduced gradient so it broadcasts against the input `shape`."""
    if not keepdim and shape:
        kept = tuple(1 if i in axes else n for i, n in enumerate(shape))
        g = g.reshape(kept)
    return g


def sum(a: Tensor, dim: Dims = None, keepdim: bool = False) -> Tensor:  # noqa: A001
    axes = normalize_dims("sum", dim, a.ndim)
    shape, xp = a.shape, a.xp
    out = xp.asarray(a.data.sum(axis=axes, keepdims=keepdim))

    def backward(g: Any) -> tuple[Any]:
        return (xp.broadcast_to(_expand_back(g, shape, axes, keepdim), shape),)

    return make(out, (a,), backward, "sum")


def mean(a: Tensor, dim: Dims = None, keepdim: bool = False) -> Tensor:
    axes = normalize_dims("mean", dim, a.ndim)
    shape, xp = a.shape, a.xp
    count = 1
    for ax in axes:
        count *= shape[ax]
    out = xp.asarray(a.data.mean(axis=axes, keepdims=keepdim))

    def backward(g: Any) -> tuple[Any]:
        return (xp.broadcast_to(_expand_back(g / count, shape, axes, keepdim), shape),)

    return make(out, (a,), backward, "mean")


def var(a: Tensor, dim: Dims = None, keepdim: bool = False, correction: int = 1,
        unbiased: bool | None = None) -> Tensor:
    """Variance with Bessel's `correction` (1 = unbiased, PyTorch's default)."""
    if unbiased is not None:
        correction = 1 if unbiased else 0
    axes = normalize_dims("var", dim, a.ndim)
    x = a.data
    count = 1
    for ax in axes:
        count *= a.shape[ax]
    if count - correction <= 0:
        raise ShapeError(f"var: {count} element(s) over dims {dim} with correction "
                         f"{correction} leaves no degrees of freedom")
    centered = x - x.mean(axis=axes, keepdims=True)
    dof = count - correction
    out = a.xp.asarray((centered * centered).sum(axis=axes, keepdims=keepdim) / dof)

    def backward(g: Any) -> tuple[Any]:
        gx = _expand_back(g, x.shape, axes, keepdim) * centered
        gx *= 2.0 / (count - correction)
        return (gx,)

    return make(out, (a,), backward, "var")


def _extreme(op: str, a: Tensor, dim: int | None, keepdim: bool) -> Any:
    xp, x = a.xp, a.data
    if x.size == 0:
        raise ShapeError(f"{op}: reduction over an empty tensor of shape {a.shape}")
    reduce = xp.max if op == "max" else xp.min
    if dim is None:
        out = xp.asarray(reduce(x))

        def backward_all(g: Any) -> tuple[Any]:
            # Like torch's full reduction: ties share the gradient evenly.
            mask = x == out
            return (mask * (g / mask.sum()),)

        return make(out, (a,), backward_all, op)
    (axis,) = normalize_dims(op, dim, a.ndim)
    arg = (xp.argmax if op == "max" else xp.argmin)(x, axis=axis)
    idx = xp.expand_dims(arg, axis)
    values = xp.take_along_axis(x, idx, axis=axis)
    if not keepdim:
        values = values.squeeze(axis)

    def backward(g: Any) -> tuple[Any]:
        gx = xp.zeros_like(x)
        gk = g if keepdim else xp.expand_dims(g, axis)
        xp.put_along_axis(gx, idx, gk, axis=axis)
        return (gx,)

    indices = Tensor._wrap(idx if keepdim else arg)
    return MaxMin(make(values, (a,), backward, op), indices)


def max(a: Tensor, dim: int | None = None, keepdim: bool = False) -> Any:  # noqa: A001
    """Full reduction -> tensor; with `dim` -> (values, indices), as in PyTorch."""
    return _extreme("max", a, dim, keepdim)


def min(a: Tensor, dim: int | None = None, keepdim: bool = False) -> Any:  # noqa: A001
    return _extreme("min", a, dim, keepdim)


def argmax(a: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    if dim is None:
        return Tensor._wrap(a.xp.asarray(a.data.argmax()))
    out = a.data.argmax(axis=dim)
    return Tensor._wrap(a.xp.expand_dims(out, dim) if keepdim else out)


def argmin(a: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    if dim is None:
        return Tensor._wrap(a.xp.asarray(a.data.argmin()))
    out = a.data.argmin(axis=dim)
    return Tensor._wrap(a.xp.expand_dims(out, dim) if keepdim else out)
