"""The actor base: one process, one asyncio loop (uvloop), one actor.

An actor is a plain class with async handlers named `on_<message type>`; the runtime owns
the rest. `Actor.run()` connects to the coordinator, says hello (waiting for the welcome),
sends heartbeats every `heartbeat_interval`, dispatches the coordinator's requests to the
handlers, runs `main()`, and stops cleanly: on `shutdown` (with `drain`, `main` is asked to
finish its step through `self.stopping`; without, it is cancelled), or at once when the
coordinator is gone (its connection drops, or it echoes no heartbeat for
`heartbeat_timeout`: nobody needs this process then). SIGTERM makes the actor leave: `main`
finishes its step and the process exits with EXIT_LEFT, which tells the coordinator to
replace it (a planned leave, not a failure).

    class Echo(Actor):
        role = "trainer"
        async def main(self) -> None:
            await self.stopped.wait()
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import structlog
import uvloop
import zmq.asyncio

import narun
from narun.errors import ActorDiedError
from narun.runtime.mailbox import Mailbox, Refusal, new_id
from protocol import Message, message, open_channel

log = structlog.get_logger("narun.runtime")

FLUSH_LINGER = 1.0  # seconds queued messages to the coordinator (a last step_done) may take
EXIT_LEFT = 75  # EX_TEMPFAIL: left on SIGTERM, replace me
EXIT_ORPHANED = 3  # the coordinator is gone


class Actor:
    """Base class of the processes the coordinator runs (parameter servers, trainers)."""

    role: str = "trainer"

    def __init__(self, rank: int, coordinator: str, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 10.0) -> None:
        self.rank = rank
        self.coordinator_endpoint = coordinator
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.step = -1  # reported in heartbeats
        self.stopping = False  # set by a draining shutdown: finish the step, then return
        self.leaving = False  # set by SIGTERM: stop like a drain, exit EXIT_LEFT
        self.context: zmq.asyncio.Context | None = None
        self.control: Mailbox | None = None
        self._main: asyncio.Task[Any] | None = None

    @property
    def name(self) -> str:
        return f"{self.role} {self.rank}"

    async def main(self) -> None:
        """The actor's work; returns when done (or when `self.stopping` is set)."""
        raise NotImplementedError(f"{type(self).__name__} must implement main()")

    def on_leave(self) -> None:
        """SIGTERM: finish the step and return from main (override to stop otherwise)."""
        self.stopping = True

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
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RuntimeError, ValueError):  # not the main thread (tests)
            loop.add_signal_handler(signal.SIGTERM, self._leave)
        try:
            await self.setup()
            channel = open_channel(self.context, "dealer", connect=self.coordinator_endpoint,
                                   identity=identity)
            self.control = Mailbox(channel, "coordinator", self._dispatch, watch=True).start()
            # Bounded like every wait: a wrong address, a closed port or a coordinator of
            # another protocol version fail here within seconds, named.
            await self.control.call(
                message("hello", new_id(), role=self.role, rank=self.rank,
                        software=narun.__version__),
                timeout=self.heartbeat_timeout,
                what=f"a welcome for {self.name} from {self.coordinator_endpoint}")
            beats = asyncio.ensure_future(self._heartbeats())
            self._main = asyncio.ensure_future(self.main())
            try:
                await asyncio.wait([self._main, beats], return_when=asyncio.FIRST_COMPLETED)
                if beats.done():
                    log.warning("actor.orphaned", role=self.role, rank=self.rank,
                                reason=str(beats.exception()))
                    self._main.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await self._main
                    return EXIT_ORPHANED
                with contextlib.suppress(asyncio.CancelledError):
                    self._main.result()
                return EXIT_LEFT if self.leaving else 0
            finally:
                for task in (beats, self._main):
                    task.cancel()
        finally:
            await self.teardown()
            if self.control is not None:
                self.control.close(linger=FLUSH_LINGER)
            self.context.destroy(linger=0)
            with contextlib.suppress(RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGTERM)

    def _leave(self) -> None:
        if not self.leaving:
            log.warning("actor.leaving", role=self.role, rank=self.rank, step=self.step)
            self.leaving = True
            self.on_leave()

    async def _heartbeats(self) -> None:
        """Beat every `heartbeat_interval`; returns (with the reason set as its exception)
        when the coordinator is gone: its connection dropped, or it echoed nothing for
        `heartbeat_timeout` seconds (hung, or its host unreachable)."""
        assert self.control is not None
        control = self.control
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pending: set[asyncio.Future[Any]] = set()
        while not control.peer_lost.is_set():
            beat = message("heartbeat", new_id(), role=self.role, rank=self.rank,
                           step=self.step, time=time.time())
            call = asyncio.ensure_future(control.call(
                beat, timeout=self.heartbeat_timeout, what="the heartbeat echo"))
            pending.add(call)
            done = {c for c in pending if c.done()}
            pending -= done
            if any(not c.cancelled() and c.exception() is None for c in done):
                heard = loop.time()
            if loop.time() - heard > self.heartbeat_timeout:
                for c in pending:
                    c.cancel()
                raise ActorDiedError(f"the coordinator echoed no heartbeat for "
                                     f"{loop.time() - heard:.1f} s (heartbeat_timeout "
                                     f"{self.heartbeat_timeout:g} s)")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(control.peer_lost.wait(), self.heartbeat_interval)
        for c in pending:
            c.cancel()
        raise ActorDiedError("the coordinator's connection dropped")


def run_actor(actor: Actor) -> int:
    """Run `actor` on a fresh uvloop event loop; its exit status."""
    return uvloop.run(actor.run())
