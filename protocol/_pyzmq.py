"""Every use narun makes of pyzmq's private API, in one place, checked when it is imported.

A Channel (transport.py) does its own socket I/O, with DONTWAIT on a synchronous shadow of
its zmq.asyncio socket, and its own waiting on the socket's FD, rather than awaiting
zmq.asyncio's calls (~40 us a call, with its event handler run for every message, by
Channel.__init__'s note); a request/reply through narun still costs ~130 us of main-thread
CPU on each side (README, after bench_dp's transfer). Three things this needs are not
pyzmq's public API:

- ``send``: the Cython socket's own send, called unbound on a zmq.Socket, positionally
  (data, flags, copy). It skips zmq.Socket.send, a Python override (routing_id and group
  handling) that costs ~0.2 us a frame on pyzmq 27 and ~0.35 us on 25 here, 2-3 frames a
  message on each side. (recv and get are not overridden: Channel calls them publicly.)
- ``wake_asyncio``: where a task awaits the Channel's socket through zmq.asyncio directly,
  zmq.asyncio keeps what it waits for in ``Socket._state`` and re-reads ZMQ_EVENTS only when
  the FD fires. The FD signals edge-triggered and every call of ours can consume the edge:
  ``Socket._schedule_remaining_events()`` makes zmq.asyncio look again; without it, its
  waiter sleeps beside a message that has arrived.
- ``watch_fd``: zmq.asyncio registers the socket's FD itself with ``loop.add_reader``, and a
  loop keeps one reader per FD: the Channel watches a duplicate of the FD, so that neither
  registration replaces the other.

Verified on pyzmq 25.0.0, 25.1.2, 26.0.0, 26.4.0, 27.0.0 and 27.3.0 (tests/protocol and
tests/narun/runtime, each in its own venv). pyproject.toml pins ``SUPPORTED``, and
tests/protocol/test_pyzmq.py keeps the pin, this constant and the installed pyzmq agreeing.
"""

from __future__ import annotations

import inspect
import os

import zmq
import zmq.asyncio
from zmq.backend import Socket as _CSocket

#: The pyzmq versions narun is tested with: pyproject.toml's pin.
SUPPORTED = ">=25,<27.4"

send = _CSocket.send

_FD = int(zmq.FD)


def wake_asyncio(socket: zmq.asyncio.Socket) -> None:
    """After a call on ``socket`` outside zmq.asyncio: if zmq.asyncio waits on it, make it
    re-read ZMQ_EVENTS on the next loop iteration (the call may have consumed the FD's
    edge)."""
    if socket._state and not socket.closed:
        socket._schedule_remaining_events()


def watch_fd(socket: zmq.Socket) -> int:
    """A new duplicate of ``socket``'s FD for the caller's own ``loop.add_reader`` (the caller
    closes it). It signals as the original does: both name one open file."""
    return os.dup(socket.get(_FD))


def problems() -> list[str]:
    """What the installed pyzmq lacks, or has in another shape, of what this module uses;
    empty when all is as verified."""
    found = []
    if not (isinstance(_CSocket, type) and issubclass(zmq.Socket, _CSocket)):
        found.append(f"zmq.Socket is not a subclass of zmq.backend.Socket ({_CSocket!r})")
    else:
        params = _parameters(getattr(_CSocket, "send", None))
        if params is None:
            found.append("zmq.backend.Socket.send is missing or has no signature")
        elif [p.name for p in params[:4]] != ["self", "data", "flags", "copy"]:
            found.append(f"zmq.backend.Socket.send takes {tuple(p.name for p in params)}, "
                         "expected (self, data, flags, copy, ...)")
    asocket = zmq.asyncio.Socket
    state = getattr(asocket, "_state", None)
    if type(state) is not int:
        found.append(f"zmq.asyncio.Socket._state is {state!r}, expected an int bit mask")
    params = _parameters(getattr(asocket, "_schedule_remaining_events", None))
    if params is None:
        found.append("zmq.asyncio.Socket._schedule_remaining_events is missing or has no "
                     "signature")
    else:
        required = [p.name for p in params if p.default is p.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if required != ["self"]:
            found.append("zmq.asyncio.Socket._schedule_remaining_events requires "
                         f"{tuple(required)}, expected (self) alone")
    return found


def check() -> None:
    """Raise ImportError naming the installed pyzmq, what is wrong with it and what to do,
    unless problems() is empty."""
    found = problems()
    if found:
        raise ImportError(
            f"narun's transport cannot use the installed pyzmq {zmq.__version__}: "
            f"{'; '.join(found)}. narun supports pyzmq{SUPPORTED}: install one "
            f"(pip install 'pyzmq{SUPPORTED}'), or, to support this pyzmq, adapt "
            f"protocol/_pyzmq.py and run tests/protocol/test_pyzmq.py.",
            name=__name__)


def _parameters(fn: object) -> list[inspect.Parameter] | None:
    if not callable(fn):
        return None
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


check()
