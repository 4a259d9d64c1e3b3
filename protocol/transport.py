"""Channels: narun messages over zmq.asyncio sockets (SPEC.md, "Transport").

A thin layer over the pure codec: it sets the socket options every narun socket carries,
adds and strips routing frames, refuses bad input without ever stopping (answering an
``error`` where a reply is possible), and keeps zero-copy buffers out of the caller's hands
until ZeroMQ has released them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import Awaitable, Iterable, Sequence
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import structlog
import zmq
import zmq.asyncio

from narun.errors import ActorDiedError, ConfigError, ProtocolError, WaitTimeout
from protocol._pyzmq import send as _send
from protocol._pyzmq import wake_asyncio, watch_fd
from protocol.codec import decode, encode, refusal
from protocol.curve import CurveClient, CurveServer
from protocol.limits import DEFAULT_LIMITS, INLINE_LIMIT, Limits
from protocol.messages import Message

SOCKET_TYPES = {"router": zmq.ROUTER, "dealer": zmq.DEALER, "push": zmq.PUSH,
                "pull": zmq.PULL, "pub": zmq.PUB, "sub": zmq.SUB}
#: Messages queued per peer and direction. Tensor messages are large: a few in flight keep
#: the pipe full, hundreds only hold memory. ROUTER and PUB drop beyond it, others wait.
#: The receive side is lowered further to fit Limits.max_queued_bytes (Limits.receive_hwm).
DEFAULT_HWM = 64
_ROUTED = {"router", "pub", "sub"}  # one routing frame: the peer's identity, or the topic
_CAN_REPLY = {"router", "dealer"}
_SEND_ONLY = {"push", "pub"}
_RECV_ONLY = {"pull", "sub"}
# Dead-peer detection below the heartbeats, for half-open TCP connections (seconds, count).
_KEEPALIVE_IDLE, _KEEPALIVE_INTERVAL, _KEEPALIVE_COUNT = 30, 10, 3
# Plain ints, computed once: the hot path's flag arithmetic on zmq's IntFlags (SNDMORE |
# DONTWAIT) costs ~0.5 us an operation.
_POLLIN, _POLLOUT, _EVENTS, _RCVMORE = (int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.EVENTS),
                                        int(zmq.RCVMORE))
_DONTWAIT, _MORE_DONTWAIT = int(zmq.DONTWAIT), int(zmq.SNDMORE | zmq.DONTWAIT)

# Longest a parked reader or sender sleeps without re-reading ZMQ_EVENTS (see
# Channel._recheck_parked).
_RECHECK_S = 0.05

log = structlog.get_logger(__name__)
T = TypeVar("T")


class _Socket(zmq.asyncio.Socket):
    """A zmq.asyncio socket that tells its Channel when it closes, however it is closed
    (Channel.close, socket.close, Context.destroy), so the Channel stops watching its FD and
    cancels a parked recv or send, as zmq.asyncio does for its own."""

    # Weak: a socket -> channel -> socket cycle would leave the socket's close to the cycle
    # collector, which may finalize an abandoned Context first, whose term() then hangs.
    _on_close: weakref.WeakMethod[Any] | None = None

    def close(self, linger: int | None = None) -> None:
        unwatch = self._on_close() if self._on_close is not None else None
        if unwatch is not None and not self.closed:
            unwatch()
        super().close(linger=linger)


class Incoming(NamedTuple):
    """A received message and its routing frame: the sending peer's identity on a ROUTER
    (pass it back as ``send(..., to=route)``), the topic on a SUB, else None."""

    msg: Message
    route: bytes | None


class Channel:
    """One socket speaking narun messages. One task receives at a time."""

    def __init__(self, socket: zmq.asyncio.Socket, kind: str, limits: Limits,
                 endpoint: str) -> None:
        self.socket = socket
        self.kind = kind
        self.limits = limits
        self.endpoint = endpoint
        self.refused = 0  # messages refused so far (malformed, oversized, unknown...)
        self.last_refusal = ""  # why the last one was refused (named in timeouts upstream)
        # All I/O goes through a synchronous view of the socket with DONTWAIT (~2 us a call;
        # zmq.asyncio costs ~40 us a call and runs its IntFlag-heavy event handler for every
        # message). Waiting is done here: the event loop watches a duplicate of the socket's
        # FD (the zmq.asyncio socket, if used directly, keeps its own registration).
        self._sync = zmq.Socket.shadow(socket.underlying)
        # bound once: the hot path calls them several times a message
        self._getopt, self._recv_frame = self._sync.get, self._sync.recv
        self._sends_waiting = 0  # sends parked: later ones queue behind them, in order
        self._send_lock = asyncio.Lock()  # held by the one parked sender that retries
        self._maybe_partial = False
        # One reader at a time: two parked readers would each take frames of one multipart.
        self._recv_lock = asyncio.Lock()
        self._fd: int | None = None  # the duplicate FD, watched by _loop
        self._loop: asyncio.AbstractEventLoop | None = None
        # resolved when the parked reader, or the parked sender, should retry
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._recheck_due = False
        self._safety_net: asyncio.TimerHandle | None = None  # see _recheck_parked
        self._disarm_due = False  # _disarm_if_idle is scheduled
        if isinstance(socket, _Socket):
            socket._on_close = weakref.WeakMethod(self._unwatch)

    def __repr__(self) -> str:
        return f"<Channel {self.kind} {self.endpoint}>"

    def __del__(self) -> None:
        # Only reached unwatched, or after the loop died: a watching loop holds the channel.
        if self._fd is not None:
            os.close(self._fd)

    async def send(self, msg: Message, *, to: bytes | None = None, wait_sent: bool = True,
                   timeout: float | None = None) -> None:
        """Send ``msg`` (``to``: the peer identity on a ROUTER, the topic on a PUB).

        Tensors of 64 KiB and more are sent without copying. With ``wait_sent`` (the
        default) this returns only once ZeroMQ has released them, so the caller may write
        to its arrays at once; pass False for arrays nobody writes to afterwards. Raises
        ActorDiedError when a ROUTER's peer is gone, WaitTimeout after ``timeout`` seconds.
        """
        self._check_open()
        if self.kind in _RECV_ONLY:
            raise ValueError(f"{self!r} cannot send: a {self.kind} socket only receives")
        if self.kind == "router" and to is None:
            raise ValueError(f"{self!r}: send needs to=<peer identity> (Incoming.route)")
        if to is not None and self.kind not in _ROUTED:
            raise ValueError(f"{self!r}: to= is for router and pub sockets, got {to!r:.40}")
        frames: list[Any] = encode(msg, self.limits)
        if self.kind in _ROUTED:
            frames.insert(0, to or b"")
        if not wait_sent and not self._sends_waiting:
            try:  # the common case, without a coroutine more: the socket takes it now
                if self._try_send(frames):
                    return
            except zmq.ZMQError as exc:
                raise _send_error(self, exc, to) from None
        await self._send_frames(frames, wait_sent, timeout, to)

    def try_send(self, msg: Message, *, to: bytes | None = None) -> bool:
        """Send ``msg`` now or not at all: False when the socket would block (the peer's
        queue is at its high-water mark) or, on a ROUTER, the peer is gone; never waits.
        For a server streaming to many peers, where one that does not read must not hold
        up the rest: it drops that peer's stream instead."""
        self._check_open()
        if self._sends_waiting:  # parked sends go first, in order
            return False
        frames: list[Any] = encode(msg, self.limits)
        if self.kind in _ROUTED:
            frames.insert(0, to or b"")
        try:
            return self._try_send(frames)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            raise

    async def recv(self, timeout: float | None = None) -> Incoming:
        """The next valid message. Invalid ones are counted in ``refused``, answered with an
        ``error`` on ROUTER and DEALER sockets, and skipped. WaitTimeout after ``timeout``."""
        self._check_open()
        if self.kind in _SEND_ONLY:
            raise ValueError(f"{self!r} cannot receive: a {self.kind} socket only sends")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        n_route = 1 if self.kind in _ROUTED else 0
        if deadline is None or not self._recv_lock.locked():
            await self._recv_lock.acquire()
        else:
            try:
                await _until(self._recv_lock.acquire(), deadline)
            except TimeoutError:
                raise WaitTimeout(f"{self!r}: no message within {timeout} s (another "
                                  "reader held the socket)") from None
        try:
            while True:
                frames, overflow = await self._recv_frames(deadline, timeout, n_route)
                route, body = frames[:n_route], frames[n_route:]
                try:
                    if overflow:
                        raise ProtocolError(overflow)
                    return Incoming(decode(body, self.limits),
                                    bytes(route[0]) if route else None)
                except ProtocolError as exc:
                    self._refuse(route, body, exc)
        finally:
            self._recv_lock.release()

    def close(self, linger: float = 0.0) -> None:
        """Close the socket; ``linger`` seconds let queued messages go out first (the
        default drops them). A recv or send parked on the channel is cancelled."""
        self._unwatch()
        self.socket.close(linger=int(linger * 1000))

    def _check_open(self) -> None:
        # the synchronous shadow must never touch a closed socket's freed handle
        if self.socket.closed:
            raise ValueError(f"{self!r} is closed")

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    async def _send_frames(self, frames: list[Any], wait_sent: bool, timeout: float | None,
                           peer: bytes | None) -> None:
        tracker = None
        if wait_sent:
            for i, frame in enumerate(frames):
                if isinstance(frame, memoryview) and frame.nbytes >= INLINE_LIMIT:
                    frames[i] = zmq.Frame(frame, track=True, copy=False)
            tracked = [f for f in frames if isinstance(f, zmq.Frame)]
            tracker = zmq.MessageTracker(*tracked) if tracked else None
            del tracked
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            if self._sends_waiting or not self._try_send(frames):
                self._sends_waiting += 1
                try:
                    await self._send_parked(frames, deadline)
                finally:
                    self._sends_waiting -= 1
        except TimeoutError:
            raise WaitTimeout(f"{self!r}: send not accepted within {timeout} s (peer "
                              f"{peer!r} not reading?)") from None
        except zmq.ZMQError as exc:
            raise _send_error(self, exc, peer) from None
        if tracker is not None:
            # A Frame object holds its own reference to the buffer: ZeroMQ releases it only
            # once the Frame objects are gone too, so drop ours before waiting.
            frames.clear()
            await _released(tracker, deadline, self)

    async def _send_parked(self, frames: list[Any], deadline: float | None) -> None:
        await _until(self._send_lock.acquire(), deadline)
        try:
            while not self._try_send(frames):
                await self._wait(_POLLOUT, deadline)
        finally:
            self._send_lock.release()

    def _try_send(self, frames: list[Any]) -> bool:
        # A multipart message is accepted whole or not at all: only its first frame can
        # meet the high-water mark (EAGAIN), or find a ROUTER's peer gone (EHOSTUNREACH).
        # bytes (headers, routing frames) are copied: pyzmq would wrap them in a Frame
        # object first. Tensor buffers (memoryviews, tracked Frames) go without a copy.
        self._check_open()
        sock, last = self._sync, len(frames) - 1
        first = frames[0]
        try:
            _send(sock, first, _MORE_DONTWAIT if last else _DONTWAIT, type(first) is bytes)
        except zmq.Again:
            self._rearm()
            return False
        except zmq.ZMQError:
            self._rearm()
            raise
        for i in range(1, last + 1):
            frame = frames[i]
            _send(sock, frame, _MORE_DONTWAIT if i < last else _DONTWAIT, type(frame) is bytes)
        self._rearm()
        return True

    def _rearm(self) -> None:
        # The socket's FD signals readiness edge-triggered, and any call on the socket can
        # consume the edge. So after each of our calls, whoever is parked re-checks
        # ZMQ_EVENTS (here, or in zmq.asyncio when the socket is used directly); otherwise a
        # reader can sleep beside a message that has arrived (seen as lost replies with
        # several tasks sending on one socket). Once per loop iteration is enough (the loop
        # does not sleep while a callback is ready), and a burst of sends then costs one
        # ZMQ_EVENTS read, not one each.
        if (self._readable is not None or self._writable is not None) \
                and not self._recheck_due and self._loop is not None:
            self._recheck_due = True
            self._loop.call_soon(self._recheck)
        wake_asyncio(self.socket)

    def _recheck(self) -> None:
        self._recheck_due = False
        if self._readable is not None or self._writable is not None:
            self._on_events()

    def _on_events(self) -> None:
        # The FD's reader, and the re-check after our own calls. Reading ZMQ_EVENTS also
        # clears the FD, which otherwise stays readable (the loop's reader is level-triggered).
        if self.socket.closed:  # closed without telling us (a socket not from open_channel)
            self._unwatch()
            return
        self._wake(self._getopt(_EVENTS))
        wake_asyncio(self.socket)

    def _wake(self, events: int) -> None:
        readable, writable = self._readable, self._writable
        if readable is not None and events & _POLLIN and not readable.done():
            readable.set_result(None)
        if writable is not None and events & _POLLOUT and not writable.done():
            writable.set_result(None)

    async def _wait(self, event: int, deadline: float | None) -> None:
        """Sleep until ``event`` (_POLLIN: the reader, _POLLOUT: the parked sender) may be
        ready; the caller retries the DONTWAIT call that has just failed."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._watch(loop)
        # The failed call, or any call since, may have consumed the FD's edge: ZMQ_EVENTS
        # is the truth, so look once before sleeping. Looking consumes the edge too, so the
        # other direction's parked waiter is told what we saw.
        events = self._getopt(_EVENTS)
        self._wake(events)
        if not events & event:
            await self._park(event, deadline)

    async def _park(self, event: int, deadline: float | None) -> None:
        """Sleep until the FD's reader (or a re-check) sees ``event``; only right after a
        ZMQ_EVENTS read that did not show it, with no call on the socket since."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._watch(loop)
        ready: asyncio.Future[None] = loop.create_future()
        if event == _POLLIN:
            self._readable = ready
        else:
            self._writable = ready
        if self._safety_net is None:
            self._safety_net = loop.call_later(_RECHECK_S, self._recheck_parked)
        try:
            await _until(ready, deadline)
        finally:
            if event == _POLLIN:
                self._readable = None
            else:
                self._writable = None
            if self._readable is None and self._writable is None \
                    and self._safety_net is not None and not self._disarm_due:
                # Cancelled at the end of this loop iteration, not here: a reader loop parks
                # again within this step, and cancelling and re-arming the timer every park
                # cost ~2 us of main-thread CPU a small request/reply (two parks, uvloop).
                self._disarm_due = True
                loop.call_soon(self._disarm_if_idle)
        self._check_open()

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._check_open()
        if self._fd is None:
            self._fd = watch_fd(self._sync)
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        loop.add_reader(self._fd, self._on_events)
        self._loop = loop
        if self._safety_net is not None:  # armed on the old loop: _park arms it on this one
            self._safety_net.cancel()
            self._safety_net = None
        self._disarm_due = False

    def _recheck_parked(self) -> None:
        # A safety net, not the mechanism: something outside this Channel (such as
        # zmq.asyncio used on the socket directly, which reads ZMQ_EVENTS from its own
        # deferred callbacks) can consume the FD's edge; a wake-up lost so must cost a
        # moment, never a hang. One timer a channel, however many wait, and only while one
        # does: _park arms it, and when the last waiter leaves it is cancelled at the end of
        # that loop iteration (_disarm_if_idle). An idle channel schedules nothing.
        self._safety_net = None
        if self._loop is None or self.socket.closed:
            return
        if self._readable is not None or self._writable is not None:
            self._wake(self._getopt(_EVENTS))
            self._safety_net = self._loop.call_later(_RECHECK_S, self._recheck_parked)

    def _disarm_if_idle(self) -> None:
        self._disarm_due = False
        if self._readable is None and self._writable is None and self._safety_net is not None:
            self._safety_net.cancel()
            self._safety_net = None

    def _unwatch(self) -> None:
        for parked in (self._readable, self._writable):
            if parked is not None and not parked.done():
                parked.cancel()
        if self._safety_net is not None:
            self._safety_net.cancel()
            self._safety_net = None
        if self._fd is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = self._loop = None

    async def _recv_frames(self, deadline: float | None, timeout: float | None,
                           n_route: int) -> tuple[list[Any], str]:
        """One whole multipart message, but never more than the limits: past them, the rest
        is read and dropped frame by frame, and the reason returned. The ``n_route``
        routing frames count toward neither limit."""
        getopt, recv_frame = self._getopt, self._recv_frame
        if self._maybe_partial:  # a read stopped inside a multipart message
            while getopt(_RCVMORE):
                recv_frame(_DONTWAIT, False)
            self._maybe_partial = False
        # ZMQ_EVENTS first, not a recv that may fail: a failed recv costs more (pyzmq
        # builds an exception), and one read of ZMQ_EVENTS is due before parking anyway.
        # A wake-up from parking has just read it (and seen POLLIN): no second read then.
        # Nothing is taken from the socket while parked, so a cancelled reader leaves no
        # partial message behind.
        ready = False
        while True:
            if not ready:
                events = getopt(_EVENTS)
                self._wake(events)  # reading it consumed the edge a parked sender awaits
                ready = bool(events & _POLLIN)
            if ready:
                try:
                    frame = recv_frame(_DONTWAIT, False)
                    break
                except zmq.Again:
                    ready = False
                    continue
            try:
                await self._park(_POLLIN, deadline)
            except TimeoutError:
                raise WaitTimeout(f"{self!r}: no message within {timeout} s") from None
            ready = True
        frames, total, overflow = [frame], 0 if n_route else len(frame), ""
        max_frames = self.limits.max_frames + 1 + n_route  # + header + routing frame
        while frame.more:
            # the rest of a multipart message has arrived with its first frame
            frame = recv_frame(_DONTWAIT, False)
            if overflow:
                continue
            total += len(frame)
            if len(frames) >= max_frames:
                overflow = (f"more than {self.limits.max_frames} buffer frames "
                            f"(Limits.max_frames)")
            elif total > self.limits.max_message_bytes:
                overflow = (f"message over the limit of {self.limits.max_message_bytes} bytes "
                            f"(Limits.max_message_bytes)")
            else:
                frames.append(frame)
        self._rearm()
        return frames, overflow

    def _refuse(self, route: Sequence[Any], body: Sequence[Any], exc: ProtocolError) -> None:
        self.refused += 1
        self.last_refusal = str(exc)
        peer = bytes(route[0]) if route else None
        if self.refused & (self.refused - 1) == 0:  # 1, 2, 4, 8...: a flood can't flood the log
            log.warning("protocol.refused", channel=repr(self), peer=peer, error=str(exc),
                        refused=self.refused)
        answer = refusal(body, exc, self.limits) if self.kind in _CAN_REPLY else None
        if answer is None:
            return
        # DONTWAIT: a peer that floods us without reading its errors loses them (EAGAIN), a
        # vanished one too (EHOSTUNREACH); neither ever blocks this loop.
        with contextlib.suppress(zmq.ZMQError):
            self._try_send([*route, *encode(answer, self.limits)])


