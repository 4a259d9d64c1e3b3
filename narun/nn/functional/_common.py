"""Argument checks and array plumbing shared by the functional ops."""

from __future__ import annotations

from typing import Any

import numpy as np

from narun.errors import ConfigError, DeviceMismatchError, DTypeError, ShapeError
from narun.tensor import _backend
from narun.tensor._tensor import Tensor

REDUCTIONS = ("mean", "sum", "none")


def require_float(op: str, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a narun Tensor, got {type(t).__name__}")
    if not _backend.is_floating(t.dtype):
        raise DTypeError(f"{op}: {name} must be floating point, got {t.dtype}")


def check_reduction(op: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def raw(op: str, name: str, x: Any, like: Tensor) -> Any:
    """The array behind `x` (a Tensor or array-like) on `like`'s device, never differentiated."""
    if isinstance(x, Tensor):
        if x.device != like.device:
            raise DeviceMismatchError(f"{op}: {name} is on {x.device} but the input is on "
                                      f"{like.device}; move it with .to(device)")
        return x.data
    is_array = hasattr(x, "__array_interface__") or _backend.is_cupy_array(x)
    if is_array and _backend.device_of(x) != like.device:
        raise DeviceMismatchError(f"{op}: {name} is an array on {_backend.device_of(x)} "
                                  f"but the input is on {like.device}; move it first")
    return like.xp.asarray(x)


def require_int(op: str, name: str, a: Any) -> None:
    if a.dtype.kind not in "iu":
        raise DTypeError(f"{op}: {name} must hold integer indices, got dtype {a.dtype}")


def pair(op: str, name: str, v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    """An int or a 2-sequence of ints as a pair, as torch's `_pair`."""
    out = (v, v) if isinstance(v, int) else tuple(v)
    if len(out) != 2 or not all(isinstance(n, int) for n in out):
        raise ConfigError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
    return out  # type: ignore[return-value]


def unbatched(op: str, x: Tensor, ndim: int, what: str) -> bool:
    """True when `x` lacks the batch dim of an op whose batched input has `ndim` dims."""
    if x.ndim == ndim:
        return False
    if x.ndim == ndim - 1:
        return True
    raise ShapeError(f"{op}: expected a {ndim}-d {what} (or {ndim - 1}-d unbatched), "
                     f"got shape {x.shape}")


def sum_last(xp: Any, a: Any) -> Any:
    """a.sum(-1), as one matrix-vector product when `a` is C-contiguous.

    BLAS gemv against a ones vector is ~4x faster than ndarray.sum over rows of a few
    hundred float32 (0.04 vs 0.17 ms for 2048 x 256 here); strided input takes the plain sum.
    """
    if not a.flags.c_contiguous or a.size == 0:
        return a.sum(axis=-1)
    n = a.shape[-1]
    with _blas_flags():
        return (a.reshape(-1, n) @ xp.ones(n, dtype=a.dtype)).reshape(a.shape[:-1])


def sum_rows(xp: Any, a: Any) -> Any:
    """a.sum(0) of a 2-d array, as a vector-matrix product (see sum_last)."""
    if not a.flags.c_contiguous or a.size == 0:
        return a.sum(axis=0)
    with _blas_flags():
        return xp.ones(a.shape[0], dtype=a.dtype) @ a


# OpenBLAS's gemv can raise the FPU's "invalid" flag on finite input, which NumPy reports
# as "invalid value encountered in matmul": seen on this Intel (AVX-512) machine for 6 x 5
# float32 rows, now and then, depending on what ran before (numpy/numpy#24067 is the same
# class of OpenBLAS bug). A sum against ones yields NaN only from NaN or inf + -inf in `a`,
# which the result shows anyway, so the flag says nothing here.
def _blas_flags() -> np.errstate:
    return np.errstate(invalid="ignore")  # one per call: an errstate is not thread-safe
