"""Waiting for shared state: one primitive for every "until this holds, or a deadline".

The runtime's waits all have the same shape: some state changes (a push arrives, a
trainer reports, a member leaves), and whoever waits on it re-checks its own condition,
giving up after a deadline with an error that names who waited and for what. `Broadcast`
is that shape once: `notify()` after a change, `wait_until(ready, ...)` to wait.

    changed = Broadcast()
    ...  # the state's owner: after every change
    changed.notify()
    ...  # a waiter
    await changed.wait_until(lambda: bucket.version > step, timeout=60.0,
                             who="ps 0: bucket b3", what=lambda: f"step {step}")

It is asyncio.Condition without the lock, which one event loop does not need.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from narun.errors import WaitTimeout

Text = Callable[[], str] | str


class Broadcast:
    """Wakes every waiter whenever the state it guards may have changed."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        """Something changed: every waiter re-checks its condition."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, timeout: float) -> bool:
        """Wait for the next notify(); False when `timeout` seconds passed first."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                await waiter
            return True
        except TimeoutError:
            # notified just as the deadline hit: a wake-up, not a timeout
            return waiter.done() and not waiter.cancelled()
        finally:
            self._waiters.discard(waiter)

    async def wait_until(self, ready: Callable[[], bool], *, timeout: float, who: str,
                         what: Text) -> None:
        """Return once `ready()` holds, re-checked after every notify().

        `ready` may raise to end the wait (a failure the waiter must see). After `timeout`
        seconds: WaitTimeout "{who} waited {timeout} s for {what}", `what` evaluated then,
        so it can say what was still missing.
        """
        if ready():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if not await self.wait(deadline - loop.time()):
                if ready():  # it held once the deadline came: not a timeout
                    return
                text = what() if callable(what) else what
                raise WaitTimeout(f"{who} waited {timeout:g} s for {text}")
            if ready():
                return
