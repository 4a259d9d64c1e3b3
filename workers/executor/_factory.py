"""Device names and the executor for one: `parse_device`, `resolve_device`, `make_executor`."""

from __future__ import annotations

import re
import sys

from narun.config import check_trainable_device
from narun.errors import ConfigError, DeviceError
from narun.tensor._backend import MLX_DEVICES
from workers.executor._base import Executor
from workers.executor._cpu import CpuExecutor
from workers.executor._cuda import CudaExecutor, cuda_device, cuda_device_count, import_cupy
from workers.executor._mps import MpsExecutor, import_mlx, metal_available

__all__ = [
    "check_device_here", "make_executor", "parse_device", "resolve_device", "training_device",
]

_FORMS = "cpu, cuda, cuda:N, mps, mlx:cpu or auto"
_CUDA = re.compile(r"cuda:(\d+)")


def parse_device(device: str) -> tuple[str, int | None]:
    """Split a `runtime.device` value into (kind, index); index is None except for cuda.

        >>> parse_device("cuda:1"), parse_device("cuda"), parse_device("cpu")
        (('cuda', 1), ('cuda', 0), ('cpu', None))
    """
    if not isinstance(device, str):
        raise ConfigError(f"runtime.device: expected a string ({_FORMS}), "
                          f"got {type(device).__name__} {device!r}")
    if device in ("cpu", "mps", "mlx:cpu", "auto"):
        return device, None
    if device == "cuda":
        return "cuda", 0
    match = _CUDA.fullmatch(device)
    if match is None:
        raise ConfigError(f"runtime.device: expected {_FORMS}, got {device!r}")
    return "cuda", int(match.group(1))


def resolve_device(device: str) -> str:
    """The concrete device for a `runtime.device` value: 'auto' becomes cuda:0 where CuPy
    imports and sees a GPU, else mps where MLX imports on macOS with Metal, else cpu;
    'cuda' becomes 'cuda:0'. Other names are returned as given (checked, not probed)."""
    kind, index = parse_device(device)
    if kind == "cuda":
        return f"cuda:{index}"
    if kind != "auto":
        return kind
    if _probe_cuda():
        return "cuda:0"
    if _probe_metal():
        return "mps"
    return "cpu"


def training_device(device: str, mode: str = "local") -> str:
    """Where narun's engine trains for a `runtime.device` value in `mode`: 'cpu', 'cuda:N',
    'mps' or 'mlx:cpu' (MLX, refused in mode pipeline). 'auto' is cuda:0 where CuPy sees a
    GPU, else mps in mode local where MLX sees Metal, else cpu."""
    kind, index = parse_device(device)
    check_trainable_device(kind, mode)
    if kind == "auto":
        if _probe_cuda():
            return "cuda:0"
        return "mps" if mode == "local" and _probe_metal() else "cpu"
    return f"cuda:{index}" if kind == "cuda" else kind


def check_device_here(device: str) -> None:
    """Raise the DeviceError an executor for `device` would raise on this machine (no CuPy,
    no such GPU), without building one: a job's trainers learn it before they start."""
    kind, index = parse_device(resolve_device(device))
    if kind == "cuda":
        cuda_device(index or 0)
    elif kind in MLX_DEVICES:
        mx = import_mlx()
        if kind == "mps" and not metal_available(mx):
            raise DeviceError(f"device 'mps' needs a Metal GPU, which MLX does not see here "
                              f"(platform {sys.platform}); use 'mlx:cpu' for MLX's CPU device")


def make_executor(device: str = "cpu", *, blas_threads: int | None = None) -> Executor:
    """The executor for `device` (a `runtime.device` value), its thread started.

    `blas_threads` caps the CPU executor's BLAS threads for this process (see
    CpuExecutor); GPU executors do their math on the device and ignore it. Raises
    ConfigError for a malformed name and DeviceError for a device this machine lacks.
    """
    kind, index = parse_device(resolve_device(device))
    if kind == "cpu":
        return CpuExecutor(blas_threads=blas_threads)
    if kind == "cuda":
        return CudaExecutor(index or 0)
    return MpsExecutor(mlx_device="cpu" if kind == "mlx:cpu" else "gpu")


def _probe_cuda() -> bool:
    try:
        return cuda_device_count(import_cupy()) > 0
    except DeviceError:
        return False


def _probe_metal() -> bool:
    try:
        return metal_available(import_mlx())
    except DeviceError:
        return False
