"""Starting job processes on this host: `python -m workers ROLE`, never a fork.

Each child gets its BLAS thread count in its environment (so co-located workers do not
oversubscribe the cores), its stderr in a log file (whose tail goes into the error when it
dies), and PR_SET_PDEATHSIG against its parent. Every child is registered until reaped; an
atexit hook kills and reaps whatever is left, so no path out of the coordinator (an
exception, SIGTERM turned into SystemExit) leaves a process behind.
"""

from __future__ import annotations

import abc
import asyncio
import atexit
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from narun._process import blas_env
from narun.errors import ActorDiedError, WaitTimeout
from narun.runtime.supervision import HOST

if TYPE_CHECKING:
    from narun.runtime.spec import WorkerSpec

_LIVE: dict[int, asyncio.subprocess.Process] = {}


class Worker(abc.ABC):
    """What the coordinator knows of one started worker process, wherever it runs: a
    `Child` of this process, or one an agent started on another host
    (narun.runtime.agents.RemoteChild). Both offer the same calls."""

    role: str
    rank: int
    pid: int
    host: str
    log_path: str | Path

    @property
    def name(self) -> str:
        return f"{self.role} {self.rank}"

    @property
    def identity(self) -> bytes:
        return f"{self.role}-{self.rank}".encode()

    @abc.abstractmethod
    def log_tail(self, lines: int = 15) -> str:
        """The last lines of its log (stderr, and stdout after the endpoint line)."""

    @abc.abstractmethod
    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send it `sig` now (no wait)."""

    @abc.abstractmethod
    async def read_endpoint(self, timeout: float) -> str:
        """The endpoint a shard reports as its first stdout line."""

    @abc.abstractmethod
    async def forward_stdout(self) -> None:
        """Keep its stdout flowing into its log until it exits."""

    @abc.abstractmethod
    async def write_line(self, line: bytes) -> None:
        """One line to its stdin (trainers read the shards' endpoints so)."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """Its exit status (minus the signal that killed it), once it has exited."""

    @abc.abstractmethod
    async def stop(self, grace: float) -> int:
        """Wait up to `grace` seconds for it to exit, then kill it; its exit status."""

    def how_it_died(self, code: int | None) -> str:
        return f"was killed by signal {-code}" if code is not None and code < 0 else \
            f"exited with status {code}"

    def died_message(self, code: int | None, step: int | None = None) -> str:
        at = "" if step is None else f" at step {step}"
        where = "" if self.host == HOST else f" on {self.host}"
        tail = self.log_tail()
        return (f"{self.name} (pid {self.pid}{where}) {self.how_it_died(code)}{at}; its log "
                f"is {self.log_path}" + (f":\n{tail}" if tail else ""))


def read_tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def endpoint_of(name: str, line: str | bytes) -> str:
    """The endpoint in a shard's first stdout line, `{"endpoint": ...}`; ActorDiedError
    quoting the line when it is something else."""
    try:
        return str(json.loads(line)["endpoint"])
    except (ValueError, KeyError, TypeError):
        raise ActorDiedError(f"{name} wrote {line[:200]!r} instead of its endpoint") from None


class Child(Worker):
    """One worker process started here."""

    def __init__(self, role: str, rank: int, proc: asyncio.subprocess.Process,
                 log_path: Path) -> None:
        self.role = role
        self.rank = rank
        self.proc = proc
        self.log_path = log_path
        self.pid = proc.pid
        self.host = HOST

    def log_tail(self, lines: int = 15) -> str:
        return read_tail(self.log_path, lines)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    async def read_endpoint(self, timeout: float) -> str:
        """The endpoint a shard prints as its first stdout line (JSON {"endpoint": ...})."""
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise WaitTimeout(f"{self.name} did not report its endpoint within {timeout:g} s; "
                              f"log {self.log_path}") from None
        if not line:
            code = await self.proc.wait()
            raise ActorDiedError(self.died_message(code))
        return endpoint_of(self.name, line)

    async def forward_stdout(self) -> None:
        """Copy what the child writes to stdout after its endpoint line into its log, until
        it exits: a pipe nobody reads fills (64 KiB), and a chatty child would block."""
        assert self.proc.stdout is not None
        with open(self.log_path, "ab") as log:
            while chunk := await self.proc.stdout.read(1 << 16):
                log.write(chunk)
                log.flush()

    async def write_line(self, line: bytes) -> None:
        """Send one line to the child's stdin (trainers read the shard endpoints so)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line)
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError, RuntimeError):  # RuntimeError: uvloop's
            raise ActorDiedError(self.died_message(await self.proc.wait())) from None  # closed pipe

    async def wait(self) -> int:
        """The exit status, once the process has exited (reaped)."""
        code = await self.proc.wait()
        _LIVE.pop(self.pid, None)
        return code

    async def stop(self, grace: float) -> int:
        """Wait up to `grace` seconds for the process to exit, then SIGKILL; reap it."""
        try:
            return await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            return await self.proc.wait()
        finally:
            _LIVE.pop(self.pid, None)


async def spawn(role: str, rank: int, spec_json: str, log_dir: Path,
                blas_threads: int = 1, incarnation: int = 0, cwd: Path | None = None) -> Child:
    """Start `python -m workers ROLE --rank RANK --spec SPEC` with its stderr in log_dir
    (ROLE-RANK.log; a restarted one's in ROLE-RANK.N.log, keeping its predecessor's)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    suffix = f".{incarnation}" if incarnation else ""
    log_path = log_dir / f"{role}-{rank}{suffix}.log"
    env = {**os.environ, **blas_env(blas_threads)}
    # systemd's variables are the service's own: a worker must not notify in its name
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    root = str(Path(__file__).resolve().parents[2])  # so `workers` imports from this tree
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "workers", role, "--rank", str(rank), "--spec", spec_json,
            "--parent", str(os.getpid()),
            # a shard or stage prints its endpoint; a trainer or stage reads its peers'
            stdin=asyncio.subprocess.PIPE if role in ("trainer", "stage")
            else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if role in ("ps", "stage")
            else asyncio.subprocess.DEVNULL,
            stderr=log, env=env, cwd=cwd, start_new_session=False)
    _LIVE[proc.pid] = proc
    return Child(role, rank, proc, log_path)


class LocalProcesses:
    """Where a job's processes run by default (`narun train`): children of this process,
    on loopback, in plaintext. narun.runtime.agents.AgentProcesses is the same interface
    across hosts."""

    job_keys = None  # one host: no CURVE

    def listen_address(self, host: str, port: int) -> str:
        return f"tcp://{host}:{port}"

    async def open(self, context: Any, endpoint: str, roles: Sequence[tuple[str, int]],
                   rt: Any) -> None:
        """Nothing to connect to or place: every process runs here."""

    async def spawn(self, role: str, rank: int, spec: WorkerSpec, incarnation: int,
                    log_dir: Path, blas_threads: int = 1) -> Worker:
        return await spawn(role, rank, spec.to_json(), log_dir, blas_threads, incarnation)

    def checkpoint_path(self, child: Worker, staging: Path) -> str:
        """Where a shard writes its checkpoint slice: the staging directory itself."""
        return str(staging.resolve())

    async def collect(self, child: Worker, path: str, staging: Path) -> Path:
        """The slice is already where the checkpoint is assembled."""
        return Path(path)

    async def close(self) -> None:
        """Children are stopped by the coordinator; nothing else is held."""


def live_pids() -> list[int]:
    """Pids started here and not reaped yet."""
    return list(_LIVE)


@atexit.register
def _kill_leftovers() -> None:
    for pid in list(_LIVE):
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        _LIVE.pop(pid, None)
