"""sd_notify: what systemd would receive on its notify socket, received here by a fake one."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from narun.runtime.sdnotify import Notifier

pytestmark = pytest.mark.timeout(10)


class FakeSystemd:
    """An AF_UNIX datagram socket read by a thread, so that it keeps receiving while the
    event loop under test is blocked, and never lets the kernel's small default queue
    (net.unix.max_dgram_qlen, 10) fill and drop pings."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def received(self, wait_for: int = 0, timeout: float = 2.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < wait_for and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.messages)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path):
    fake = FakeSystemd(str(tmp_path / "notify"))
    yield fake
    fake.close()


def env_for(fake: FakeSystemd, **extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": fake.sock.getsockname(), "PATH": "/usr/bin", **extra}


def test_ready_status_and_stopping_arrive_as_systemd_expects_them(systemd: FakeSystemd):
    notifier = Notifier(env_for(systemd))
    notifier.ready(status="listening on tcp://0.0.0.0:7600")
    notifier.status("2 jobs running\nstep 40")
    notifier.stopping()
    notifier.close()
    assert systemd.received(wait_for=3) == [
        "READY=1\nSTATUS=listening on tcp://0.0.0.0:7600",
        "STATUS=2 jobs running step 40",  # a newline would start another assignment
        "STOPPING=1",
    ]


def test_the_notify_variables_are_removed_so_children_do_not_inherit_them(
        systemd: FakeSystemd):
    env = env_for(systemd, WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid()))
    notifier = Notifier(env)
    assert env == {"PATH": "/usr/bin"}
    assert notifier.enabled and notifier.watchdog_interval == 15.0

    kept = env_for(systemd)
    Notifier(kept, unset_environment=False)
    assert kept["NOTIFY_SOCKET"] == systemd.sock.getsockname()


async def test_the_watchdog_pings_every_half_watchdog_usec(systemd: FakeSystemd):
    notifier = Notifier(env_for(systemd, WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid())))
    assert notifier.watchdog_interval == pytest.approx(0.1)
    task = asyncio.create_task(notifier.run_watchdog())
    await asyncio.sleep(1.0)
    task.cancel()
    notifier.close()
    pings = systemd.received(wait_for=5)
    assert set(pings) == {"WATCHDOG=1"}
    # About 10 in a second; loose bounds, since a loaded machine delays the loop.
    assert 5 <= len(pings) <= 12


async def test_a_blocked_loop_stops_the_pings_while_it_blocks(systemd: FakeSystemd):
    notifier = Notifier(env_for(systemd, WATCHDOG_USEC="100000"))  # no WATCHDOG_PID: ours
    task = asyncio.create_task(notifier.run_watchdog())
    await asyncio.sleep(0.3)
    notifier.status("blocking")
    time.sleep(0.5)  # the loop is stuck: a pinger in a thread would send ~10 meanwhile
    notifier.status("unblocked")
    await asyncio.sleep(0.3)
    task.cancel()
    notifier.close()
    messages = systemd.received(wait_for=6)
    start, end = messages.index("STATUS=blocking"), messages.index("STATUS=unblocked")
    assert messages[start + 1:end] == []
    assert messages[:start].count("WATCHDOG=1") >= 2
    assert messages[end + 1:].count("WATCHDOG=1") >= 2


async def test_no_pings_when_the_watchdog_belongs_to_another_process(systemd: FakeSystemd):
    notifier = Notifier(env_for(systemd, WATCHDOG_USEC="100000", WATCHDOG_PID="1"))
    assert notifier.watchdog_interval is None
    await asyncio.wait_for(notifier.run_watchdog(), 1.0)  # returns at once
    notifier.ready()
    notifier.close()
    assert systemd.received(wait_for=1) == ["READY=1"]


async def test_a_bad_watchdog_usec_turns_the_watchdog_off_with_a_warning(
        systemd: FakeSystemd):
    with capture_logs() as logs:
        notifier = Notifier(env_for(systemd, WATCHDOG_USEC="30s"))
    assert notifier.watchdog_interval is None
    assert [(e["event"], e["value"]) for e in logs] == [("sdnotify.bad_watchdog_usec", "30s")]


def test_an_abstract_socket_name_starting_with_at_works():
    name = f"narun-test-{uuid.uuid4().hex}"
    fake = FakeSystemd("\0" + name)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready()
        notifier.close()
        assert fake.received(wait_for=1) == ["READY=1"]
    finally:
        fake.close()


async def test_without_notify_socket_everything_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    notifier = Notifier()
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready(status="up")
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    await asyncio.wait_for(notifier.run_watchdog(), 1.0)
    assert notifier._socket is None  # not even a socket was opened


def test_a_socket_that_went_away_is_logged_once_and_never_raises(tmp_path: Path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with capture_logs() as logs:
        notifier.ready()
        notifier.watchdog()
        notifier.stopping()
    notifier.close()
    assert [(e["event"], e["message"]) for e in logs] == [("sdnotify.send_failed", "READY=1")]
    assert logs[0]["socket"] == str(tmp_path / "gone")


def test_an_unsupported_socket_address_turns_notifications_off():
    with capture_logs() as logs:
        notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    notifier.ready()
    assert [e["event"] for e in logs] == ["sdnotify.unsupported_socket"]
