"""Device executors: one thread per worker process that owns the device and runs compute.

The worker's asyncio loop submits work with `await executor.run(fn, *args)`, so messages
and heartbeats keep flowing during a long step. `make_executor(config.runtime.device)`
builds the right one: `cpu` (NumPy), `cuda:N` (CuPy), `mps` (MLX), or `auto`.
"""

from workers.executor._base import Executor
from workers.executor._cpu import CpuExecutor
from workers.executor._cuda import CudaExecutor
from workers.executor._factory import (
    check_device_here,
    make_executor,
    parse_device,
    resolve_device,
    training_device,
)
from workers.executor._mps import MpsExecutor

__all__ = [
    "CpuExecutor", "CudaExecutor", "Executor", "MpsExecutor", "check_device_here",
    "make_executor", "parse_device", "resolve_device", "training_device",
]
