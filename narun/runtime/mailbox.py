"""Mailboxes: request/reply and dispatch over one narun Channel.

A Mailbox owns one socket's receive loop. A message whose id answers one of our pending
calls resolves that call; any other message is a request, handed to the actor's handler in
its own task, and whatever the handler returns is sent back as the reply. So both sides of
a connection can call each other over one socket (the coordinator asks a shard for a
checkpoint over the connection the shard opened to it).

Failures are explicit: an `error` reply raises RemoteError with the remote traceback
(Refused for a refusal code such as `stale`, which a handler answers by raising
ReplyError); a peer known dead fails its calls at once with ActorDiedError; every call has
a timeout whose WaitTimeout names the peer, the step and what was awaited. On a DEALER, a
socket monitor notices the TCP connection drop when the peer process exits, so waiting
calls fail immediately instead of at their timeout. If the receive loop itself fails, every
call fails at once with the reason, and the owner's `on_error` hears of it
(narun.runtime.tasks).

Requests in flight are bounded (`max_requests`): past the bound a request is answered
`busy` at once, so a flood of requests cannot grow the task count without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from narun.errors import ActorDiedError, NarunError, Refused, RemoteError, WaitTimeout
from narun.runtime.tasks import Background
from protocol import Channel, Message, error_message

log = structlog.get_logger("narun.runtime")

Handler = Callable[[Message, "bytes | None"], Awaitable["Message | None"]]

#: Requests served at once by default. A parameter server holds one per trainer and bucket
#: while a ps-sync step assembles, and sizes its own bound from that.
MAX_REQUESTS = 1024


class ReplyError(NarunError):
    """Raised by a handler to answer its request with `error` and `code` (not `internal`):
    an expected refusal, such as a stale push. The caller's call raises Refused with it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def new_id() -> int:
    """A random 63-bit message id: ids of both directions never collide in practice."""
    return random.getrandbits(63) | 1


