"""The actor base: one process, one asyncio loop (uvloop), one actor.

An actor is a plain class with async handlers named `on_<message type>`; the runtime owns
the rest. `Actor.run()` connects to the coordinator, says hello (waiting for the welcome),
sends heartbeats every `heartbeat_interval`, dispatches the coordinator's requests to the
handlers, runs `main()`, and stops cleanly: on `shutdown` (with `drain`, `main` is asked to
finish its step through `self.stopping`; without, it is cancelled), or at once when the
coordinator's connection drops (the coordinator is gone, so nobody needs this process).

    class Echo(Actor):
        role = "trainer"
        async def main(self) -> None:
            await self.stopped.wait()
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog
import uvloop
import zmq.asyncio

import narun
from narun.errors import ActorDiedError, WaitTimeout
from narun.runtime.mailbox import Mailbox, Refusal, new_id
from protocol import Message, message, open_channel

log = structlog.get_logger("narun.runtime")

HELLO_TIMEOUT = 30.0  # seconds for the coordinator to welcome a new actor
FLUSH_LINGER = 1.0  # seconds queued messages to the coordinator (a last step_done) may take


class Actor:
    """Base class of the processes the coordinator runs (parameter servers, trainers)."""

    role: str = "trainer"

    def __init__(self, rank: int, coordinator: str, heartbeat_interval: float = 1.0) -> None:
        self.rank = rank
        self.coordinator_endpoint = coordinator
        self.heartbeat_interval = heartbeat_interval
        self.step = -1  # reported in heartbeats
        self.stopping = False  # set by a draining shutdown: finish the step, then return
        self.context: zmq.asyncio.Context | None = None
        self.control: Mailbox | None = None
        self._main: asyncio.Task[Any] | None = None

    @property
    def name(self) -> str:
        return f"{self.role} {self.rank}"

    async def main(self) -> None:
        """The actor's work; returns when done (or when `self.stopping` is set)."""
        raise NotImplementedError(f"{type(self).__name__} must implement main()")

    async def setup(self) -> None:
        """Runs before hello (e.g. bind the sockets peers will connect to)."""

    async def teardown(self) -> None:
        """Runs after main, always (close what setup opened)."""

    # -- handlers the runtime provides ------------------------------------------------
    async def on_shutdown(self, msg: Message, route: bytes | None) -> None:
        log.info("actor.shutdown", role=self.role, rank=self.rank, reason=msg["reason"],
                 drain=msg["drain"])
        self.stopping = True
        if not msg["drain"] and self._main is not None:
            self._main.cancel()

    async def _dispatch(self, msg: Message, route: bytes | None) -> Message | None:
        handler = getattr(self, f"on_{msg.type}", None)
        if handler is None:
            raise Refusal("unsupported", f"{self.name} does not handle {msg.type!r}")
        return await handler(msg, route)

    # -- lifecycle ---------------------------------------------------------------------
    async def run(self) -> int:
        """Connect, hello, serve and run main; the process's exit status."""
        self.context = zmq.asyncio.Context()
        identity = f"{self.role}-{self.rank}".encode()
        try:
            await self.setup()
            channel = open_channel(self.context, "dealer", connect=self.coordinator_endpoint,
                                   identity=identity)
            self.control = Mailbox(channel, "coordinator", self._dispatch, watch=True).start()
            await self.control.call(
                message("hello", new_id(), role=self.role, rank=self.rank,
                        software=narun.__version__),
                timeout=HELLO_TIMEOUT, what=f"a welcome for {self.name}")
            beats = asyncio.ensure_future(self._heartbeats())
            self._main = asyncio.ensure_future(self.main())
            lost = asyncio.ensure_future(self._coordinator_lost())
            try:
                await asyncio.wait([self._main, lost], return_when=asyncio.FIRST_COMPLETED)
                if lost.done():
                    log.warning("actor.orphaned", role=self.role, rank=self.rank)
                    self._main.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await self._main
                    return 3
                with contextlib.suppress(asyncio.CancelledError):
                    self._main.result()
                return 0
            finally:
                for task in (beats, lost, self._main):
                    task.cancel()
        finally:
            await self.teardown()
            if self.control is not None:
                self.control.close(linger=FLUSH_LINGER)
            self.context.destroy(linger=0)

    async def _coordinator_lost(self) -> None:
        assert self.control is not None
        await self.control.peer_lost.wait()

    async def _heartbeats(self) -> None:
        assert self.control is not None
        while True:
            with contextlib.suppress(ActorDiedError, WaitTimeout):
                await self.control.send(message(
                    "heartbeat", new_id(), role=self.role, rank=self.rank, step=self.step,
                    time=time.time()), timeout=self.heartbeat_interval)
            await asyncio.sleep(self.heartbeat_interval)


def run_actor(actor: Actor) -> int:
    """Run `actor` on a fresh uvloop event loop; its exit status."""
    return uvloop.run(actor.run())
