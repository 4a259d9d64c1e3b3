"""The CUDA executor: CuPy on one device, one stream, pinned host buffers for transfers.

The device and a non-blocking stream are made current on the executor thread (both are
per-thread state in CUDA and CuPy), so every kernel the submitted work launches is queued on
that stream, in order, and transfers need no extra synchronization against it.

Transfers go through page-locked (pinned) host memory, which the GPU copies by DMA and
asynchronously; a copy from ordinary (pageable) memory is staged by the driver and blocks:
- host -> device: the array is copied into two reused pinned staging buffers in turn, each
  chunk's DMA overlapping the next chunk's host copy; the call returns once the last chunk
  is queued (the caller may reuse its array at once; work on the stream sees the data).
- device -> host: the result lives in pinned memory from CuPy's pinned pool, filled by one
  DMA; once the caller drops it, the pool gives the block to the next transfer of that size.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import numpy as np

from narun.errors import DeviceError
from workers.executor._base import Executor

__all__ = ["CudaExecutor"]

STAGING_BYTES = 8 << 20  # per staging buffer; a multiple of every dtype's itemsize


def import_cupy() -> ModuleType:
    """CuPy, or a DeviceError that says how to get it."""
    try:
        return importlib.import_module("cupy")
    except ImportError as e:
        raise DeviceError(
            f"device 'cuda' needs CuPy, which does not import here ({e}); install narun[cuda] "
            "(cupy-cuda12x) on a machine with an NVIDIA GPU and driver") from e


def cuda_device_count(cp: ModuleType) -> int:
    """Number of CUDA devices visible to this process, or a DeviceError saying why none is."""
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except cp.cuda.runtime.CUDARuntimeError as e:
        raise DeviceError(f"device 'cuda': CuPy imports but CUDA is not usable here ({e}); "
                          "check the NVIDIA driver (nvidia-smi)") from e


def cuda_device(index: int) -> ModuleType:
    """CuPy, once it is known that GPU `index` is there; else a DeviceError saying why not."""
    cp = import_cupy()
    count = cuda_device_count(cp)
    if not 0 <= index < count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceError(
            f"device 'cuda:{index}' is out of range: {count} CUDA device(s) visible "
            f"(CUDA_VISIBLE_DEVICES={visible!r})"
            + (f"; use cuda:0 .. cuda:{count - 1}" if count else ""))
    return cp


class CudaExecutor(Executor):
    """Runs CuPy compute on GPU `index`, on one stream owned by the executor thread."""


    def __init__(self, index: int = 0) -> None:
        cp = cuda_device(index)
        self._cp = cp
        self.index = index
        super().__init__(f"cuda:{index}")

    @property
    def xp(self) -> ModuleType:
        return self._cp

    def _enter(self) -> None:
        cp = self._cp
        cp.cuda.Device(self.index).use()
        self._stream = cp.cuda.Stream(non_blocking=True)
        self._stream.use()
        self._staging = [np.frombuffer(cp.cuda.alloc_pinned_memory(STAGING_BYTES), np.uint8,
                                       STAGING_BYTES) for _ in range(2)]
        # done[k] is recorded after the DMA out of staging[k]; wait on it before refilling.
        self._done = [cp.cuda.Event(disable_timing=True) for _ in range(2)]
        self._next = 0

    def _exit(self) -> None:
        self._stream.synchronize()
        del self._staging, self._done

    def _synchronize(self) -> None:
        self._stream.synchronize()

    def _to_device(self, array: Any) -> Any:
        host = np.asarray(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        out = self._cp.empty(host.shape, host.dtype)
        src, dst = host.reshape(-1), out.reshape(-1)
        step = STAGING_BYTES // host.itemsize
        for start in range(0, src.size, step):
            n = min(step, src.size - start)
            k, self._next = self._next, 1 - self._next
            self._done[k].synchronize()
            buf = self._staging[k][: n * host.itemsize].view(host.dtype)
            np.copyto(buf, src[start:start + n])
            dst[start:start + n].set(buf, stream=self._stream)
            self._done[k].record(self._stream)
        return out

    def _to_host(self, array: Any) -> np.ndarray:
        cp = self._cp
        if not isinstance(array, cp.ndarray):
            return np.asarray(array)
        if array.size == 0:
            return np.empty(array.shape, array.dtype)
        mem = cp.cuda.alloc_pinned_memory(array.nbytes)
        host = np.frombuffer(mem, array.dtype, array.size).reshape(array.shape)
        # get() makes a non-contiguous array contiguous on our stream first; blocking=True
        # returns once the DMA is done.
        array.get(stream=self._stream, out=host)
        return host
