"""The inference worker processes of one `narun serve`: started, watched, restarted.

Each replica is `python -m workers inference --rank R`, which connects to the front's
internal socket under the identity `inference-R` (so a restarted replica takes its route
over) and says `hello` once its model is loaded. The pool tells the front when a replica
is ready (`on_ready`) and when it died (`on_lost`, before any restart): the front fails
that replica's streams with a message naming it, never a silent hang. A replica that dies
is started again while the restart budget lasts (`max_restarts` over the server's life);
past it the pool serves with the replicas it has left, and with none left the server
fails (systemd's Restart= starts it afresh).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from narun._process import blas_env
from narun.errors import NarunError
from workers.inference import InferenceSpec

log = structlog.get_logger("narun.serve")

START_TIMEOUT = 300.0  # seconds a replica gets to load its model and say hello


class ReplicasLost(NarunError):
    """Every replica died and the restart budget is spent."""


@dataclass(eq=False)
class Replica:
    rank: int
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    streams: set[int] = field(default_factory=set)  # the front's stream ids it runs
    starts: int = 0

    @property
    def route(self) -> bytes:
        return f"inference-{self.rank}".encode()

    @property
    def load(self) -> int:
        return len(self.streams)


class WorkerPool:
    def __init__(self, spec: InferenceSpec, replicas: int, blas_threads: int,
                 max_restarts: int, on_ready: Callable[[Replica], None],
                 on_lost: Callable[[Replica, str], None]) -> None:
        self.spec = spec
        self.replicas = [Replica(rank) for rank in range(replicas)]
        self.blas_threads = blas_threads
        self.restarts_left = max_restarts
        self.on_ready, self.on_lost = on_ready, on_lost
        self.stopping = False
        self._watchers: set[asyncio.Task[None]] = set()
        self._failed: asyncio.Future[None] | None = None

    def by_route(self, route: bytes | None) -> Replica | None:
        for r in self.replicas:
            if r.route == route:
                return r
        return None

    async def start(self) -> None:
        """Start every replica and wait until each said hello (ready) or one failed."""
        self._failed = asyncio.get_running_loop().create_future()
        for r in self.replicas:
            await self._spawn(r)
        ready = asyncio.ensure_future(self._all_ready())
        try:
            done, _ = await asyncio.wait({ready, self._failed}, timeout=START_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._failed.done():
            self._failed.result()  # raises why
        if not done:
            raise ReplicasLost(f"inference workers did not load the model within "
                               f"{START_TIMEOUT:g} s")

    async def _all_ready(self) -> None:
        while not all(r.ready for r in self.replicas):
            await asyncio.sleep(0.02)

    def mark_ready(self, route: bytes | None) -> Replica | None:
        r = self.by_route(route)
        if r is not None and r.proc is not None and not r.ready:
            r.ready = True
            log.info("serve.worker_ready", rank=r.rank, pid=r.proc.pid)
            self.on_ready(r)
        return r

    async def failed(self) -> None:
        """Raises ReplicasLost once no replica is left to serve."""
        assert self._failed is not None
        await self._failed

    async def _spawn(self, r: Replica) -> None:
        cmd = [sys.executable, "-m", "workers", "inference", "--rank", str(r.rank),
               "--spec", self.spec.to_json(), "--parent", str(os.getpid())]
        env = {**os.environ, **blas_env(self.blas_threads)}
        r.ready, r.starts = False, r.starts + 1
        # stderr is the server's own (journald, a terminal): a worker's traceback is seen
        r.proc = await asyncio.create_subprocess_exec(*cmd, env=env,
                                                      stdin=asyncio.subprocess.DEVNULL,
                                                      stdout=asyncio.subprocess.DEVNULL)
        task = asyncio.get_running_loop().create_task(self._watch(r, r.proc))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, r: Replica, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self.stopping or r.proc is not proc:
            return
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        why = f"inference worker {r.rank} (pid {proc.pid}) died ({how})"
        was_ready, r.ready, r.proc = r.ready, False, None
        self.on_lost(r, why)  # fails its streams first: the front forgets them
        r.streams.clear()
        if not was_ready and r.starts == 1:
            self._fail(ReplicasLost(f"{why} while loading the model; its traceback is "
                                    f"above"))
            return
        if self.restarts_left > 0:
            self.restarts_left -= 1
            log.warning("serve.worker_restarting", rank=r.rank, why=why,
                        restarts_left=self.restarts_left)
            await self._spawn(r)
        elif not any(x.proc is not None for x in self.replicas):
            self._fail(ReplicasLost(f"{why}, the last inference worker, and the restart "
                                    f"budget is spent"))
        else:
            log.error("serve.worker_lost", rank=r.rank, why=why,
                      serving=sum(x.proc is not None for x in self.replicas))

    def _fail(self, exc: BaseException) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(exc)

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every replica, SIGKILL what is left after `timeout`."""
        self.stopping = True
        procs = [r.proc for r in self.replicas if r.proc is not None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                for p in procs:
                    await p.wait()
        except TimeoutError:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            for p in procs:
                await p.wait()
        for t in list(self._watchers):
            t.cancel()
