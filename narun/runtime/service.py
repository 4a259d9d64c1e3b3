"""`narun coordinator`: the job service. Clients submit jobs; the service queues them, runs
as many at once as its slots allow, and keeps every job's state and events on disk.

Each running job is one `narun train` (or `narun launch --hosts`) process started by the
service with `--json`: the same supervision, checkpoints and events as a job typed at a
terminal, and a job's failure cannot take the service or another job down. The service
reads the job's events from that process's stdout, numbers them, writes them
(narun.runtime.jobstore) and streams them to every client following the job.

- FIFO: the oldest queued job starts as soon as its processes fit in the free slots; the
  jobs behind it wait for it (none overtakes, so none starves).
- A job process dies with the service (parent-death signal). A service started again finds
  every job on disk: a running one is queued to resume from its newest checkpoint
  (`--resume auto`), and emits `resumed` when it does.
- SIGTERM drains: every running job checkpoints and stops, and is queued to resume.
- `runtime.job_retries` runs a failed job again from its checkpoint after a back-off;
  `runtime.deadline` stops a job that ran longer and fails it with reason `deadline`.
- A follower is forgotten once nothing was sent to it, and it did not ask again, for
  `follower_ttl` seconds: a client that left while its job was quiet (queued, or between
  events) leaves no subscription behind. A live Client asks again after `follow_idle`
  (5 s) of silence, which renews it; one forgotten resumes from its last `seq` when it asks.
- With --keys, a peer without an authorised key never reaches the handler: `processed`
  counts the messages that did (logged in `service.stopped`, and each `service.vitals`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import structlog
import zmq.asyncio

import narun
from narun._process import die_with_parent, rss_bytes
from narun.config import config_from_dict, to_dict
from narun.errors import ActorDiedError, ConfigError, WaitTimeout
from narun.metrics import Metrics, serve_metrics
from narun.runtime.hosts import Host, listen_host
from narun.runtime.jobfiles import get_chunk
from narun.runtime.jobstore import FINAL, JobStore, StoredJob
from narun.runtime.mailbox import Mailbox, ReplyError
from narun.runtime.sdnotify import Notifier
from narun.runtime.tasks import Background, Shutdown
from narun.runtime.waiting import Broadcast
from protocol import Message, message, open_channel, reply
from protocol.curve import Authenticator, CurveServer
from protocol.keys import NodeKeys

log = structlog.get_logger("narun.service")

DEFAULT_PORT = 7700
BATCH = 256  # events per `events` message
RETRY_BACKOFF = (5.0, 60.0)  # seconds before a retry: first, and the most
TICK = 1.0  # seconds between the scheduler's passes when nothing wakes it
VITALS_EVERY = 2.0  # seconds between `service.vitals` (debug) and sweeps of idle followers


class JobService:
    """Serves clients on `listen` until SIGTERM (see the module docstring).

    `hosts`: the agents jobs run on (narun launch), or None to run them on this machine.
    `slots`: processes the service runs at once over all jobs; None: this machine's cores,
    or with `hosts` the agents' free slots when the service starts.
    """

    def __init__(self, listen: str, state_dir: Path, slots: int | None,
                 hosts: list[Host] | None = None, keys: NodeKeys | None = None,
                 keys_dir: str | None = None, grace: float = 120.0,
                 notifier: Notifier | None = None, metrics_port: int | None = None,
                 follower_ttl: float = 60.0) -> None:
        self.listen_host = listen_host(
            listen, DEFAULT_PORT, keys is not None, "a job service",
            ": `narun keys generate DIR --name coordinator`, authorize each client's key in "
            "it, and pass --keys DIR")
        if slots is not None and slots < 1:
            raise ConfigError(f"--slots: expected >= 1, got {slots}")
        if slots is None and hosts is None:
            slots = os.cpu_count() or 1
        self.listen = listen
        self.store = JobStore(state_dir)
        self.slots = slots or 0  # with hosts and no --slots: asked of the agents in run()
        self.hosts = hosts
        self.keys = keys
        self.keys_dir = keys_dir
        self.grace = grace
        self.notifier = notifier or Notifier()
        # Prometheus exposition of every job's events and the service's own counts
        self.metrics = Metrics()
        self.metrics_port = metrics_port
        self.metrics_address = ""
        self.endpoint = ""
        self.follower_ttl = follower_ttl
        self.refused = 0  # refusals the metrics have counted
        self.processed = 0  # messages that reached the handler (authorised peers only)
        self._server: Mailbox | None = None
        self._running: dict[str, asyncio.subprocess.Process] = {}
        # job -> route -> [request id, next seq, when last sent to or asked (monotonic)]
        self._subscribers: dict[str, dict[bytes, list[Any]]] = {}
        self._sending: set[tuple[str, bytes]] = set()  # (job, follower) a flush sends to now
        self._unfollowed_streams: deque[tuple[bytes, int]] = deque(maxlen=256)  # (route, id)
        self._changed = Broadcast()
        self._shutdown = Shutdown()
        self._tasks = Background("job service", on_error=self._shutdown.fail)
        self._draining = False
        self._dirty = False  # a change came since the scheduler last looked at the queue

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
            self._server = Mailbox(channel, "job service", self._handle,
                                   on_error=self._shutdown.fail,
                                   on_stray_error=self._unfollowed).start()
            for job in self.store.ordered():  # what a killed service left running
                if job.state.state == "running":
                    job.state.state, job.state.resume = "queued", True
                    job.save_state()
            metrics_server = None
            if self.metrics_port is not None:
                metrics_server = await serve_metrics(self.metrics, self.listen_host,
                                                     self.metrics_port)
                port = metrics_server.sockets[0].getsockname()[1]
                self.metrics_address = f"http://{self.listen_host}:{port}/metrics"
            if not self.slots:
                self.slots = await self._agents_slots(context)
            self._count_states()
            self._tasks.spawn(self._schedule(), "scheduler")
            self._tasks.spawn(self.notifier.run_watchdog(), "systemd watchdog")
            self._tasks.spawn(self._housekeeping(), "followers' sweep and vitals")
            log.info("service.listening", endpoint=self.endpoint, slots=self.slots,
                     jobs=len(self.store.jobs), hosts=[str(h) for h in self.hosts or []],
                     metrics=self.metrics_address or None)
            self.notifier.ready(f"serving on {self.endpoint}, {self.slots} slots")
            await self._shutdown.wait()
            self.notifier.stopping(f"draining {len(self._running)} running job(s)")
            await self._drain()
            if metrics_server is not None:
                metrics_server.close()
            # what reached the handler; what the decoder and CURVE turned away before it
            log.info("service.stopped", processed=self.processed,
                     refused=self._server.channel.refused if self._server else 0,
                     denied=auth.denied if auth is not None else 0)
            return 0
        finally:
            self._tasks.cancel()
            for proc in self._running.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            for job in self.store.jobs.values():
                job.close()
            if self._server is not None:
                self._server.close()
            if auth is not None:
                auth.stop()
            context.destroy(linger=0)
            self.notifier.close()

    def stop(self) -> None:
        self._shutdown.stop()

    async def _drain(self) -> None:
        """Running jobs checkpoint and stop (SIGTERM to each job's coordinator), and are
        queued to resume when the service starts again."""
        self._draining = True
        for proc in self._running.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(WaitTimeout):
            await self._changed.wait_until(lambda: not self._running, timeout=self.grace,
                                           who="job service", what="running jobs to drain")

    # -- scheduling --------------------------------------------------------------------
    def _needs(self, job: StoredJob) -> int:
        rt = job.config["runtime"]
        return rt["workers"] + rt["ps_shards"] if rt["mode"] in ("ps-sync", "ps-async") else 1

    def _used(self) -> int:
        return sum(self._needs(self.store.jobs[j]) for j in self._running)

    async def _agents_slots(self, context: zmq.asyncio.Context) -> int:
        """The agents' free slots, asked as `narun launch` asks them (each must answer and
        reach this service); ConfigError naming a host that does not."""
        from narun.runtime.agents import AgentProcesses

        assert self.hosts is not None
        agents = AgentProcesses(self.hosts, self.keys, "service", lambda *_, **__: None)
        try:
            return sum((await agents.connect(context, self.endpoint, 1.0, 10.0)).values())
        finally:
            await agents.close()

    def _count_states(self) -> None:
        counts = dict.fromkeys(("queued", "running", *FINAL), 0)
        for job in self.store.jobs.values():
            counts[job.state.state] = counts.get(job.state.state, 0) + 1
        self.metrics.set_jobs_by_state(counts)
        if self._server is not None:  # refusals counted by the channel since last time
            refused = self._server.channel.refused
            self.metrics.add_refused(refused - self.refused)
            self.refused = refused

    def _reschedule(self) -> None:
        """Something the queue depends on changed (a submit, a job's end, a cancel). The
        flag keeps the wake-up if the scheduler is busy starting a job and not waiting."""
        self._dirty = True
        self._changed.notify()

    async def _schedule(self) -> None:
        while True:
            self._dirty = False
            self._count_states()
            now = time.time()
            for job in self.store.ordered():
                if job.state.state != "queued" or job.state.job in self._running:
                    continue
                if job.state.not_before > now or self._draining:
                    break  # the head of the queue waits, and the rest behind it
                if self._needs(job) > self.slots - self._used():
                    break
                await self._start(job)
            # woken by a change (a submit, a job's end), else each TICK (retry back-offs)
            if not self._dirty:
                await self._changed.wait(TICK)

    async def _start(self, job: StoredJob) -> None:
        st = job.state
        config = job.directory / "config.json"
        argv = [sys.executable, "-m", "narun.cli", "--log-json"]
        if self.hosts is None:
            argv += ["train", str(config), "--json"]
        else:
            argv += ["launch", str(config), "--json",
                     "--hosts", ",".join(str(h) for h in self.hosts)]
            if self.keys_dir is not None:
                argv += ["--keys", self.keys_dir]
        if st.resume:
            argv += ["--resume", "auto"]
        st.state, st.attempts = "running", st.attempts + 1
        st.started = st.started or time.time()
        job.save_state()
        with open(job.directory / "coordinator.log", "ab") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                stdin=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent)
        self._running[st.job] = proc
        log.info("service.started", job=st.job, pid=proc.pid, attempt=st.attempts,
                 resume=st.resume)
        self._tasks.spawn(self._follow(job, proc), f"follow {st.job}")
        deadline = job.config["runtime"].get("deadline") or 0.0
        if deadline:
            self._tasks.spawn(self._deadline(job, proc, deadline), f"deadline {st.job}")

    async def _follow(self, job: StoredJob, proc: asyncio.subprocess.Process) -> None:
        """The job's events, as its process prints them; then its end."""
        assert proc.stdout is not None
        last_error = ""
        while line := await proc.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not an event (nothing else is printed to stdout, but be sure)
            if not isinstance(event, dict) or "event" not in event:
                continue
            if event["event"] == "step":
                job.state.step = int(event.get("step", job.state.step))
            elif event["event"] == "error":
                last_error = str(event.get("message", ""))
            await self._publish(job, event)
        code = await proc.wait()
        self._running.pop(job.state.job, None)
        self._ended(job, code, last_error)
        job.save_state()
        await self._flush(job)
        self._reschedule()

    def _ended(self, job: StoredJob, code: int, last_error: str) -> None:
        st = job.state
        st.ended = time.time()
        if st.cancel:
            st.state, st.resume = "cancelled", False
            st.message = st.message or "cancelled"
        elif st.message.startswith("deadline"):
            st.state = "failed"
        elif self._draining:
            st.state, st.resume = "queued", True  # drained: resume when the service is back
        elif code == 0:
            st.state, st.message = "done", ""
        else:
            why = last_error or f"its coordinator exited with status {code}; see " \
                                f"{job.directory / 'coordinator.log'}"
            retries = job.config["runtime"].get("job_retries", 0)
            if st.attempts <= retries:
                backoff = min(RETRY_BACKOFF[0] * 2 ** (st.attempts - 1), RETRY_BACKOFF[1])
                st.state, st.resume, st.not_before = "queued", True, time.time() + backoff
                st.message = (f"retry {st.attempts} of {retries} in {backoff:g} s after: "
                              f"{why}")
            else:
                st.state, st.message = "failed", why
        log.info("service.ended", job=st.job, state=st.state, code=code, message=st.message)

    async def _deadline(self, job: StoredJob, proc: asyncio.subprocess.Process,
                        deadline: float) -> None:
        started = job.state.started or time.time()
        await asyncio.sleep(max(0.0, started + deadline - time.time()))
        if proc.returncode is None:
            job.state.message = (f"deadline: it ran {time.time() - started:.0f} s, over "
                                 f"runtime.deadline {deadline:g} s; stopped at its newest "
                                 f"checkpoint")
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)  # drain: checkpoint, then exit

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(VITALS_EVERY)
            self._sweep(time.monotonic())
            # what an operator (and the load test) watches for leaks: flat after warm-up
            log.debug("service.vitals", tasks=len(asyncio.all_tasks()), rss=rss_bytes(),
                      followers=sum(len(s) for s in self._subscribers.values()),
                      running=len(self._running), processed=self.processed)

    def _sweep(self, now: float) -> None:
        """Forget followers idle for follower_ttl: a follower that left is only noticed when
        something is sent to it (EHOSTUNREACH), and a quiet job sends nothing."""
        for job_id, subscribers in list(self._subscribers.items()):
            for route, sub in list(subscribers.items()):
                if now - sub[2] > self.follower_ttl:
                    del subscribers[route]
            if not subscribers:
                del self._subscribers[job_id]

    def _unfollowed(self, msg: Message, route: bytes | None) -> bool:
        """A follower answered its stream with an `error`: it reads it no more (narun.client
        does so once its `events` loop was left, its connection still open). Stop sending."""
        if route is None:
            return False
        if (route, msg.id) in self._unfollowed_streams:
            return True  # one of the events that were on their way when it stopped reading
        for job_id, subscribers in self._subscribers.items():
            sub = subscribers.get(route)
            if sub is not None and sub[0] == msg.id:
                del subscribers[route]
                if not subscribers:
                    del self._subscribers[job_id]
                self._unfollowed_streams.append((route, msg.id))
                return True
        return False

    # -- events ------------------------------------------------------------------------
    async def _publish(self, job: StoredJob, event: dict[str, Any]) -> None:
        job.append(event)
        self.metrics.observe(job.state.job, event)
        await self._flush(job)

    async def _flush(self, job: StoredJob, only: bytes | None = None) -> None:
        """Send each follower of `job` (or the one at `only`) what it has not had; the final
        empty batch once the job is over. A follower that cannot take a message now is
        dropped: it resumes from its last sequence number by asking again. A follower being
        sent to already is left to that flush, which goes on to the newest event: two would
        send the same batch twice (and a new follower's history, read from disk, once)."""
        subscribers = self._subscribers.get(job.state.job)
        if not subscribers:
            return
        assert self._server is not None
        final = job.state.state in FINAL
        chosen = subscribers.items() if only is None else (
            [(only, subscribers[only])] if only in subscribers else [])
        for route, sub in list(chosen):
            msg_id, seq, _ = sub[:3]
            busy = (job.state.job, route)
            if busy in self._sending:
                continue
            self._sending.add(busy)
            try:
                while seq < job.count:
                    # in the loop, not a thread: a batch from disk is ~40 KB of page
                    # cache and a parse, and pool threads each grow a malloc arena
                    batch = job.read(seq, BATCH)
                    await self._server.send(message("events", msg_id, job=job.state.job,
                                                    since=seq, events=batch),
                                            to=route, timeout=0.0)
                    seq += len(batch)
                    sub[1], sub[2] = seq, time.monotonic()
                if final:
                    await self._server.send(message("events", msg_id, job=job.state.job,
                                                    since=seq, events=[]),
                                            to=route, timeout=0.0)
                    subscribers.pop(route, None)
            except (ActorDiedError, WaitTimeout):
                subscribers.pop(route, None)
            finally:
                self._sending.discard(busy)
        # a send that waited may have let the sweep, or another flush, replace the table
        if not subscribers and self._subscribers.get(job.state.job) is subscribers:
            del self._subscribers[job.state.job]

    # -- requests ----------------------------------------------------------------------
    def _job(self, job_id: str) -> StoredJob:
        job = self.store.jobs.get(job_id)
        if job is None:
            raise ReplyError("not_found", f"no job {job_id!r} here; `narun status` lists "
                                          f"them")
        return job

    async def _handle(self, msg: Message, route: bytes | None) -> Message | None:
        assert route is not None
        self.processed += 1
        if msg.type == "hello":
            return reply(msg, "welcome", role="coordinator", software=narun.__version__,
                         heartbeat_interval=1.0)
        if msg.type == "heartbeat":
            return reply(msg, "heartbeat", role="coordinator", rank=0, step=-1,
                         time=time.time())
        if msg.type == "submit":
            return await self._submit(msg)
        if msg.type == "jobs" and msg.get("jobs") is None:
            return reply(msg, "jobs", jobs=[{**j.state.status(), "name": j.state.name}
                                            for j in self.store.ordered()])
        if msg.type == "status" and msg.get("state") is None:
            return reply(msg, "status", **self._job(msg["job"]).state.status())
        if msg.type == "cancel":
            return self._cancel(self._job(msg["job"]), msg, msg["reason"])
        if msg.type == "file_get" and msg.get("data") is None:
            return await self._file(self._job(msg["job"]), msg)
        if msg.type == "events" and msg.get("events") is None:
            job = self._job(msg["job"])
            self._subscribers.setdefault(job.state.job, {})[route] = [
                msg.id, max(0, min(msg["since"], job.count)), time.monotonic()]
            await self._flush(job, only=route)
            return None
        raise ReplyError("unsupported", f"the job service does not handle {msg.type!r} "
                                        f"in this form")

    async def _file(self, job: StoredJob, msg: Message) -> Message:
        """A piece of a file of the job's out_dir (its checkpoints), for a client to fetch;
        read only."""
        if msg.get("remove"):
            raise ReplyError("protocol", "file_get.remove: a job's files are read only here")
        data, eof = await asyncio.to_thread(get_chunk, job.out_dir, msg["path"],
                                            msg["offset"], msg["size"])
        return reply(msg, "file_get", job=msg["job"], path=msg["path"], offset=msg["offset"],
                     size=msg["size"], data=data, eof=eof)

    async def _submit(self, msg: Message) -> Message:
        import narun.models  # noqa: F401  (registers model fields, so model.* keys check)
        from narun.train import check_job

        try:
            cfg = config_from_dict(dict(msg["config"]))
            check_job(cfg, here=self.hosts is None)
        except ConfigError as err:
            raise ReplyError("protocol", f"submit.config: {err}") from None
        job = await asyncio.to_thread(self.store.add, msg["name"], to_dict(cfg), time.time())
        log.info("service.submitted", job=job.state.job, name=msg["name"])
        self._reschedule()
        return reply(msg, "status", **job.state.status())

    def _cancel(self, job: StoredJob, msg: Message, reason: str) -> Message:
        st = job.state
        if st.state == "queued":
            st.state, st.message, st.ended = "cancelled", f"cancelled: {reason}", time.time()
            job.save_state()
            self._tasks.spawn(self._flush(job), f"end {st.job}'s followers")
        elif st.state == "running" and not st.cancel:
            st.cancel, st.message = True, f"cancelled: {reason}"
            job.save_state()
            proc = self._running.get(st.job)
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)  # drain: a checkpoint, then exit
        self._reschedule()
        return reply(msg, "status", **st.status())


def run_service(service: JobService) -> int:
    import uvloop

    return uvloop.run(service.run())

