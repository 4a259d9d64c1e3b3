"""The coordinator: runs a data-parallel job with parameter servers on this host.

It starts `ps_shards` parameter-server processes and `workers` trainer processes
(`python -m workers ROLE`), tells each where the others are, and then follows the job: it
turns the trainers' `step_done` reports into the same `step` / `eval` / `checkpoint` /
`done` events as the single-process trainer, evaluates and checkpoints at the configured
steps (asking each shard for its slice and reassembling one ordinary checkpoint), and stops
every process at the end. Failures are loud and bounded: a process that exits or stops
sending heartbeats fails the job at once with its role, rank, step and log tail; every wait
has a timeout that names what it waited for; SIGINT/SIGTERM drain (trainers finish their
step, the coordinator checkpoints) and the job returns as interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import uvloop
import zmq.asyncio

import narun
from narun.checkpoint import save_checkpoint
from narun.config import JobConfig, to_dict
from narun.errors import ActorDiedError, ConfigError, WaitTimeout
from narun.events import Reporter
from narun.runtime.assemble import assemble
from narun.runtime.buckets import BUCKET_BYTES, join, plan_for
from narun.runtime.launcher import Child, spawn
from narun.runtime.mailbox import Mailbox, new_id
from narun.runtime.spec import WorkerSpec
from narun.train import build_job, checkpoint_dir, resolve_resume, restore
from protocol import Message, message, open_channel, reply

log = structlog.get_logger("narun.runtime")

STOP_GRACE = 5.0  # seconds a process gets to exit after `shutdown` before SIGKILL


class Coordinator:
    """Runs one job (runtime.mode ps-sync or ps-async) to its end; see `train`."""

    def __init__(self, cfg: JobConfig, reporter: Reporter, resume: str | None = None, *,
                 bucket_bytes: int = BUCKET_BYTES, wait_timeout: float | None = None,
                 delays: dict[int, float] | None = None, stop_at: int | None = None) -> None:
        check_config(cfg)
        self.cfg = cfg
        self.reporter = reporter
        self.resume = resolve_resume(cfg, resume)
        self.bucket_bytes = bucket_bytes
        rt = cfg.runtime
        self.wait_timeout = wait_timeout or max(60.0, 6 * rt.heartbeat_timeout)
        self.delays = {str(k): float(v) for k, v in (delays or {}).items()}
        self.stop_at = stop_at
        self.job = build_job(cfg)
        self.start = restore(self.job, self.resume) if self.resume else 0
        self.plan = plan_for(self.job.model, rt.ps_shards, bucket_bytes)
        self.children: list[Child] = []
        self.pids: list[int] = []  # every process started, for callers and tests
        self._reports: dict[int, dict[int, Message]] = {}
        self._hello: set[bytes] = set()
        self._seen: dict[bytes, float] = {}
        self._exited: dict[bytes, int] = {}
        self._progress = asyncio.Event()
        self._failure: BaseException | None = None
        self._signal: int | None = None
        self._closing = False
        self.control: Mailbox | None = None
        self.shard_links: list[Mailbox] = []

    # -- the job -----------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        """Run the job; returns the `done` event's fields (plus `signal`)."""
        context = zmq.asyncio.Context()
        loop = asyncio.get_running_loop()
        handled = _install_signals(loop, self._on_signal)
        tasks: list[asyncio.Task[Any]] = []
        try:
            channel = open_channel(context, "router", bind="tcp://127.0.0.1:0")
            self.control = Mailbox(channel, "coordinator", self._handle).start()
            await self._start_processes(context, channel.endpoint, tasks)
            return await self._follow()
        finally:
            self._closing = True
            for task in tasks:
                task.cancel()
            await self._stop_all()
            for link in self.shard_links:
                link.close()
            if self.control is not None:
                self.control.close()
            context.destroy(linger=0)
            for sig in handled:
                loop.remove_signal_handler(sig)

    async def _start_processes(self, context: zmq.asyncio.Context, endpoint: str,
                               tasks: list[asyncio.Task[Any]]) -> None:
        rt = self.cfg.runtime
        spec = WorkerSpec(config=to_dict(self.cfg), coordinator=endpoint,
                          bucket_bytes=self.bucket_bytes, wait_timeout=self.wait_timeout,
                          resume=str(self.resume) if self.resume else None,
                          delays=self.delays, stop_at=self.stop_at)
        log_dir = Path(self.cfg.training.out_dir) / "logs"
        # Trainers start at once and read the shards' endpoints from stdin when known, so
        # their start-up (imports, building the job) overlaps the shards'.
        shards = [await self._spawn("ps", k, spec.to_json(), log_dir, tasks)
                  for k in range(rt.ps_shards)]
        trainers = [await self._spawn("trainer", r, spec.to_json(), log_dir, tasks)
                    for r in range(rt.workers)]
        endpoints = await asyncio.gather(*(c.read_endpoint(self.wait_timeout) for c in shards))
        line = (json.dumps({"shard_endpoints": endpoints}) + "\n").encode()
        for c in trainers:
            await c.write_line(line)
        tasks.append(asyncio.ensure_future(self._watchdog()))
        await self._wait_for(lambda: len(self._hello) == len(self.children), "hello",
                             lambda: "hello from " + ", ".join(
                                 c.name for c in self.children if c.identity not in self._hello))
        for k, ep in enumerate(endpoints):
            ch = open_channel(context, "dealer", connect=ep, identity=b"coordinator")
            self.shard_links.append(Mailbox(ch, f"ps {k}", watch=True).start())

    async def _spawn(self, role: str, rank: int, spec: str, log_dir: Path,
                     tasks: list[asyncio.Task[Any]]) -> Child:
        child = await spawn(role, rank, spec, log_dir)
        self.children.append(child)
        self.pids.append(child.pid)
        tasks.append(asyncio.ensure_future(self._watch(child)))
        return child

    async def _follow(self) -> dict[str, Any]:
        cfg, job = self.cfg, self.job
        t = cfg.training
        text = job.text
        per_sample = cfg.data.seq_len if text else 1
        speed_key = "tokens_per_s" if text else "samples_per_s"
        end = t.steps if self.stop_at is None else min(self.stop_at, t.steps)
        self.reporter.start(t.steps, self.start)
        began = time.perf_counter()
        step, last_ckpt, val_loss = self.start, None, None
        while step < end:
            if not await self._wait_step(step + 1):
                break
            step += 1
            reports = self._reports.pop(step).values()
            lr = job.scheduler.get_last_lr()[0]
            job.scheduler.step()
            if not text:
                job.sampler.next_batch()  # keeps the checkpointed sampler position exact
            timings = {k: float(np.mean([r["timings"].get(k, 0.0) for r in reports]))
                       for k in ("compute", "push", "wait", "pull")}
            # Throughput from the trainers' own step times: reports arrive in bursts when
            # the trainers run ahead of this loop, so arrival times would mislead.
            speed = sum(r["samples"] * per_sample / max(
                sum(r["timings"].get(k, 0.0) for k in ("compute", "wait", "pull")), 1e-9)
                for r in reports)
            self.reporter.emit("step", step=step, loss=float(np.mean([r["loss"] for r in reports])),
                               lr=lr, **{speed_key: speed},
                               timings=timings,
                               stale=int(sum(r["timings"].get("stale", 0) for r in reports)))
            is_eval = bool(t.eval_every and step % t.eval_every == 0 and step < t.steps)
            is_ckpt = bool(t.checkpoint_every and step % t.checkpoint_every == 0
                           and step < t.steps)
            if is_ckpt:
                last_ckpt = await self._checkpoint(step)
            elif is_eval:
                await self._pull_model(step)
            if is_eval:
                val_loss = await asyncio.to_thread(job.evaluate)
                self.reporter.emit("eval", step=step, val_loss=val_loss)
            if is_ckpt:
                self.reporter.emit("checkpoint", step=step, path=str(last_ckpt))
        interrupted = step < t.steps
        if last_ckpt is None or not last_ckpt.name.endswith(f"{step:06d}"):
            last_ckpt = await self._checkpoint(step)
            self.reporter.emit("checkpoint", step=step, path=str(last_ckpt))
        if not interrupted:
            val_loss = await asyncio.to_thread(job.evaluate, None)
        done = {"step": step, "val_loss": val_loss, "checkpoint": str(last_ckpt),
                "seconds": time.perf_counter() - began, "interrupted": interrupted}
        self.reporter.emit("done", **done)
        self.reporter.close()
        done["signal"] = self._signal
        return done

    # -- waiting -----------------------------------------------------------------------
    async def _wait_for(self, ready: Any, what: str, missing: Any) -> None:
        deadline = time.monotonic() + self.wait_timeout
        while not ready():
            self._raise_failure()
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"coordinator waited {self.wait_timeout:g} s for "
                                  f"{missing()} ({what})")
            self._progress.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._progress.wait(), left)

    async def _wait_step(self, step: int) -> bool:
        """True once every trainer reported `step`; False when draining ended first."""
        trainers = [c for c in self.children if c.role == "trainer"]
        drain_deadline = None
        deadline = time.monotonic() + self.wait_timeout
        while len(self._reports.get(step, {})) < len(trainers):
            self._raise_failure()
            running = [c for c in trainers if c.identity not in self._exited]
            if not running:
                if self._signal is not None:
                    return False
                raise ActorDiedError(f"every trainer exited before step {step} was done")
            if self._signal is not None:
                drain_deadline = drain_deadline or time.monotonic() + \
                    self.cfg.runtime.heartbeat_timeout
                if time.monotonic() > drain_deadline:  # stuck behind trainers that stopped
                    await self._shutdown(running, "drain timed out", drain=False)
                    drain_deadline = float("inf")
            if time.monotonic() > deadline:
                got = sorted(self._reports.get(step, {}))
                raise WaitTimeout(f"coordinator waited {self.wait_timeout:g} s for step "
                                  f"{step} from every trainer; reported: ranks {got}")
            self._progress.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._progress.wait(), 0.5)
        return True

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None and not self._closing:
            self._failure = exc
        self._progress.set()

    # -- watching processes ------------------------------------------------------------
    async def _watch(self, child: Child) -> None:
        code = await child.proc.wait()
        self._exited[child.identity] = code
        if self.control is not None:
            self.control.peer_died(child.identity, f"{child.name} exited")
        step = max(self._reports, default=self.start)
        if child.role == "ps" or code != 0:
            self._fail(ActorDiedError(child.died_message(code, step)))
        self._progress.set()

    async def _watchdog(self) -> None:
        rt = self.cfg.runtime
        while True:
            await asyncio.sleep(rt.heartbeat_interval)
            now = time.monotonic()
            for c in self.children:
                seen = self._seen.get(c.identity)
                if seen is None or c.identity in self._exited:
                    continue
                if now - seen > rt.heartbeat_timeout:
                    self._fail(ActorDiedError(
                        f"{c.name} (pid {c.pid}) sent no heartbeat for {now - seen:.1f} s "
                        f"(runtime.heartbeat_timeout {rt.heartbeat_timeout:g} s); log "
                        f"{c.log_path}"))
                    with contextlib.suppress(ProcessLookupError):
                        c.proc.kill()  # declared dead: a hung process gets no grace period

    async def _handle(self, msg: Message, route: bytes | None) -> Message | None:
        assert route is not None
        self._seen[route] = time.monotonic()
        if msg.type == "hello":
            self._hello.add(route)
            self._progress.set()
            return reply(msg, "welcome", role="coordinator", software=narun.__version__,
                         heartbeat_interval=self.cfg.runtime.heartbeat_interval)
        if msg.type == "step_done":
            self._reports.setdefault(msg["step"], {})[msg["rank"]] = msg
            self._progress.set()
        return None  # heartbeats need no answer

    def _on_signal(self, signum: int) -> None:
        if self._signal is not None:
            return
        self._signal = signum
        log.warning("coordinator.draining", signal=signal.Signals(signum).name)
        trainers = [c for c in self.children if c.role == "trainer"]
        asyncio.ensure_future(self._shutdown(trainers, f"signal {signum}", drain=True))
        self._progress.set()

    # -- parameters, checkpoints -------------------------------------------------------
    async def _pull_model(self, step: int) -> None:
        msg = [message("pull_params", new_id(), keys=[], min_version=step)
               for _ in self.shard_links]
        replies = await asyncio.gather(*(
            link.call(m, timeout=self.wait_timeout, step=step, what="every bucket for eval")
            for link, m in zip(self.shard_links, msg)))
        flats = {k: v for r in replies for k, v in r["params"].items()}
        self._load(join(self.plan, flats))

    def _load(self, state: dict[str, np.ndarray]) -> None:
        for name, p in self.job.model.named_parameters():
            p.data[...] = state[name]

    async def _checkpoint(self, step: int) -> Path:
        assert self.control is not None
        staging = Path(self.cfg.training.out_dir) / ".shards" / f"step-{step:06d}"
        calls = [self.control.call(message("checkpoint", new_id(), step=step, path=str(staging)),
                                   to=c.identity, timeout=self.wait_timeout, step=step,
                                   what="its checkpoint slice")
                 for c in self.children if c.role == "ps"]
        files = [Path(r["path"]) for r in await asyncio.gather(*calls)]
        return await asyncio.to_thread(self._save, step, files, staging)

    def _save(self, step: int, files: list[Path], staging: Path) -> Path:
        job, cfg = self.job, self.cfg
        model_state, opt_state = assemble(self.plan, files, job.model, job.optimizer)
        self._load(model_state)
        extra = {"config": to_dict(cfg), "rng": narun.get_rng_state(),
                 "scheduler": job.scheduler.state_dict()}
        if not job.text:
            extra["sampler"] = job.sampler.state_dict()
        path = save_checkpoint(checkpoint_dir(cfg), step, job.model.state_dict(), opt_state,
                               extra, keep=cfg.training.keep_checkpoints)
        shutil.rmtree(staging, ignore_errors=True)
        return path

    # -- stopping ----------------------------------------------------------------------
    async def _shutdown(self, children: list[Child], reason: str, drain: bool) -> None:
        if self.control is None:
            return
        for c in children:
            if c.identity in self._exited or self.control.is_dead(c.identity):
                continue
            with contextlib.suppress(ActorDiedError, WaitTimeout):
                await self.control.send(message("shutdown", new_id(), reason=reason,
                                                drain=drain), to=c.identity, timeout=1.0)

    async def _stop_all(self) -> None:
        await self._shutdown(self.children, "job finished", drain=False)
        await asyncio.gather(*(c.stop(STOP_GRACE) for c in self.children),
                             return_exceptions=True)


