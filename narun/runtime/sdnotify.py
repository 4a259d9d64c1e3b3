"""Telling systemd how a service is doing (sd_notify), without libsystemd.

A service started with `Type=notify` is "starting" until it sends `READY=1`, and with
`WatchdogSec=` it must send `WATCHDOG=1` more often than that or systemd kills and restarts
it. The protocol is one datagram of `KEY=value` lines to the AF_UNIX socket named by
$NOTIFY_SOCKET (a path, or an abstract socket when it starts with '@').

The watchdog pings come from the event loop itself (`run_watchdog` is a coroutine), never
from a thread: a loop that is stuck stops pinging, which is exactly what the watchdog is for.

What a service can rely on:
- Without $NOTIFY_SOCKET (not under systemd, or in a test) every method does nothing.
- A failure to send (the socket is gone, systemd is not reading) is logged once and never
  raised: losing a status line must not take the service down.
- The watchdog is ours only when $WATCHDOG_USEC is set and $WATCHDOG_PID, if set, is our
  pid; otherwise `run_watchdog` returns at once.
- By default the Notifier removes $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID from
  the environment it read, so processes started afterwards (workers started from
  os.environ) do not inherit them and never talk to systemd as if they were the service.

    notifier = Notifier()
    await listening()                       # sockets bound, keys loaded
    notifier.ready(status="listening on tcp://0.0.0.0:7600")
    tasks.spawn(notifier.run_watchdog(), "sd watchdog")
    ...
    notifier.stopping()                     # on SIGTERM, before draining
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import MutableMapping

import structlog

log = structlog.get_logger("narun.runtime")

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """The sd_notify client of one service process.

    `environ`: where to read $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID (default
    os.environ); with `unset_environment` (the default) they are removed from it once read.
    """

    def __init__(self, environ: MutableMapping[str, str] | None = None, *,
                 unset_environment: bool = True) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env) if self.address else None
        if unset_environment:
            for name in NOTIFY_VARIABLES:
                env.pop(name, None)
        self._socket: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        """Whether a notify socket was given (the process runs under systemd)."""
        return self.address is not None

    def ready(self, status: str | None = None) -> None:
        """The service is up: systemd finishes starting it and starts what waits on it."""
        self._send("READY=1", *_status_line(status))

    def status(self, text: str) -> None:
        """A one-line status that `systemctl status` shows."""
        self._send(*_status_line(text))

    def stopping(self, status: str | None = None) -> None:
        """The service is shutting down (draining) of its own accord or on SIGTERM."""
        self._send("STOPPING=1", *_status_line(status))

    def watchdog(self) -> None:
        """One watchdog ping; `run_watchdog` sends them on schedule."""
        self._send("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """Ping the watchdog every half of WatchdogSec until cancelled (returns at once when
        the watchdog is off or not ours). Run it as a task on the service's own loop."""
        if self.watchdog_interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, *lines: str) -> None:
        if self.address is None:
            return
        try:
            if self._socket is None:
                # Non-blocking: a full queue must not stall the event loop. PID 1 reads its
                # notify socket promptly (and sizes its queue for bursts), so a send that
                # would block means systemd is wedged, and the datagram is dropped.
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.warning("sdnotify.send_failed", socket=_shown(self.address),
                            message=lines[0], error=str(e))


def _address(value: str) -> str | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value:
        log.warning("sdnotify.unsupported_socket", socket=value,
                    hint="expected an absolute path or '@name'; notifications are off")
    return None


def _watchdog_interval(env: MutableMapping[str, str]) -> float | None:
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (our parent, which passed its env on)
    try:
        value = int(usec)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning("sdnotify.bad_watchdog_usec", value=usec, hint="watchdog pings are off")
        return None
    return value / 2e6


def _status_line(text: str | None) -> tuple[str, ...]:
    # A newline would start a new KEY=value assignment in the datagram.
    return () if text is None else ("STATUS=" + " ".join(text.splitlines()),)


def _shown(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address
