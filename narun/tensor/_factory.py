"""Making tensors: narun.tensor and the zeros/ones/randn family."""

from __future__ import annotations

from typing import Any

import numpy as np

from narun.tensor import _backend, _random
from narun.tensor._tensor import Tensor


def tensor(data: Any, dtype: Any = None, requires_grad: bool = False,
           device: str = "cpu") -> Tensor:
    """A new leaf tensor from array-like `data` (copied, as torch.tensor does).

    Python floats become the default dtype (float32 unless narun.set_default_dtype changed
    it), ints int64, bools bool; a NumPy array keeps its dtype unless `dtype` is given.
    """
    if isinstance(data, Tensor):
        data = data.data
    device = _backend.normalize_device(device)
    if dtype is not None:
        dtype = _backend.as_dtype(dtype)
    elif not hasattr(data, "dtype"):
        probe = np.asarray(data)
        dtype = _backend.DEFAULT_DTYPE if _backend.is_floating(probe.dtype) else probe.dtype
    if _backend.is_cupy_array(data):
        data = data.get()
    arr = np.array(data, dtype=dtype, copy=True)
    return Tensor(_backend.to_device(arr, device), requires_grad=requires_grad)


def from_numpy(array: np.ndarray) -> Tensor:
    """A tensor that shares `array`'s memory (no copy)."""
    return Tensor._wrap(array)


def _new(fn_name: str, shape: tuple[Any, ...], dtype: Any, device: str,
         requires_grad: bool, **kw: Any) -> Tensor:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    xp = _backend.module_for_device(device)
    dtype = _backend.as_dtype(dtype or _backend.DEFAULT_DTYPE)
    data = getattr(xp, fn_name)(shape, dtype=dtype, **kw)
    return Tensor(data, requires_grad=requires_grad)


def zeros(*shape: Any, dtype: Any = None, device: str = "cpu",
          requires_grad: bool = False) -> Tensor:
    return _new("zeros", shape, dtype, device, requires_grad)


def ones(*shape: Any, dtype: Any = None, device: str = "cpu",
         requires_grad: bool = False) -> Tensor:
    return _new("ones", shape, dtype, device, requires_grad)


def empty(*shape: Any, dtype: Any = None, device: str = "cpu",
          requires_grad: bool = False) -> Tensor:
    return _new("empty", shape, dtype, device, requires_grad)


def full(shape: Any, fill_value: float, dtype: Any = None, device: str = "cpu",
         requires_grad: bool = False) -> Tensor:
    return _new("full", (shape,), dtype, device, requires_grad, fill_value=fill_value)


def zeros_like(t: Tensor, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    return zeros(t.shape, dtype=dtype or t.dtype, device=t.device, requires_grad=requires_grad)


def ones_like(t: Tensor, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    return ones(t.shape, dtype=dtype or t.dtype, device=t.device, requires_grad=requires_grad)


def arange(start: float, end: float | None = None, step: float = 1, dtype: Any = None,
           device: str = "cpu") -> Tensor:
    if end is None:
        start, end = 0, start
    xp = _backend.module_for_device(device)
    probe = np.arange(start, end, step)
    dtype = dtype or (_backend.DEFAULT_DTYPE if _backend.is_floating(probe.dtype) else np.int64)
    return Tensor._wrap(xp.arange(start, end, step, dtype=_backend.as_dtype(dtype)))


def _random_tensor(sample: Any, shape: tuple[Any, ...], dtype: Any, device: str,
                   requires_grad: bool) -> Tensor:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    # Drawn on the host from narun's one generator, so a seed gives the same values on
    # every device.
    arr = sample(_random.generator(), shape).astype(
        _backend.as_dtype(dtype or _backend.DEFAULT_DTYPE), copy=False)
    return Tensor(_backend.to_device(arr, _backend.normalize_device(device)),
                  requires_grad=requires_grad)


def randn(*shape: Any, dtype: Any = None, device: str = "cpu",
          requires_grad: bool = False) -> Tensor:
    return _random_tensor(lambda g, s: g.standard_normal(s), shape, dtype, device,
                          requires_grad)


def rand(*shape: Any, dtype: Any = None, device: str = "cpu",
         requires_grad: bool = False) -> Tensor:
    return _random_tensor(lambda g, s: g.random(s), shape, dtype, device, requires_grad)


def randint(low: int, high: int, size: tuple[int, ...], device: str = "cpu") -> Tensor:
    arr = _random.generator().integers(low, high, size=size, dtype=np.int64)
    return Tensor._wrap(_backend.to_device(arr, _backend.normalize_device(device)))
