"""Background tasks whose failures someone sees.

A task started with a bare `ensure_future` keeps its exception to itself: a watchdog that
raises stops watching, silently, and a receive loop that raises surfaces only as a caller's
timeout much later. Every background task of the runtime is started through a `Background`
instead: it is named, held until it ends (asyncio keeps only weak references to tasks),
and an exception it did not expect is logged with its traceback and handed to the owner's
`on_error`, which fails the actor.

    tasks = Background("coordinator", on_error=self.fail)
    tasks.spawn(self._watchdog(), "watchdog")
    ...
    tasks.cancel()  # at the end: everything still running is cancelled
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger("narun.runtime")


class Background:
    """The background tasks of one owner (an actor, a mailbox, the coordinator).

    `expected`: exception types that end a task as part of the protocol (the caller handles
    them otherwise); they are neither logged as failures nor passed to `on_error`.
    """

    def __init__(self, owner: str, on_error: Callable[[BaseException], None],
                 expected: tuple[type[BaseException], ...] = ()) -> None:
        self.owner = owner
        self.on_error = on_error
        self.expected = expected
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.owner}: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def cancel(self) -> None:
        """Cancel every task still running (their ends are not failures)."""
        for task in self._tasks:
            task.cancel()

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or isinstance(exc, self.expected):
            return
        log.error("runtime.task_failed", owner=self.owner, task=task.get_name(),
                  error=repr(exc), exc_info=exc)
        self.on_error(exc)


class Shutdown:
    """When a long-lived service's `run` stops waiting: `stop()` (SIGTERM, SIGINT, or a
    caller) drains it, `fail(exc)` (a background task or receive loop died) makes `wait`
    raise the first failure instead. The agent, the job service and the inference server
    each hold one.

        shutdown.on_signals(asyncio.get_running_loop())
        tasks = Background("agent", on_error=shutdown.fail)
        await shutdown.wait()   # then drain
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.failure: BaseException | None = None

    def on_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, self._event.set)

    def stop(self) -> None:
        self._event.set()

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()
        if self.failure is not None:
            raise self.failure
