"""The CPU executor: NumPy on a dedicated thread, with the process tuned for compute."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from narun._process import ProcessTuning, set_blas_threads, tune_process
from workers.executor._base import Executor

__all__ = ["CpuExecutor"]


class CpuExecutor(Executor):
    """Runs NumPy compute on one thread. `blas_threads` caps OpenBLAS for this process, so
    co-located workers don't oversubscribe the cores (None leaves BLAS as it is).

    Construction also tunes glibc malloc (see `narun._process.tune_process`); what took
    effect is in `.tuning`. Transfers are no-ops: `to_device` and `to_host` return NumPy
    arrays without copying when given NumPy arrays, as torch's `.to("cpu")` does.
    """

    _thread_bound = False

    def __init__(self, *, blas_threads: int | None = None) -> None:
        # Before the thread exists: M_ARENA_MAX only binds threads that have not allocated.
        self.tuning: ProcessTuning = tune_process(blas_threads)
        self._blas_threads = blas_threads
        super().__init__("cpu")

    @property
    def xp(self) -> ModuleType:
        return np

    def _enter(self) -> None:
        # An OpenMP build of OpenBLAS keeps the thread count per calling thread: set it
        # where the compute runs too (for the pthreads build this repeats a global setting).
        if self._blas_threads is not None:
            set_blas_threads(self._blas_threads)

    def _to_device(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def _to_host(self, array: Any) -> np.ndarray:
        return np.asarray(array)
