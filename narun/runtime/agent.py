"""`narun agent`: the long-lived process on each host that starts a job's workers for the
coordinators that may ask it.

An agent is only a spawner with heartbeats (DESIGN.md 6b): supervision, restart budgets and
placement stay with the coordinator, which is why one agent can serve several jobs. It
binds one ROUTER socket. Across hosts that socket is a CURVE server whose allow-list is the
key directory's `authorized/`, so a peer without an authorised key never gets a message
to the handler (`processed` counts the ones that did). Per job it:

- starts `python -m workers ROLE` as the local launcher does (narun.runtime.launcher), in
  the job's directory under the state dir, up to `slots` processes over all jobs;
- reports each process's first stdout line (`output`) and its exit (`exited`) to the job's
  coordinator at once, and answers `stdin`, `kill` and `log_tail` for it;
- kills the job's processes when its coordinator is silent for the job's
  `runtime.heartbeat_timeout`: a coordinator that died leaves no trainer behind.

SIGTERM drains: every process is asked to leave (SIGTERM), killed after `grace` seconds,
and the agent exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import zmq.asyncio

import narun
from narun.errors import ActorDiedError, ConfigError, WaitTimeout
from narun.runtime.hosts import host_port, listen_host
from narun.runtime.jobfiles import DATA_DIR, get_chunk, put_chunk
from narun.runtime.launcher import Child, spawn
from narun.runtime.mailbox import Mailbox, ReplyError, new_id
from narun.runtime.sdnotify import Notifier
from narun.runtime.tasks import Background, Shutdown
from protocol import Message, message, open_channel, reply
from protocol.curve import Authenticator, CurveServer
from protocol.keys import NodeKeys

log = structlog.get_logger("narun.agent")

DEFAULT_PORT = 7600
HEARTBEAT_INTERVAL = 1.0  # what the agent asks of coordinators (welcome)
_JOB = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PROBE_TIMEOUT = 1.0
_DEFAULT_TIMEOUT = 10.0  # a job's heartbeat_timeout until its first spawn says it


@dataclass
class _Job:
    """One coordinator's job on this host."""

    name: str
    route: bytes  # the coordinator's connection
    directory: Path
    heartbeat_timeout: float
    seen: float  # monotonic time the coordinator was last heard from
    children: dict[int, Child] = field(default_factory=dict)  # running
    # every process of the job, exited ones too: their logs stay readable (log_tail)
    started: dict[int, Child] = field(default_factory=dict)


