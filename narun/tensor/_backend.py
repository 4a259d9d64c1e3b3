"""Array-module choice and devices.

An op picks its array module once, from its inputs (`get_array_module`), and then runs the
same code for NumPy, CuPy and MLX: CuPy mirrors NumPy's API and narun.tensor._mlx presents
MLX through the same API, so there is one implementation per op and the NumPy path is the
reference. CuPy and MLX are imported lazily, only when their device is asked for or one of
their arrays shows up.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np

from narun.errors import DeviceError

DEFAULT_DTYPE = np.dtype(np.float32)  # read at each call; set_default_dtype changes it

_FLOATING = ("float16", "float32", "float64")


def is_floating(dtype: Any) -> bool:
    """Whether `dtype` (an np.dtype) holds real floating-point values: kind 'f', or
    bfloat16, whose NumPy dtype (ml_dtypes', what MLX's bfloat16 arrays report) has kind
    'V'. One string test on NumPy's dtypes; the name is read only for a 'V' dtype."""
    kind = dtype.kind
    return kind == "f" or (kind == "V" and dtype.name == "bfloat16")


def is_inexact(dtype: Any) -> bool:
    """Whether `dtype` is floating point or complex (what can carry a gradient)."""
    kind = dtype.kind
    return kind in "fc" or (kind == "V" and dtype.name == "bfloat16")


def set_default_dtype(dtype: Any) -> None:
    """The dtype Python floats and the factories (zeros, randn, ...) use when no dtype is
    given, as torch.set_default_dtype: a floating dtype only (float16, float32, float64).

        >>> narun.set_default_dtype(narun.float64)
        >>> narun.tensor([1.5]).dtype
        dtype('float64')
    """
    global DEFAULT_DTYPE
    try:
        d = None if dtype is None else np.dtype(dtype)  # np.dtype(None) would be float64
    except TypeError:
        d = None
    if d is None or d.name not in _FLOATING:
        raise TypeError(f"set_default_dtype: only floating dtypes can be the default "
                        f"({', '.join(_FLOATING)}), got {dtype!r}")
    DEFAULT_DTYPE = d


def get_default_dtype() -> np.dtype:
    """The dtype Python floats and the factories use (float32 unless set_default_dtype)."""
    return DEFAULT_DTYPE


@functools.cache
def _cupy() -> ModuleType | None:
    try:
        import cupy
    except ImportError:
        return None
    return cupy


@functools.cache
def _mlx_module() -> ModuleType | None:
    try:
        from narun.tensor import _mlx
    except ImportError:
        return None
    return _mlx


MLX_DEVICES = ("mlx:cpu", "mps")


def is_cupy_array(x: Any) -> bool:
    return type(x).__module__.startswith("cupy")


_MLX_ARRAY_MODULE = "narun.tensor._mlx"


def is_mlx_array(x: Any) -> bool:
    return type(x).__module__ == _MLX_ARRAY_MODULE


def get_array_module(*arrays: Any) -> ModuleType:
    """The array module (numpy, cupy or narun's MLX adapter) that owns `arrays`; numpy for
    plain Python values."""
    for a in arrays:
        owner = type(a).__module__  # read once: this runs for every op
        if owner.startswith("cupy"):
            return _cupy()  # type: ignore[return-value]
        if owner == _MLX_ARRAY_MODULE:
            return _mlx_module()  # type: ignore[return-value]
    return np


def device_of(array: Any) -> str:
    """"cpu" for a NumPy array, "cuda:N" for a CuPy array on device N, "mlx:cpu" or "mps"
    for an MLX array (MLX's default device, which runs every MLX op in the process)."""
    owner = type(array).__module__
    if owner.startswith("cupy"):
        return f"cuda:{array.device.id}"
    if owner == _MLX_ARRAY_MODULE:
        return _mlx_module().device_name()  # type: ignore[union-attr]
    return "cpu"


def normalize_device(device: str | None) -> str:
    """Canonical device name: "cpu", "cuda:N", "mlx:cpu" or "mps". Raises DeviceError for
    anything else."""
    if device is None or device == "cpu":
        return "cpu"
    if not isinstance(device, str):
        raise DeviceError(f"device must be a string like 'cpu' or 'cuda:0', got {device!r}")
    if device == "cuda":
        return "cuda:0"
    if device.startswith("cuda:") and device[5:].isdigit():
        return device
    if device in MLX_DEVICES:
        return device
    raise DeviceError(f"unknown device {device!r}; expected 'cpu', 'cuda', 'cuda:N', "
                      "'mlx:cpu' or 'mps'")


def settle(arrays: Any) -> None:
    """Compute MLX's pending work for `arrays` now (MLX is lazy: without this, each
    optimizer step would extend a graph through every earlier step). NumPy and CuPy
    compute eagerly: nothing to do, and nothing is even looked at unless MLX was used."""
    if _mlx_module.cache_info().currsize:
        m = _mlx_module()
        if m is not None:
            m.evaluate(arrays)


def _require_mlx(device: str) -> ModuleType:
    m = _mlx_module()
    if m is None:
        raise DeviceError(f"device {device!r} needs MLX, which is not installed; "
                          "install mlx (pip install mlx)")
    m.use(device)
    return m


def _require_cupy(device: str) -> ModuleType:
    cp = _cupy()
    if cp is None:
        raise DeviceError(
            f"device {device!r} needs CuPy, which is not installed; "
            "install narun[cuda] (cupy-cuda12x) on a machine with an NVIDIA GPU"
        )
    return cp


def to_device(array: Any, device: str) -> Any:
    """Copy `array` to `device`; returns it unchanged if already there."""
    device = normalize_device(device)
    if device_of(array) == device:
        return array
    if device == "cpu":
        return array.get()
    if device in MLX_DEVICES:
        m = _require_mlx(device)
        return m.asarray(array.get() if is_cupy_array(array) else array)
    if is_mlx_array(array):
        array = array.get()
    cp = _require_cupy(device)
    with cp.cuda.Device(int(device.split(":")[1])):
        return cp.asarray(array)


def use_device(device: str) -> None:
    """Make `device` where new arrays go and kernels run: the calling thread's current GPU
    for cuda:N (CuPy's current device is per thread), MLX's default device (for the
    process) for mlx:cpu and mps; nothing to do for the cpu. A process that trains on a
    device calls it once, so the ops' results land beside their inputs."""
    device = normalize_device(device)
    if device in MLX_DEVICES:
        _require_mlx(device)
    elif device != "cpu":
        _require_cupy(device).cuda.Device(int(device.split(":")[1])).use()


def module_for_device(device: str) -> ModuleType:
    device = normalize_device(device)
    if device in MLX_DEVICES:
        return _require_mlx(device)
    return np if device == "cpu" else _require_cupy(device)


def as_dtype(dtype: Any) -> np.dtype:
    """np.dtype from a dtype, a type or a name ("float32"); DeviceError-free, TypeError on junk."""
    try:
        return np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"not a dtype: {dtype!r}") from e
