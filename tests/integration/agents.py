"""Agents for tests: `narun agent` as a real process (on loopback, or inside a network
namespace), or an Agent object on a thread of this process when a test reads its counters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from narun.runtime.agent import Agent
from narun.runtime.sdnotify import Notifier
from protocol.keys import generate_keypair


class AgentProcess:
    """`narun agent` started with `prefix` (e.g. `ip netns exec NS`), its log in `log`."""

    def __init__(self, listen: str, state_dir: Path, slots: int = 4, keys: Path | None = None,
                 prefix: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 grace: float = 5.0) -> None:
        self.log = state_dir.with_suffix(".log")
        state_dir.mkdir(parents=True, exist_ok=True)
        argv = [*prefix, sys.executable, "-m", "narun.cli", "--log-json", "agent",
                "--listen", listen, "--state-dir", str(state_dir), "--slots", str(slots),
                "--grace", str(grace)]
        if keys is not None:
            argv += ["--keys", str(keys)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stderr=log, stdout=subprocess.DEVNULL,
                                         env={**os.environ, **(env or {})})
        self.endpoint = self._wait_listening()

    def _wait_listening(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text(errors="replace").splitlines():
                if '"agent.listening"' in line:
                    return str(json.loads(line)["endpoint"])
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"agent did not listen within {timeout} s: {self.log.read_text()}")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()
            raise


@contextlib.contextmanager
def agent_thread(state_dir: Path, keys=None, slots: int = 4) -> Iterator[Agent]:
    """An Agent on loopback, on a thread of this process (its counters readable;
    `agent.stop_threadsafe()` is its SIGTERM)."""
    agent = Agent("tcp://127.0.0.1:0", keys, slots, state_dir, grace=2.0,
                  notifier=Notifier({}, unset_environment=False))
    loop = asyncio.new_event_loop()
    agent.stop_threadsafe = lambda: loop.call_soon_threadsafe(agent.stop)  # type: ignore
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(loop.run_until_complete(
        agent.run())), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not agent.endpoint and time.monotonic() < deadline:
        time.sleep(0.02)
    assert agent.endpoint, "the agent did not start"
    try:
        yield agent
    finally:
        loop.call_soon_threadsafe(agent.stop)
        thread.join(30)
        loop.close()
        assert result == [0], result


def make_keys(root: Path, agents: list[str]) -> Path:
    """A coordinator key dir at root/coordinator and one per agent at root/NAME: each agent
    admits the coordinator; the coordinator knows each agent's key under its name."""
    from protocol.keys import authorize

    coordinator = root / "coordinator"
    generate_keypair(coordinator, "coordinator")
    for name in agents:
        generate_keypair(root / name, name)
        authorize(root / name, coordinator / "coordinator.key")
        authorize(coordinator, root / name / f"{name}.key", name=name)
    return coordinator
