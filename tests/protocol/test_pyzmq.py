"""protocol/_pyzmq.py: the pyzmq internals narun uses are there in the installed pyzmq, the
installed pyzmq lies in the range pyproject.toml pins, an incompatible one fails the import
with an error that says what to do, and zmq.asyncio waiting on a Channel's own socket is
still woken after the Channel's calls consume the FD's edge."""

from __future__ import annotations

import asyncio
import importlib.util
import time
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
import zmq
import zmq.asyncio
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from protocol import _pyzmq, decode, message, open_channel

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def pinned_pyzmq() -> SpecifierSet:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (pin,) = [Requirement(d) for d in deps if Requirement(d).name == "pyzmq"]
    return pin.specifier


def import_afresh() -> ModuleType:
    """Run protocol/_pyzmq.py as a new module, as its first import does (the imported one
    stays untouched)."""
    spec = importlib.util.spec_from_file_location("_pyzmq_afresh", _pyzmq.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_installed_pyzmq_has_everything_narun_uses() -> None:
    assert _pyzmq.problems() == []
    import_afresh()


def test_the_installed_pyzmq_lies_in_the_range_pyproject_pins() -> None:
    pin = pinned_pyzmq()
    assert pin == SpecifierSet(_pyzmq.SUPPORTED), "pyproject.toml and _pyzmq.SUPPORTED differ"
    assert Version(zmq.__version__) in pin, (
        f"pyzmq {zmq.__version__} is installed, outside the pinned pyzmq{pin}: test it "
        f"(tests/protocol, tests/narun/runtime) and widen the pin, or install one inside")


def _remove(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
    owner = next(c for c in cls.__mro__ if name in vars(c))  # inherited from pyzmq's _future
    monkeypatch.delattr(owner, name)


def _backend(monkeypatch: pytest.MonkeyPatch, **methods: object) -> None:
    """Make zmq.backend.Socket (and zmq.Socket above it) a socket class whose methods are
    ``methods``, as another pyzmq's could be."""
    backend = type("Socket", (_pyzmq._CSocket,), methods)
    monkeypatch.setattr(zmq.backend, "Socket", backend)
    monkeypatch.setattr(zmq, "Socket", type("Socket", (backend,), {}))


def _sends_flags_last(self: object, data: object, copy: bool = True, flags: int = 0) -> None:
    """send with its parameters in another order than the Cython socket's."""


@pytest.mark.parametrize(("breakage", "named"), [
    (lambda mp: _remove(mp, zmq.asyncio.Socket, "_schedule_remaining_events"),
     "zmq.asyncio.Socket._schedule_remaining_events is missing"),
    (lambda mp: _remove(mp, zmq.asyncio.Socket, "_state"), "zmq.asyncio.Socket._state is None"),
    (lambda mp: mp.setattr(zmq.asyncio.Socket, "_state", frozenset()),
     "zmq.asyncio.Socket._state is frozenset()"),
    (lambda mp: mp.setattr(zmq.asyncio.Socket, "_schedule_remaining_events",
                           lambda self, events: None),
     "_schedule_remaining_events requires ('self', 'events')"),
    (lambda mp: _backend(mp, send=_sends_flags_last),
     "zmq.backend.Socket.send takes ('self', 'data', 'copy', 'flags')"),
    (lambda mp: _backend(mp, send=None), "zmq.backend.Socket.send is missing"),
    (lambda mp: mp.setattr(zmq, "Socket", type("Socket", (), {})),
     "zmq.Socket is not a subclass of zmq.backend.Socket"),
], ids=["no-schedule", "no-state", "state-not-int", "schedule-needs-events",
        "send-reordered", "no-send", "sugar-not-backend"])
def test_an_incompatible_pyzmq_fails_the_import_saying_what_to_do(monkeypatch, breakage,
                                                                   named) -> None:
    breakage(monkeypatch)
    with pytest.raises(ImportError) as caught:
        import_afresh()
    text = str(caught.value)
    assert named in text
    assert f"installed pyzmq {zmq.__version__}" in text
    assert f"pip install 'pyzmq{_pyzmq.SUPPORTED}'" in text
    assert "protocol/_pyzmq.py" in text


def beat(i: int) -> object:
    return message("heartbeat", i, role="trainer", rank=0, step=i, time=0.0)


@pytest.mark.timeout(30)
async def test_zmq_asyncio_awaiting_a_channels_socket_wakes_after_the_channels_calls(
        ctx) -> None:
    # zmq.asyncio waits on the socket itself; a message arrives while the loop does not look
    # at the FD, then the Channel's send processes ZeroMQ's commands, clearing the FD. Only
    # wake_asyncio (_state, _schedule_remaining_events) tells zmq.asyncio to look again.
    server = open_channel(ctx, "router", bind="tcp://127.0.0.1:0")
    client = open_channel(ctx, "dealer", connect=server.endpoint)
    try:
        await client.send(beat(0))
        route = (await server.recv(timeout=5)).route
        for i in range(10):
            waiting = asyncio.ensure_future(client.socket.recv_multipart())
            await asyncio.sleep(0.01)  # zmq.asyncio parks
            await server.send(beat(i), to=route)
            time.sleep(0.05)  # noqa: ASYNC251 - the loop must not look at the FD meanwhile
            await client.send(beat(1000 + i))  # clears the FD
            assert decode(await asyncio.wait_for(waiting, 2)).id == i
            assert (await server.recv(timeout=5)).msg.id == 1000 + i
    finally:
        server.close()
        client.close()
