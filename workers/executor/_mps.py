"""The mps executor: Apple-silicon GPUs through MLX.

MLX's default device and stream are set on the executor thread, so the work submitted
there runs on its own stream. MLX is lazy: arrays are computed when evaluated, at the
latest when `to_host` converts them. MLX's CPU build (`pip install "mlx[cpu]"`) imports on
Linux too; `MpsExecutor(mlx_device="cpu")` runs this same code path on MLX's CPU device,
which is how it is tested away from a Mac.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

import numpy as np

from narun.errors import DeviceError, DTypeError
from workers.executor._base import Executor

__all__ = ["MpsExecutor"]

_INSTALL_HINT = ("on a Mac with Apple silicon install narun[mps] (mlx); on Linux "
                 "pip install 'mlx[cpu]' gives MLX's CPU device (MpsExecutor(mlx_device='cpu'))")


def import_mlx() -> ModuleType:
    """mlx.core, or a DeviceError that says how to install it."""
    try:
        return importlib.import_module("mlx.core")
    except ImportError as e:
        raise DeviceError(f"device 'mps' needs MLX, which does not import here ({e}); "
                          f"{_INSTALL_HINT}") from e


def metal_available(mx: ModuleType) -> bool:
    return sys.platform == "darwin" and bool(mx.metal.is_available())


class MpsExecutor(Executor):
    """Runs MLX compute on the Metal GPU (`mlx_device="gpu"`) or on MLX's CPU device."""


    def __init__(self, *, mlx_device: str = "gpu") -> None:
        if mlx_device not in ("gpu", "cpu"):
            raise ValueError(f"mlx_device must be 'gpu' or 'cpu', got {mlx_device!r}")
        mx = import_mlx()
        if mlx_device == "gpu" and not metal_available(mx):
            raise DeviceError(
                f"device 'mps' needs a Metal GPU, which MLX does not see here "
                f"(platform {sys.platform}); run on a Mac with Apple silicon, or use "
                "MpsExecutor(mlx_device='cpu') for MLX's CPU device")
        self._mx = mx
        self.mlx_device = mx.gpu if mlx_device == "gpu" else mx.cpu
        super().__init__("mps")

    @property
    def xp(self) -> ModuleType:
        return self._mx

    def _enter(self) -> None:
        mx = self._mx
        mx.set_default_device(self.mlx_device)
        self._stream = mx.new_stream(self.mlx_device)
        mx.set_default_stream(self._stream)

    def _exit(self) -> None:
        self._mx.synchronize(self._stream)

    def _synchronize(self) -> None:
        self._mx.synchronize(self._stream)

    def _to_device(self, array: Any) -> Any:
        host = np.asarray(array)
        # Without an explicit dtype MLX turns float64 into float32; keep what was given.
        name = "bool_" if host.dtype == np.bool_ else host.dtype.name
        dtype = getattr(self._mx, name, None)
        if not isinstance(dtype, self._mx.Dtype):
            raise DTypeError(f"mps to_device: MLX has no {host.dtype} dtype")
        return self._mx.array(host, dtype=dtype)

    def _to_host(self, array: Any) -> np.ndarray:
        mx = self._mx
        if isinstance(array, mx.array) and array.dtype == mx.bfloat16:
            raise DTypeError("mps to_host: bfloat16 has no NumPy dtype; "
                             "cast with .astype(mlx.core.float32) first")
        return np.array(array)  # evaluates a lazy MLX array, copies into NumPy memory