def _send_error(channel: Channel, exc: zmq.ZMQError, peer: bytes | None) -> Exception:
    if exc.errno == zmq.EHOSTUNREACH:
        return ActorDiedError(f"{channel!r}: peer {peer!r} is not connected")
    return exc


async def _until(waitable: Awaitable[T], deadline: float | None) -> T:
    if deadline is None:
        return await waitable
    async with asyncio.timeout_at(deadline):  # cancels the wait, raises TimeoutError
        return await waitable


async def _released(tracker: zmq.MessageTracker, deadline: float | None,
                    channel: Channel) -> None:
    # The tracker's events are set from ZeroMQ's I/O thread; poll with backoff instead of
    # parking a thread per send. The delay is capped at 1 ms, which is far below the time a
    # zero-copy frame (>= 64 KiB) takes to cross a socket anyway.
    loop = asyncio.get_running_loop()
    delay = 0.0
    while not tracker.done:
        if deadline is not None and loop.time() > deadline:
            raise WaitTimeout(f"{channel!r}: zero-copy frames still in flight at the deadline")
        await asyncio.sleep(delay)
        delay = min(max(delay * 2, 5e-5), 1e-3)


def open_channel(context: zmq.asyncio.Context, kind: str, *, bind: str | None = None,
                 connect: str | Iterable[str] | None = None, limits: Limits = DEFAULT_LIMITS,
                 hwm: int = DEFAULT_HWM, identity: bytes | None = None,
                 subscribe: Iterable[bytes] = (b"",),
                 curve: CurveServer | CurveClient | None = None) -> Channel:
    """A Channel on a new ``kind`` socket (router, dealer, push, pull, pub, sub) that binds
    to ``bind`` or connects to ``connect``.

    Every socket gets linger 0, MAXMSGSIZE = limits.max_message_bytes (per frame), send
    high-water mark ``hwm``, receive high-water mark ``limits.receive_hwm(hwm)`` (at most
    ``hwm``, fewer where max-size messages would overrun max_queued_bytes), TCP keepalive,
    and ROUTER_MANDATORY on a ROUTER (a send to a vanished peer raises instead of
    vanishing) and ROUTER_HANDOVER (a peer that reconnects under its identity replaces its
    old connection). ``bind="tcp://127.0.0.1:0"`` picks a free
    port; ``channel.endpoint`` names it. ConfigError names the address that failed.

        server = open_channel(ctx, "router", bind="tcp://127.0.0.1:0")
        client = open_channel(ctx, "dealer", connect=server.endpoint)
    """
    if kind not in SOCKET_TYPES:
        raise ConfigError(f"socket kind {kind!r}: expected one of {', '.join(SOCKET_TYPES)}")
    if not isinstance(context, zmq.asyncio.Context):
        raise ConfigError(f"expected a zmq.asyncio.Context, got {type(context).__name__}")
    if (bind is None) == (connect is None):
        raise ConfigError(f"{kind} socket: give exactly one of bind= and connect=")
    sock = context.socket(SOCKET_TYPES[kind], socket_class=_Socket)
    try:
        sock.linger = 0
        sock.maxmsgsize = limits.max_message_bytes
        sock.sndhwm = hwm
        sock.rcvhwm = limits.receive_hwm(hwm)
        sock.tcp_keepalive = 1
        sock.tcp_keepalive_idle = _KEEPALIVE_IDLE
        sock.tcp_keepalive_intvl = _KEEPALIVE_INTERVAL
        sock.tcp_keepalive_cnt = _KEEPALIVE_COUNT
        if kind == "router":
            sock.router_mandatory = 1
            # A restarted actor reconnects under its old identity, possibly before the
            # dead connection is torn down: the newest connection takes the identity over.
            sock.router_handover = 1
        if identity is not None:
            sock.identity = identity
        if kind == "sub":
            for topic in subscribe:
                sock.subscribe(topic)
        if curve is not None:
            curve.configure(sock)
        if bind is not None:
            sock.bind(bind)
            endpoint = sock.last_endpoint.decode()
        else:
            addresses = [connect] if isinstance(connect, str) else list(connect or ())
            for address in addresses:
                sock.connect(address)
            endpoint = ",".join(addresses)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise ConfigError(f"{kind} socket on {bind or connect}: {exc}") from exc
    except BaseException:
        sock.close(linger=0)
        raise
    return Channel(sock, kind, limits, endpoint)