def check_config(cfg: JobConfig) -> None:
    """What the parameter-server runtime supports, checked before any process starts."""
    rt, t = cfg.runtime, cfg.training
    if rt.mode not in ("ps-sync", "ps-async"):
        raise ConfigError(f"runtime.mode: the parameter-server runtime runs ps-sync or "
                          f"ps-async, got {rt.mode!r}")
    if rt.workers < 1:
        raise ConfigError(f"runtime.workers: expected >= 1 in mode {rt.mode}, got {rt.workers}")
    if t.grad_clip:
        raise ConfigError(f"training.grad_clip: clipping by the global gradient norm is not "
                          f"supported in mode {rt.mode} yet (each shard sees only its slice); "
                          f"set training.grad_clip: null (got {t.grad_clip})")
    if rt.device != "cpu":
        raise ConfigError(f"runtime.device: the parameter-server runtime trains on the cpu "
                          f"in this version, got {rt.device!r}")
    local = t.batch_size // rt.workers
    if local % t.grad_accum:
        raise ConfigError(f"training.grad_accum: {t.grad_accum} does not divide the "
                          f"per-trainer batch {local} (batch_size {t.batch_size} / "
                          f"{rt.workers} workers)")


def _install_signals(loop: asyncio.AbstractEventLoop, handler: Any) -> list[int]:
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, handler, sig)
        except (RuntimeError, ValueError):  # not the main thread: the caller handles signals
            continue
        installed.append(sig)
    return installed


def train(cfg: JobConfig, reporter: Reporter | None = None, resume: str | None = None,
          **options: Any) -> dict[str, Any]:
    """Run a ps-sync / ps-async job with local processes; returns the `done` fields.

        >>> cfg = load_config("configs/mlp.yaml", ["runtime.mode=ps-sync",   # doctest: +SKIP
        ...                                        "runtime.workers=2"])
        >>> narun.runtime.train(cfg)["val_loss"]                              # doctest: +SKIP

    `options` go to Coordinator (bucket_bytes, wait_timeout, stop_at, delays).
    """
    from narun.events import JsonLinesReporter

    coordinator = Coordinator(cfg, reporter or JsonLinesReporter(), resume, **options)
    return uvloop.run(coordinator.run())
