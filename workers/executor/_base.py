"""The device executor: one thread that owns a device and runs the compute given to it.

A worker process runs one asyncio loop for messages and heartbeats; compute never runs on
it. The loop hands work to the executor and awaits it, so heartbeats keep flowing during a
long step:

    >>> ex = make_executor("cpu")                             # doctest: +SKIP
    >>> loss = await ex.run(step, batch)                      # doctest: +SKIP
    >>> grads = await ex.run(ex.to_host, grad_bucket)         # doctest: +SKIP

Everything runs on the one thread, in submission order, so a device's thread-local state
(the current CUDA device and stream, MLX's default stream) is set once and always holds.
Subclasses only say how to enter and leave the device and how to copy arrays; this class
owns the thread, submission, error propagation and shutdown.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import numpy as np

from narun.errors import DeviceError, WaitTimeout

__all__ = ["Executor"]

T = TypeVar("T")


class Executor(abc.ABC):
    """One dedicated thread that owns `device` and runs the functions submitted to it.

    - `await run(fn, *args)` from the event loop, `run_sync(fn, *args)` elsewhere; both run
      `fn` on the executor thread, one at a time, in submission order. Keyword arguments go
      through `functools.partial`, as with `loop.run_in_executor`.
    - An exception raised by `fn` reaches the caller unchanged, with the executor thread's
      frames in its traceback.
    - Cancelling an awaiting `run` drops work that has not started; work already running
      on the thread finishes (Python threads cannot be interrupted).
    - `close()` lets queued work finish, releases the device, joins the thread; idempotent.
    """

    # Whether transfers must run on the executor thread (thread-local device state). When
    # False they run inline in the caller, saving a thread hop.
    _thread_bound: ClassVar[bool] = True

    def __init__(self, device: str) -> None:
        self._device = device
        self._lock = threading.Lock()
        self._closed = False
        self._thread_id: int | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"narun-executor-{device}")
        try:  # enter the device on its thread now, so a bad device fails here, not later
            self._pool.submit(self._start).result()
        except BaseException:
            self._closed = True
            self._pool.shutdown(wait=True)
            raise

    # -- what a backend provides --------------------------------------------------------
    @property
    @abc.abstractmethod
    def xp(self) -> ModuleType:
        """The array module of this device (numpy, cupy or mlx.core)."""

    # Optional hooks; doing nothing is the right default for each.
    def _enter(self) -> None:  # noqa: B027
        """Runs once on the executor thread before any work (make the device current)."""

    def _exit(self) -> None:  # noqa: B027
        """Runs once on the executor thread after the last work (release device state)."""

    def _synchronize(self) -> None:  # noqa: B027
        """Wait for queued device work; CPU work is done when its function returns."""

    @abc.abstractmethod
    def _to_device(self, array: Any) -> Any:
        """Copy a host array to the device (runs on the executor thread if thread-bound)."""

    @abc.abstractmethod
    def _to_host(self, array: Any) -> np.ndarray:
        """Copy a device array to a NumPy array the caller owns."""

    # -- public API ----------------------------------------------------------------------
    @property
    def device(self) -> str:
        """The device name: "cpu", "cuda:N" or "mps"."""
        return self._device

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Run `fn(*args)` on the executor thread and await its result."""
        return await asyncio.wrap_future(self._submit(fn, args))

    def run_sync(self, fn: Callable[..., T], /, *args: Any, timeout: float | None = None) -> T:
        """Run `fn(*args)` on the executor thread and block for its result.

        Called from the executor thread itself (inside submitted work), `fn` runs at once,
        inline, instead of deadlocking behind the caller. Raises WaitTimeout after
        `timeout` seconds (the work itself still runs to its end).
        """
        if self._on_thread():  # admitted work, so it runs even while close() drains the queue
            return fn(*args)
        future = self._submit(fn, args)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise WaitTimeout(f"executor {self._device!r}: {_name(fn)} did not finish within "
                              f"{timeout} s") from None

    def to_device(self, array: Any) -> Any:
        """Copy a host array to this device; the result is this device's array type.

        Blocks the caller while the copy is staged: from the event loop, prefer
        `await ex.run(ex.to_device, array)`.
        """
        return self._call(self._to_device, array)

    def to_host(self, array: Any) -> np.ndarray:
        """Copy a device array to a NumPy array the caller owns (same shape and dtype)."""
        return self._call(self._to_host, array)

    def synchronize(self) -> None:
        """Block until all work queued on the device so far has finished."""
        self._call(self._synchronize)

    def close(self) -> None:
        """Finish queued work, release the device, join the thread. Safe to call twice."""
        if self._on_thread():
            raise DeviceError(f"executor {self._device!r}: close() was called from work "
                              "running on the executor's own thread; close it from outside")
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._pool.submit(self._exit).result()
        finally:
            self._pool.shutdown(wait=True)
            self._thread_id = None  # a later thread may get the same ident

    async def aclose(self) -> None:
        """close() without blocking the event loop while queued work finishes."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Executor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} device={self._device!r}{' closed' if self._closed else ''}>"

    # -- internals -----------------------------------------------------------------------
    def _start(self) -> None:
        self._thread_id = threading.get_ident()
        self._enter()

    def _on_thread(self) -> bool:
        return threading.get_ident() == self._thread_id

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceError(f"executor {self._device!r} is closed; "
                              f"make a new one with make_executor({self._device!r})")

    def _submit(self, fn: Callable[..., T], args: tuple[Any, ...]) -> concurrent.futures.Future[T]:
        with self._lock:  # no submission may slip in behind close()'s final _exit
            self._check_open()
            return self._pool.submit(fn, *args)

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread_bound or self._on_thread():
            return self.run_sync(fn, *args)
        self._check_open()
        return fn(*args)


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
