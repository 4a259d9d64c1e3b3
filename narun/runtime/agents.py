"""Running a job's processes through agents on other hosts (`narun launch`).

`AgentProcesses` is the coordinator's spawner across hosts, the counterpart of
`LocalProcesses` (narun.runtime.processes): it connects to each host's agent over CURVE,
checks before anything starts that every agent answers and can reach the coordinator,
places the processes over the hosts' slots, and starts each one through its host's agent.
A `RemoteChild` stands for one such process and offers what a local `Child` offers.

A host whose agent stops answering heartbeats for `runtime.heartbeat_timeout`, or whose
connection drops, is lost: a `host_lost` event names it, each of its processes counts as
killed (so the coordinator's usual supervision restarts them, within the one job-wide
budget), and replacements are placed on the remaining hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import zmq.asyncio

import narun
from narun.errors import ActorDiedError, ConfigError, NarunError, Refused, WaitTimeout
from narun.runtime.hosts import Host, is_loopback, place, route_to
from narun.runtime.jobfiles import CHUNK, DATA_DIR, fetch_file
from narun.runtime.jobkeys import JobKeys
from narun.runtime.launcher import Worker, endpoint_of
from narun.runtime.mailbox import Mailbox, ReplyError, new_id
from narun.runtime.spec import WorkerSpec
from narun.runtime.tasks import Background
from protocol import Message, message, open_channel
from protocol.curve import CurveClient
from protocol.keys import NodeKeys

log = structlog.get_logger("narun.runtime")

CONNECT_TIMEOUT = 5.0  # seconds an agent gets to answer hello and the probe


class HostLost(NarunError):
    """An agent stopped answering: its host and the job's processes there are gone."""