class Mailbox:
    """The receive loop, pending calls and request dispatch of one channel.

    `name` names the peer (DEALER) or this server (ROUTER) in errors. `handler(msg, route)`
    serves requests; None refuses them with `unsupported`.
    """

    def __init__(self, channel: Channel, name: str, handler: Handler | None = None,
                 watch: bool = False, on_error: Callable[[BaseException], None] | None = None,
                 max_requests: int = MAX_REQUESTS,
                 on_stray_error: Callable[[Message, bytes | None], bool] | None = None) -> None:
        self.channel = channel
        self.name = name
        self.handler = handler
        self.max_requests = max_requests
        self._on_error = on_error
        # an `error` answering no call of ours: the owner may claim it (True), else logged
        self._on_stray_error = on_stray_error
        self._pending: dict[int, tuple[asyncio.Future[Message], bytes | None]] = {}
        # id -> (what arrives for a stream, its peer): several answers to one request
        self._streams: dict[int, tuple[asyncio.Queue[Message | BaseException],
                                       bytes | None]] = {}
        self._tasks = Background(f"mailbox {name}", on_error=self._loop_failed)
        self._serving = 0  # requests whose handler runs now
        self.busy_refused = 0  # requests refused `busy` because max_requests were in flight
        self._dead: dict[bytes | None, str] = {}  # route (None: the DEALER's peer) -> why
        self._broken: str | None = None  # why the receive loop stopped, once it has
        self.peer_lost = asyncio.Event()  # set when the DEALER's peer is known dead
        self._watch = watch and channel.kind == "dealer"
        self._monitor: zmq.asyncio.Socket | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> Mailbox:
        self._tasks.spawn(self._recv_loop(), "receive loop")
        if self._watch:
            self._monitor = self.channel.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._tasks.spawn(self._watch_loop(), "connection monitor")
        return self

    def close(self, linger: float = 0.0) -> None:
        """Stop receiving, fail pending calls, close the socket. `linger` seconds let
        messages already queued (a last report) go out first; the default drops them."""
        self._tasks.cancel()
        self._fail_all(None, ActorDiedError(f"{self.name}: mailbox closed"))
        if self._monitor is not None:
            self.channel.socket.disable_monitor()
            self._monitor.close(linger=0)
        if linger > 0:
            self.channel.socket.close(linger=int(linger * 1000))
        else:
            self.channel.close()

    @property
    def serving(self) -> int:
        """Requests whose handler is running now."""
        return self._serving

    def _loop_failed(self, exc: BaseException) -> None:
        # The receive loop (or the monitor) raised: no reply can arrive any more, so every
        # call fails now, naming why, and the owner decides what that means for it.
        self._broken = f"{self.name}: the mailbox's receive loop failed: {exc!r}"
        self._fail_all(None, ActorDiedError(self._broken))
        if self._on_error is not None:
            self._on_error(exc)

    def peer_died(self, route: bytes | None, why: str) -> None:
        """Mark a peer dead: its pending calls fail now, later calls fail at once."""
        self._dead[route] = why
        self._fail_all(route, ActorDiedError(why))
        if route is None:
            self.peer_lost.set()

    def is_dead(self, route: bytes | None = None) -> bool:
        return route in self._dead

    def revive(self, route: bytes | None) -> None:
        """A restarted peer took over `route`: calls to it go through again."""
        self._dead.pop(route, None)

    # -- calls -------------------------------------------------------------------------
    async def call(self, msg: Message, *, to: bytes | None = None, timeout: float,
                   what: str, step: int | None = None) -> Message:
        """Send a request and await its reply (an `error` reply raises)."""
        if to in self._dead:
            raise ActorDiedError(f"{self._dead[to]}; cannot ask {self._who(to)} for {what}")
        if self._broken is not None:
            raise ActorDiedError(f"{self._broken}; cannot ask {self._who(to)} for {what}")
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[msg.id] = (future, to)
        # One deadline for the send and the reply. asyncio.timeout tells its own expiry
        # from a cancellation of the caller that races it: a shutdown is never swallowed.
        try:
            async with asyncio.timeout(timeout):
                await self.channel.send(msg, to=to, wait_sent=False)
                reply = await future
        except TimeoutError:
            at = "" if step is None else f" at step {step}"
            # A peer speaking another protocol version is refused, not answered: say so.
            refused = "" if not self.channel.refused else (
                f"; this side refused {self.channel.refused} message(s), the last: "
                f"{self.channel.last_refusal}")
            raise WaitTimeout(f"{self._who(to)} did not answer {msg.type} ({what}){at} within "
                              f"{timeout:g} s{refused}") from None
        finally:
            self._pending.pop(msg.id, None)
        if reply.type == "error":
            raise self._refusal(reply, msg, what, to)
        return reply

    def _refusal(self, error: Message, msg: Message, what: str,
                 to: bytes | None) -> RemoteError:
        """What an `error` answer to `msg` raises: RemoteError for the handler's failure,
        Refused for a refusal code the caller may decide about."""
        text = (f"{self._who(to)} refused {msg.type} ({what}): [{error['code']}] "
                f"{error['message']}")
        if error["code"] == "internal":
            return RemoteError(text, error["traceback"])
        return Refused(text, error["code"], error["traceback"])

    async def stream(self, msg: Message, *, timeout: float, what: str,
                     to: bytes | None = None) -> AsyncIterator[Message]:
        """Send a request answered by several messages with its id (an `events`
        subscription), and yield each as it arrives; WaitTimeout when none comes for
        `timeout` seconds, RemoteError/Refused for an `error`. The caller ends the stream
        by leaving the loop."""
        if to in self._dead or self._broken is not None:
            raise ActorDiedError(f"{self._dead.get(to) or self._broken}; cannot ask "
                                 f"{self._who(to)} for {what}")
        queue: asyncio.Queue[Message | BaseException] = asyncio.Queue()
        self._streams[msg.id] = (queue, to)
        try:
            await self.channel.send(msg, to=to, wait_sent=False, timeout=timeout)
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        item = await queue.get()
                except TimeoutError:
                    raise WaitTimeout(f"{self._who(to)} sent nothing for {msg.type} ({what}) "
                                      f"within {timeout:g} s") from None
                if isinstance(item, BaseException):
                    raise item
                if item.type == "error":
                    raise self._refusal(item, msg, what, to)
                yield item
        finally:
            self._streams.pop(msg.id, None)

    async def send(self, msg: Message, *, to: bytes | None = None,
                   timeout: float | None = None) -> None:
        """Send without awaiting a reply (arrays in `msg` must not be written afterwards)."""
        if to in self._dead:
            raise ActorDiedError(f"{self._dead[to]}; cannot send {msg.type} to {self._who(to)}")
        await self.channel.send(msg, to=to, wait_sent=False, timeout=timeout)

    # -- internals ---------------------------------------------------------------------
    def _who(self, route: bytes | None) -> str:
        return self.name if route is None else route.decode(errors="replace")

    def _fail_all(self, route: bytes | None, exc: Exception) -> None:
        for future, to in list(self._pending.values()):
            if (route is None or to == route) and not future.done():
                future.set_exception(exc)
        for queue, to in list(self._streams.values()):
            if route is None or to == route:
                queue.put_nowait(exc)

    async def _recv_loop(self) -> None:
        while True:
            incoming = await self.channel.recv()
            msg, route = incoming.msg, incoming.route
            pending = self._pending.get(msg.id)
            stream = self._streams.get(msg.id)
            if pending is not None and pending[1] == route:
                if not pending[0].done():
                    pending[0].set_result(msg)
            elif stream is not None and stream[1] == route:
                stream[0].put_nowait(msg)
            elif msg.type == "error":
                if self._on_stray_error is None or not self._on_stray_error(msg, route):
                    log.warning("runtime.unsolicited_error", mailbox=self.name,
                                code=msg["code"], message=msg["message"])
            elif self._serving >= self.max_requests:
                await self._refuse_busy(msg, route)
            else:
                self._serving += 1
                self._tasks.spawn(self._serve(msg, route), msg.type)

    async def _refuse_busy(self, msg: Message, route: bytes | None) -> None:
        self.busy_refused += 1
        if self.busy_refused & (self.busy_refused - 1) == 0:  # 1, 2, 4...: a flood can't flood
            log.warning("runtime.busy", mailbox=self.name, serving=self._serving,
                        refused=self.busy_refused)
        answer = error_message(msg.id, "busy", f"{self.name} is serving {self._serving} "
                                               f"requests, its limit (max_requests); retry later")
        # Never parks the receive loop: a peer that does not read its refusals loses them.
        with contextlib.suppress(ActorDiedError, WaitTimeout):
            await self.channel.send(answer, to=route, wait_sent=False, timeout=0.0)

    async def _serve(self, msg: Message, route: bytes | None) -> None:
        try:
            await self._answer(msg, route)
        finally:
            self._serving -= 1

    async def _answer(self, msg: Message, route: bytes | None) -> None:
        try:
            if self.handler is None:
                raise ReplyError("unsupported", f"{self.name} serves no requests")
            reply = await self.handler(msg, route)
        except asyncio.CancelledError:
            raise
        except ReplyError as exc:
            reply = error_message(msg.id, exc.code, str(exc))
        except WaitTimeout as exc:  # the handler waited for a third party (other trainers)
            reply = error_message(msg.id, "timeout", str(exc))
        except Exception as exc:  # the handler's bug or failure: the caller gets it
            log.warning("runtime.handler_failed", mailbox=self.name, type=msg.type,
                        error=repr(exc))
            reply = error_message(msg.id, "internal", f"{type(exc).__name__}: {exc}",
                                  traceback.format_exc())
        if reply is None:
            return
        with contextlib.suppress(ActorDiedError):  # the asker left: nobody waits for it
            await self.channel.send(reply, to=route, wait_sent=False)

    async def _watch_loop(self) -> None:
        assert self._monitor is not None  # set by start()
        # No need to see EVENT_CONNECTED first: libzmq raises DISCONNECTED only for a session
        # that existed, and the channel usually connected before this monitor was attached
        # (waiting for CONNECTED then missed it, and a dead peer went unnoticed).
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.peer_died(None, f"{self.name} disconnected (its process exited?)")
                return
