"""The actor base: one process, one asyncio loop (uvloop), one actor.

An actor is a plain class with async handlers named `on_<message type>`; the runtime owns
the rest. `Actor.run()` connects to the coordinator, says hello (waiting for the welcome),
sends heartbeats every `heartbeat_interval`, dispatches the coordinator's requests to the
handlers, runs `main()`, and stops cleanly: on `shutdown` (with `drain`, `main` is asked to
finish its step through `self.stopping`; without, it is cancelled), or at once when the
coordinator is gone (its connection drops, or it echoes no heartbeat for
`heartbeat_timeout`: nobody needs this process then). SIGTERM makes the actor leave: `main`
finishes its step and the process exits with EXIT_LEFT, which tells the coordinator to
replace it (a planned leave, not a failure). A background task of the actor (`self.tasks`,
its mailboxes' receive loops) that fails unexpectedly fails the actor: `main` is cancelled
and `run` raises that exception, so the process exits with an error the coordinator sees.

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
from narun._process import rss_bytes
from narun.errors import ActorDiedError
from narun.runtime.jobkeys import JobKeys
from narun.runtime.mailbox import Mailbox, ReplyError, new_id
from narun.runtime.tasks import Background
from protocol import Message, message, open_channel
from protocol.curve import Authenticator, CurveClient, CurveServer

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
        self.welcome: Message | None = None  # the coordinator's answer to hello
        self.tasks = Background(self.name, on_error=self.fail)
        self.job_keys: JobKeys | None = None  # set across hosts: every socket uses CURVE
        self.authenticator: Authenticator | None = None  # admits the job's key (servers)
        self._main: asyncio.Task[Any] | None = None
        self._failure: BaseException | None = None

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

    def fail(self, exc: BaseException) -> None:
        """Something the actor relies on failed (a background task, a receive loop): stop
        `main`; `run` raises `exc`."""
        if self._failure is None:
            self._failure = exc
            if self._main is not None:
                self._main.cancel()

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
            raise ReplyError("unsupported", f"{self.name} does not handle {msg.type!r}")
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
            if self.job_keys is not None:
                self.authenticator = self.job_keys.authenticator(self.context)
            await self.setup()
            channel = open_channel(self.context, "dealer", connect=self.coordinator_endpoint,
                                   identity=identity, curve=self.curve_client())
            self.control = Mailbox(channel, "coordinator", self._dispatch, watch=True,
                                   on_error=self.fail).start()
            # Bounded like every wait: a wrong address, a closed port or a coordinator of
            # another protocol version fail here within seconds, named.
            self.welcome = await self.control.call(
                message("hello", new_id(), role=self.role, rank=self.rank,
                        software=narun.__version__),
                timeout=self.heartbeat_timeout,
                what=f"a welcome for {self.name} from {self.coordinator_endpoint}")
            beats = loop.create_task(self._heartbeats(), name=f"{self.name}: heartbeats")
            self._main = loop.create_task(self.main(), name=f"{self.name}: main")
            if self._failure is not None:  # a receive loop failed before main existed
                self._main.cancel()
            try:
                await asyncio.wait([self._main, beats], return_when=asyncio.FIRST_COMPLETED)
                if beats.done() and self._failure is None:
                    log.warning("actor.orphaned", role=self.role, rank=self.rank,
                                reason=str(beats.exception()))
                    self._main.cancel()
                    await asyncio.wait([self._main])
                    self._log_main_error()
                    return EXIT_ORPHANED
                await asyncio.wait([self._main])
                if self._failure is not None:
                    self._log_main_error()
                    raise self._failure
                with contextlib.suppress(asyncio.CancelledError):
                    self._main.result()
                return EXIT_LEFT if self.leaving else 0
            finally:
                for task in (beats, self._main):
                    task.cancel()
                self.tasks.cancel()
        finally:
            await self.teardown()
            if self.control is not None:
                self.control.close(linger=FLUSH_LINGER)
            if self.authenticator is not None:
                self.authenticator.stop()
            self.context.destroy(linger=0)
            with contextlib.suppress(RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGTERM)

    def curve_client(self) -> CurveClient | None:
        """CURVE for a connection to another process of the job (None on one host)."""
        return None if self.job_keys is None else self.job_keys.client()

    def curve_server(self) -> CurveServer | None:
        """CURVE for a socket the job's processes connect to (None on one host)."""
        if self.job_keys is None or self.authenticator is None:
            return None
        return self.job_keys.server(self.authenticator)

    def _log_main_error(self) -> None:
        # main's own error, when something else ends the actor: it must not vanish
        assert self._main is not None
        if not self._main.cancelled() and self._main.exception() is not None:
            log.error("actor.main_failed", role=self.role, rank=self.rank,
                      error=repr(self._main.exception()), exc_info=self._main.exception())

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
        calls: set[asyncio.Task[Any]] = set()

        def echoed(call: asyncio.Task[Any]) -> None:
            nonlocal heard
            calls.discard(call)
            if not call.cancelled() and call.exception() is None:
                heard = loop.time()

        try:
            while not control.peer_lost.is_set():
                beat = message("heartbeat", new_id(), role=self.role, rank=self.rank,
                               step=self.step, time=time.time())
                # each echo awaited on its own: a slow one must not delay the next beat
                call = loop.create_task(control.call(beat, timeout=self.heartbeat_timeout,
                                                     what="the heartbeat echo"))
                calls.add(call)
                call.add_done_callback(echoed)
                if loop.time() - heard > self.heartbeat_timeout:
                    raise ActorDiedError(f"the coordinator echoed no heartbeat for "
                                         f"{loop.time() - heard:.1f} s (heartbeat_timeout "
                                         f"{self.heartbeat_timeout:g} s)")
                # what an operator (and the soak test) watches for leaks: flat after warm-up
                log.debug("actor.vitals", role=self.role, rank=self.rank, step=self.step,
                          tasks=len(asyncio.all_tasks()), rss=rss_bytes())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.heartbeat_interval):
                        await control.peer_lost.wait()
            raise ActorDiedError("the coordinator's connection dropped")
        finally:
            for call in calls:
                call.cancel()


def run_actor(actor: Actor) -> int:
    """Run `actor` on a fresh uvloop event loop; its exit status."""
    return uvloop.run(actor.run())