class Agent:
    """Serves coordinators on `listen` until SIGTERM (see the module docstring).

    `keys`: the node's key pair and the public keys it admits (protocol.keys.NodeKeys);
    None (plaintext) is allowed only on a loopback address.
    """

    def __init__(self, listen: str, keys: NodeKeys | None, slots: int,
                 state_dir: Path, grace: float = 10.0, notifier: Notifier | None = None) -> None:
        if slots < 1:
            raise ConfigError(f"--slots: expected >= 1, got {slots}")
        listen_host(listen, DEFAULT_PORT, keys is not None, "an agent",
                    "; make them with `narun keys generate DIR --name HOST` and pass --keys DIR")
        if keys is not None and not keys.authorized:
            raise ConfigError(f"--keys {keys.directory}: no coordinator is authorized, so "
                              f"none could connect; run: narun keys authorize "
                              f"{keys.directory} COORDINATOR.key")
        self.listen = listen
        self.keys = keys
        self.slots = slots
        self.state_dir = state_dir
        self.grace = grace
        self.notifier = notifier or Notifier()
        self.jobs: dict[str, _Job] = {}
        self.processed = 0  # messages that reached the handler (authorised peers only)
        self.endpoint = ""
        self._server: Mailbox | None = None
        self._shutdown = Shutdown()
        self._tasks = Background("agent", on_error=self._shutdown.fail)

    # -- lifecycle ---------------------------------------------------------------------
    async def run(self) -> int:
        context = zmq.asyncio.Context()
        self._shutdown.on_signals(asyncio.get_running_loop())
        auth = None
        try:
            curve = None
            if self.keys is not None:
                auth = Authenticator(context, self.keys.authorized.values())
                auth.start()
                curve = CurveServer(self.keys.keypair, auth)
            channel = open_channel(context, "router", bind=self.listen, curve=curve)
            self.endpoint = channel.endpoint
            self._server = Mailbox(channel, "agent", self._handle,
                                   on_error=self._shutdown.fail).start()
            self._tasks.spawn(self._watchdog(), "watchdog")
            self._tasks.spawn(self.notifier.run_watchdog(), "systemd watchdog")
            log.info("agent.listening", endpoint=self.endpoint, slots=self.slots,
                     curve=self.keys is not None, state_dir=str(self.state_dir))
            self.notifier.ready(f"serving on {self.endpoint}, {self.slots} slots")
            await self._shutdown.wait()
            self.notifier.stopping()
            log.info("agent.draining", jobs=len(self.jobs), processes=self.busy)
            await self._drain()
            # what reached the handler, and what CURVE turned away before it could
            log.info("agent.stopped", processed=self.processed,
                     denied=auth.denied if auth is not None else 0)
            return 0
        finally:
            self._tasks.cancel()
            for job in list(self.jobs.values()):
                for child in job.children.values():
                    child.kill()
            if self._server is not None:
                self._server.close()
            if auth is not None:
                auth.stop()
            context.destroy(linger=0)
            self.notifier.close()

    def stop(self) -> None:
        """Drain and return from run (what SIGTERM does)."""
        self._shutdown.stop()

    @property
    def busy(self) -> int:
        """Processes running now, over all jobs."""
        return sum(len(job.children) for job in self.jobs.values())

    async def _drain(self) -> None:
        children = [c for job in self.jobs.values() for c in job.children.values()]
        for child in children:
            child.kill(signal.SIGTERM)  # a worker's SIGTERM: finish the step and leave
        await asyncio.gather(*(c.stop(self.grace) for c in children), return_exceptions=True)

    # -- requests ----------------------------------------------------------------------
    async def _handle(self, msg: Message, route: bytes | None) -> Message | None:
        assert route is not None
        self.processed += 1
        now = time.monotonic()
        for job in self.jobs.values():
            if job.route == route:
                job.seen = now
        if msg.type == "hello":
            if msg["role"] != "coordinator":
                raise ReplyError("unsupported", f"an agent serves coordinators, not "
                                                f"{msg['role']!r}")
            return reply(msg, "welcome", role="agent", software=narun.__version__,
                         heartbeat_interval=HEARTBEAT_INTERVAL)
        if msg.type == "heartbeat":
            return reply(msg, "heartbeat", role="agent", rank=0, step=-1, time=time.time())
        if msg.type == "probe":
            return await self._probe(msg)
        if msg.type == "spawn":
            return await self._spawn(msg, route)
        if msg.type in ("file_put", "file_get"):
            return await self._file(msg, route)
        if msg.type not in ("stdin", "kill", "log_tail"):
            raise ReplyError("unsupported", f"an agent does not handle {msg.type!r}")
        child = self._child(msg["job"], msg["pid"], route)
        if msg.type == "log_tail":
            lines = max(1, min(msg["lines"], 1000))
            text = await asyncio.to_thread(child.log_tail, lines)
            return reply(msg, "log_tail", job=msg["job"], pid=msg["pid"], lines=lines,
                         text=text)
        if child.pid not in self.jobs[msg["job"]].children:
            raise ReplyError("not_found", f"process {child.pid} of job {msg['job']!r} has "
                                          f"exited")
        if msg.type == "stdin":
            await child.write_line(msg["line"].encode() + b"\n")
            return reply(msg, "stdin", job=msg["job"], pid=msg["pid"], line=msg["line"])
        child.kill(msg["signal"])
        return reply(msg, "kill", job=msg["job"], pid=msg["pid"], signal=msg["signal"])

    async def _file(self, msg: Message, route: bytes) -> Message:
        job = self._job(msg["job"], route)
        if msg.type == "file_put":
            size = await asyncio.to_thread(put_chunk, job.directory, msg["path"],
                                           msg["offset"], msg.get("data"),
                                           bool(msg.get("last")))
            return reply(msg, "file_put", job=job.name, path=msg["path"], offset=size)
        data, eof = await asyncio.to_thread(get_chunk, job.directory, msg["path"],
                                            msg["offset"], msg["size"],
                                            bool(msg.get("remove")))
        return reply(msg, "file_get", job=job.name, path=msg["path"], offset=msg["offset"],
                     size=msg["size"], data=data, eof=eof)

    def _job(self, name: str, route: bytes) -> _Job:
        """The job `name` of the coordinator at `route`, started by its first file or
        process."""
        if not _JOB.fullmatch(name):
            raise ReplyError("protocol", f"job {name!r} is not a job name (letters, digits, "
                                         f"'.', '_', '-')")
        job = self.jobs.get(name)
        if job is None:
            job = _Job(name, route, self.state_dir / "jobs" / name, _DEFAULT_TIMEOUT,
                       time.monotonic())
            self.jobs[name] = job
        elif job.route != route:
            job.route = route  # its coordinator reconnected (a new connection)
        return job

    def _child(self, job_name: str, pid: int, route: bytes) -> Child:
        job = self.jobs.get(job_name)
        child = job.started.get(pid) if job is not None and job.route == route else None
        if child is None:
            raise ReplyError("not_found", f"no process {pid} of job {job_name!r} here")
        return child

    async def _probe(self, msg: Message) -> Message:
        address = msg["address"]
        free = self.slots - self.busy
        try:
            host, port = host_port(address, DEFAULT_PORT, "probe.address")
            async with asyncio.timeout(_PROBE_TIMEOUT):
                _, writer = await asyncio.open_connection(host, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        except (OSError, TimeoutError, ValueError) as exc:
            why = ("timed out" if isinstance(exc, TimeoutError) else
                   os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else
                   str(exc))
            return reply(msg, "probe", address=address, ok=False, message=str(why),
                         slots=free)
        return reply(msg, "probe", address=address, ok=True, message="", slots=free)

    async def _spawn(self, msg: Message, route: bytes) -> Message:
        name = msg["job"]
        if self._shutdown.requested:
            raise ReplyError("busy", "this agent is draining (SIGTERM) and starts nothing "
                                     "more; place the process on another host")
        if self.busy >= self.slots:
            raise ReplyError("busy", f"all {self.slots} slots of this agent are taken "
                                     f"(--slots); free one or add a host")
        job = self._job(name, route)
        job.heartbeat_timeout = _heartbeat_timeout(msg["spec"])
        spec_path = await asyncio.to_thread(
            _write_private, job.directory / "specs" /
            f"{msg['role']}-{msg['rank']}.{msg['incarnation']}.json", msg["spec"])
        child = await spawn(msg["role"], msg["rank"], f"@{spec_path}", job.directory / "logs",
                            blas_threads=msg["blas_threads"], incarnation=msg["incarnation"],
                            cwd=job.directory)
        job.children[child.pid] = child
        job.started[child.pid] = child
        log.info("agent.spawned", job=name, role=child.role, rank=child.rank, pid=child.pid)
        self._tasks.spawn(self._follow(job, child), f"{name}: {child.name} (pid {child.pid})")
        return reply(msg, "spawned", job=name, pid=child.pid, log=str(child.log_path))

    async def _follow(self, job: _Job, child: Child) -> None:
        """Report the child's first stdout line and its exit to the job's coordinator."""
        if child.proc.stdout is not None:
            line = await child.proc.stdout.readline()
            if line:
                await self._tell(job, message("output", new_id(), job=job.name,
                                              pid=child.pid, line=line.decode().rstrip()))
                await child.forward_stdout()
        code = await child.wait()
        job.children.pop(child.pid, None)
        log.info("agent.exited", job=job.name, role=child.role, rank=child.rank,
                 pid=child.pid, code=code)
        await self._tell(job, message("exited", new_id(), job=job.name, pid=child.pid,
                                      code=code))

    async def _tell(self, job: _Job, msg: Message) -> None:
        assert self._server is not None
        # The coordinator may be gone (its connection is then unroutable): the watchdog
        # will notice its silence and clean up.
        with contextlib.suppress(ActorDiedError, WaitTimeout):
            await self._server.send(msg, to=job.route, timeout=1.0)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for job in list(self.jobs.values()):
                silent = now - job.seen
                if silent > job.heartbeat_timeout and not job.children:
                    # its coordinator is gone, and so are its processes: keep their logs,
                    # drop the state they started from and slices nobody gathered
                    del self.jobs[job.name]
                    for bulky in (DATA_DIR, ".shards"):
                        self._tasks.spawn(asyncio.to_thread(
                            shutil.rmtree, job.directory / bulky, True), f"clean {job.name}")
                elif silent > job.heartbeat_timeout:
                    log.warning("agent.coordinator_silent", job=job.name,
                                silent=round(silent, 1), timeout=job.heartbeat_timeout,
                                killing=sorted(job.children))
                    for child in job.children.values():
                        child.kill()
                    job.seen = now  # once; the exits are reported as they are reaped


def _write_private(path: Path, text: str) -> Path:
    """Write a spec only its owner can read: it may hold the job's CURVE secret."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _heartbeat_timeout(spec_json: str) -> float:
    """The job's runtime.heartbeat_timeout, from the spec it sends with each spawn."""
    try:
        value = json.loads(spec_json)["config"]["runtime"]["heartbeat_timeout"]
        return float(value) if float(value) > 0 else 10.0
    except (ValueError, KeyError, TypeError):
        raise ReplyError("protocol", "spawn.spec: not a worker spec (no "
                                     "config.runtime.heartbeat_timeout)") from None


def run_agent(agent: Agent) -> int:
    import uvloop

    return uvloop.run(agent.run())