class RemoteChild(Worker):
    """One process an agent started for this job."""

    def __init__(self, link: AgentLink, role: str, rank: int, pid: int, log_path: str) -> None:
        self.link = link
        self.role, self.rank, self.pid = role, rank, pid
        self.host = str(link.host)
        self.log_path = log_path
        loop = asyncio.get_running_loop()
        self.exit: asyncio.Future[int] = loop.create_future()
        self.endpoint: asyncio.Future[str] = loop.create_future()
        self.tail = ""  # the log's last lines, fetched when it exits
        self.lost_reason: str | None = None

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.tail.splitlines()[-lines:])

    def how_it_died(self, code: int | None) -> str:
        return self.lost_reason or super().how_it_died(code)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if not self.exit.done():
            self.link.tasks.spawn(self._kill(sig), f"kill {self.name} (pid {self.pid})")

    async def _kill(self, sig: int) -> None:
        with contextlib.suppress(ActorDiedError, WaitTimeout, ReplyError, NarunError):
            await self.link.call("kill", f"signal {sig} to {self.name}", pid=self.pid,
                                 signal=int(sig))

    async def read_endpoint(self, timeout: float) -> str:
        await asyncio.wait([self.endpoint, self.exit], timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        if self.endpoint.done():
            return endpoint_of(self.name, self.endpoint.result())
        if self.exit.done():
            raise ActorDiedError(self.died_message(self.exit.result()))
        raise WaitTimeout(f"{self.name} on {self.host} did not report its endpoint within "
                          f"{timeout:g} s; log {self.log_path} there")

    async def forward_stdout(self) -> None:
        """The agent keeps the process's stdout in its log on its host."""

    async def write_line(self, line: bytes) -> None:
        try:
            await self.link.call("stdin", f"a line to {self.name}", pid=self.pid,
                                 line=line.decode().rstrip("\n"))
        except (ActorDiedError, WaitTimeout, NarunError):
            raise ActorDiedError(self.died_message(await self.wait())) from None

    async def wait(self) -> int:
        return await asyncio.shield(self.exit)

    async def stop(self, grace: float) -> int:
        try:
            return await asyncio.wait_for(asyncio.shield(self.exit), grace)
        except TimeoutError:
            self.kill()
        try:  # a lost host resolves every exit, so this wait is bounded too
            return await asyncio.wait_for(asyncio.shield(self.exit), grace + 5.0)
        except TimeoutError:
            self.gone("did not exit after SIGKILL (its agent does not answer)")
            return self.exit.result()

    def gone(self, reason: str) -> None:
        """The process is beyond reach (its host is lost): count it killed, for `reason`."""
        if not self.exit.done():
            self.lost_reason = reason
            self.exit.set_result(-signal.SIGKILL)


class AgentLink:
    """The coordinator's connection to one host's agent, for one job."""

    def __init__(self, host: Host, job: str, context: zmq.asyncio.Context,
                 curve: CurveClient | None, heartbeat_interval: float, heartbeat_timeout: float,
                 on_lost: Callable[[AgentLink, str], None]) -> None:
        self.host = host
        self.job = job
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.children: dict[int, RemoteChild] = {}
        self._early: dict[int, list[Message]] = {}  # pid -> reports that beat `spawned`
        self.lost: str | None = None
        self.slots = 0
        self._on_lost = on_lost
        self.tasks = Background(f"agent {host}", on_error=lambda exc: self.lose(repr(exc)))
        channel = open_channel(context, "dealer", connect=host.address, curve=curve)
        self.mailbox = Mailbox(channel, f"the agent on {host}", self._handle, watch=True,
                               on_error=lambda exc: self.lose(repr(exc))).start()

    async def call(self, type_: str, what: str, timeout: float | None = None,
                   **fields: Any) -> Message:
        if self.lost is not None:
            raise ActorDiedError(f"host {self.host} is lost ({self.lost}); cannot send {what}")
        if type_ not in ("probe",):
            fields = {"job": self.job, **fields}
        return await self.mailbox.call(message(type_, new_id(), **fields),
                                       timeout=timeout or self.heartbeat_timeout, what=what)

    async def hello(self, coordinator: str) -> None:
        """Say hello and check the agent reaches `coordinator`; ConfigError names the host
        and what failed (no answer, a refused key, no route back)."""
        try:
            await self.mailbox.call(
                message("hello", new_id(), role="coordinator", rank=0,
                        software=narun.__version__),
                timeout=CONNECT_TIMEOUT, what="a welcome")
            probe = await self.call("probe", f"a probe of {coordinator}",
                                    timeout=CONNECT_TIMEOUT, address=coordinator)
        except (WaitTimeout, ActorDiedError) as exc:
            raise ConfigError(
                f"host {self.host}: its agent at {self.host.address} did not answer within "
                f"{CONNECT_TIMEOUT:g} s ({exc}); is `narun agent` running there, and does it "
                f"admit this coordinator's key (narun keys authorize on that host)?") from None
        if not probe["ok"]:
            raise ConfigError(f"host {self.host}: cannot reach the coordinator at "
                              f"{coordinator} ({probe['message']}); open that port to it, or "
                              f"set runtime.host to an address that host can reach")
        self.slots = probe["slots"]
        self.tasks.spawn(self._heartbeats(), "heartbeats")

    async def spawn(self, role: str, rank: int, spec: WorkerSpec, incarnation: int,
                    blas_threads: int) -> RemoteChild:
        answer = await self.call("spawn", f"start {role} {rank}", role=role, rank=rank,
                                 incarnation=incarnation, spec=spec.to_json(),
                                 blas_threads=blas_threads)
        child = RemoteChild(self, role, rank, answer["pid"], answer["log"])
        self.children[child.pid] = child
        for early in self._early.pop(child.pid, []):  # reported before we knew the pid
            await self._apply(child, early)
        return child

    async def _handle(self, msg: Message, route: bytes | None) -> Message | None:
        if msg.type not in ("output", "exited"):
            raise ReplyError("unsupported", f"the coordinator of {self.job} has no use for "
                                            f"{msg.type}")
        child = self.children.get(msg["pid"])
        if child is None:
            self._early.setdefault(msg["pid"], []).append(msg)
        else:
            await self._apply(child, msg)
        return None

    async def _apply(self, child: RemoteChild, msg: Message) -> None:
        if msg.type == "output" and not child.endpoint.done():
            child.endpoint.set_result(msg["line"])
        elif msg.type == "exited":
            # the log's tail first: the coordinator's report of the death quotes it
            with contextlib.suppress(ActorDiedError, WaitTimeout, NarunError):
                child.tail = (await self.call("log_tail", f"the log of {child.name}",
                                              pid=child.pid, lines=15))["text"]
            self.children.pop(child.pid, None)
            if not child.exit.done():
                child.exit.set_result(msg["code"])

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        heard = loop.time()
        while self.lost is None:
            if self.mailbox.peer_lost.is_set():
                self.lose("its connection dropped")
                return
            beat = message("heartbeat", new_id(), role="coordinator", rank=0, step=-1,
                           time=time.time())
            with contextlib.suppress(WaitTimeout, ActorDiedError):
                await self.mailbox.call(beat, timeout=self.heartbeat_interval,
                                        what="the heartbeat echo")
                heard = loop.time()
            if loop.time() - heard > self.heartbeat_timeout:
                self.lose(f"its agent echoed no heartbeat for {loop.time() - heard:.1f} s "
                           f"(runtime.heartbeat_timeout {self.heartbeat_timeout:g} s)")
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_interval):
                    await self.mailbox.peer_lost.wait()

    def lose(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        for child in list(self.children.values()):
            child.gone(f"was lost with its host {self.host} ({reason})")
        self.children.clear()
        self._on_lost(self, reason)

    def close(self) -> None:
        self.tasks.cancel()
        self.mailbox.close()


class AgentProcesses:
    """Where a job's processes run across hosts: through the agents at `hosts`.

    `keys`: the launching node's key directory: its pair (which the agents authorised) and
    each agent's public key filed under its host (protocol.keys.NodeKeys.public_key_of).
    """

    secure = True

    def __init__(self, hosts: Sequence[Host], keys: NodeKeys | None, job: str,
                 report: Callable[..., None]) -> None:
        self.hosts = list(hosts)
        self.keys = keys
        self.job = job
        self.job_keys = JobKeys.new() if keys is not None else None
        self._report = report
        self.links: dict[Host, AgentLink] = {}
        self.placement: dict[tuple[str, int], Host] = {}
        self._shipped: set[tuple[Host, str]] = set()  # (host, local file) already there
        self._port = 0
        self._bound: str | None = None  # runtime.host, when the coordinator binds only there

    def listen_address(self, host: str, port: int) -> str:
        """Where the coordinator binds: runtime.host when set to an address of this
        machine, else every interface, since each host reaches it by its own route (and on
        loopback only, when every agent is on this machine)."""
        if not is_loopback(host) or all(is_loopback(h.host) for h in self.hosts):
            self._bound = None if is_loopback(host) else host
            return f"tcp://{host}:{port}"
        return f"tcp://0.0.0.0:{port}"

    async def open(self, context: zmq.asyncio.Context, endpoint: str,
                   roles: Sequence[tuple[str, int]], rt: Any) -> None:
        """Connect to every agent, check each reaches the coordinator's `endpoint` (bound
        already), and place `roles`: all before any process starts."""
        await self.connect(context, endpoint, rt.heartbeat_interval, rt.heartbeat_timeout)
        self.placement = place(roles, {h: link.slots for h, link in self.links.items()})
        self._report("placement", hosts=[str(h) for h in self.hosts], processes=[
            {"role": role, "rank": rank, "host": str(host)}
            for (role, rank), host in sorted(self.placement.items())])

    async def connect(self, context: zmq.asyncio.Context, endpoint: str,
                      heartbeat_interval: float, heartbeat_timeout: float) -> dict[Host, int]:
        """Say hello to every agent and check each reaches `endpoint` (this machine's, bound
        already); each host's free slots. ConfigError names a host that fails."""
        self._port = int(endpoint.rsplit(":", 1)[1])
        for host in self.hosts:
            curve = None
            if self.keys is not None:
                curve = CurveClient(self.keys.keypair, self.keys.public_key_of(host.host))
            self.links[host] = AgentLink(host, self.job, context, curve, heartbeat_interval,
                                         heartbeat_timeout, self._lost)
        await asyncio.gather(*(link.hello(self.coordinator_for(host))
                               for host, link in self.links.items()))
        return {h: link.slots for h, link in self.links.items()}

    def coordinator_for(self, host: Host) -> str:
        """The coordinator's address as a process on `host` reaches it: runtime.host when
        set to one of this machine's addresses, else the address on the route to `host`."""
        if self._bound is not None:
            return f"tcp://{self._bound}:{self._port}"
        return f"tcp://{route_to(host.host, host.port)}:{self._port}"

    async def spawn(self, role: str, rank: int, spec: WorkerSpec, incarnation: int,
                    log_dir: Path, blas_threads: int = 1) -> Worker:
        host = self._host_for(role, rank)
        link = self.links[host]
        # What the process starts from lives on this host: ship it to its job directory
        # there (each file once per host), and name it relative to that directory.
        init_local, resume_local = init, resume = spec.init_state, spec.resume
        if init is not None and role == "ps":
            init = await self._ship(link, Path(init), f"{DATA_DIR}/{Path(init).name}")
        if resume is not None:
            for file in sorted(p for p in Path(resume).iterdir() if p.is_file()):
                await self._ship(link, file, f"{DATA_DIR}/resume/{Path(resume).name}/"
                                             f"{file.name}")
            resume = f"{DATA_DIR}/resume/{Path(resume).name}"
        spec = dataclasses.replace(
            spec, coordinator=self.coordinator_for(host), host=host.host, init_state=init,
            resume=resume,
            curve=self.job_keys.to_spec() if self.job_keys is not None else None)
        try:
            return await link.spawn(role, rank, spec, incarnation, blas_threads)
        except Refused as exc:
            if exc.code != "busy" or "draining" not in str(exc):
                raise
        # Its agent is being stopped (SIGTERM): the host leaves the job, as a lost one
        # does, and the process goes to another.
        link.lose("its agent is draining")
        return await self.spawn(role, rank, dataclasses.replace(
            spec, init_state=init_local, resume=resume_local), incarnation, log_dir,
            blas_threads)

    def checkpoint_path(self, child: Worker, staging: Path) -> str:
        """Where a shard on another host writes its checkpoint slice: in its job
        directory there, gathered by `collect`."""
        return f".shards/{staging.name}"

    async def collect(self, child: Worker, path: str, staging: Path) -> Path:
        """Bring the slice a shard wrote at `path` (on its host) into `staging` here."""
        assert isinstance(child, RemoteChild)
        await asyncio.to_thread(staging.mkdir, parents=True, exist_ok=True)
        return await fetch_file(
            lambda offset: child.link.call("file_get", f"{child.name}'s slice {path}",
                                           path=path, offset=offset, size=CHUNK, remove=True),
            staging / Path(path).name)

    async def _ship(self, link: AgentLink, source: Path, path: str) -> str:
        key = (link.host, str(source.resolve()))
        if key not in self._shipped:
            size = source.stat().st_size
            with open(source, "rb") as f:
                offset = 0
                while True:
                    data = np.frombuffer(await asyncio.to_thread(f.read, CHUNK), np.uint8)
                    last = offset + data.size >= size
                    await link.call("file_put", f"{source.name} for the job's processes",
                                    path=path, offset=offset, data=data, last=last)
                    offset += data.size
                    if last:
                        break
            self._shipped.add(key)
        return path

    def _host_for(self, role: str, rank: int) -> Host:
        host = self.placement.get((role, rank))
        if host is not None and self.links[host].lost is None:
            return host
        live = [h for h, link in self.links.items() if link.lost is None]
        if not live:
            raise ActorDiedError(f"every host is lost; cannot restart {role} {rank}")
        used = {h: sum(1 for p, ph in self.placement.items() if ph == h and p != (role, rank))
                for h in live}
        host = max(live, key=lambda h: (self.links[h].slots - used[h], -live.index(h)))
        self.placement[(role, rank)] = host
        log.warning("coordinator.replaced_on", role=role, rank=rank, host=str(host))
        return host

    def _lost(self, link: AgentLink, reason: str) -> None:
        log.warning("coordinator.host_lost", host=str(link.host), reason=reason)
        self._report("host_lost", host=str(link.host), reason=reason)

    async def close(self) -> None:
        for link in self.links.values():
            link.close()
