"""The coordinator: runs a data-parallel job with parameter servers on this host, and keeps
it running when processes die.

It starts `ps_shards` parameter-server processes and `workers` trainer processes
(`python -m workers ROLE`), tells each where the others are, and follows the job: it turns
the trainers' `step_done` reports into the same `step` / `eval` / `checkpoint` / `done`
events as the single-process trainer, evaluates and checkpoints at the configured steps
(asking each shard for its slice and reassembling one ordinary checkpoint), and stops every
process at the end. Every wait has a timeout that names what it waited for.

Failures (README.md, "What happens when a process dies"; narun.runtime.supervision keeps
the record and the budget):
- a process that exits, or sends no heartbeat for runtime.heartbeat_timeout (it is then
  killed), is dead; each death draws on the job-wide runtime.max_restarts, and past it the
  job fails listing every failure. A process that exits with an error before it joined the
  job is misconfigured: the job fails at once.
- a dead trainer is restarted at once and rejoins at the step the others are at; ps-sync
  waits runtime.rejoin_timeout for it, then completes steps with the live trainers (the
  shards average fewer pushes) until it is back.
- a dead shard takes its slice with it: every process restarts from the newest checkpoint
  (a new generation), so all shards roll back to the same step; the steps since are redone.
- SIGTERM/SIGINT to the coordinator drain: trainers finish their step, the coordinator
  checkpoints and stops everything. A worker's own SIGTERM is a planned leave: a trainer
  finishes its step and is replaced; a shard has the job checkpoint the current step and
  restart from it. Neither draws on the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import uvloop
import zmq.asyncio

import narun
from narun.checkpoint import latest_good, save_checkpoint
from narun.config import JobConfig, to_dict
from narun.errors import ActorDiedError, ConfigError, WaitTimeout
from narun.events import Reporter
from narun.nn.utils import load_buffers
from narun.runlog import record_run
from narun.runtime.actor import EXIT_LEFT
from narun.runtime.assemble import assemble
from narun.runtime.buckets import BUCKET_BYTES, join, plan_for
from narun.runtime.hosts import remove_local_endpoint
from narun.runtime.launcher import LocalProcesses, Worker
from narun.runtime.mailbox import Mailbox, new_id
from narun.runtime.shard_start import remove_init_state, write_init_state
from narun.runtime.spec import WorkerSpec
from narun.runtime.supervision import Failure, StartupFailure, Supervisor
from narun.runtime.tasks import Background
from narun.runtime.waiting import Broadcast
from narun.train import (
    build_job,
    check_job,
    checkpoint_dir,
    claim_out_dir,
    resolve_resume,
    restore,
)
from protocol import Message, message, open_channel, reply
from protocol.curve import CurveServer

log = structlog.get_logger("narun.runtime")

STOP_GRACE = 5.0  # seconds a process gets to exit after `shutdown` before SIGKILL
STAGING = ".shards"  # out_dir/STAGING/step-N: the shards' slices of a checkpoint being written


class _Rollback(Exception):
    """Restart every process from the newest checkpoint: a shard, and its slice, are gone
    (or a shard asked to leave: then the coordinator checkpoints first and nothing is lost)."""

    def __init__(self, reason: str, role: str, rank: int, planned: bool,
                 last_step: int = -1) -> None:
        super().__init__(reason)
        self.reason, self.role, self.rank, self.planned = reason, role, rank, planned
        self.last_step = last_step  # the last step the leaving shard reported, -1 if none


class Coordinator:
    """Runs one job (runtime.mode ps-sync or ps-async) to its end; see `train`.

    `restart_delay` (seconds before a dead trainer's replacement starts) exists for tests of
    runtime.rejoin_timeout.
    """

    def __init__(self, cfg: JobConfig, reporter: Reporter, resume: str | None = None, *,
                 bucket_bytes: int = BUCKET_BYTES, wait_timeout: float | None = None,
                 delays: dict[int, float] | None = None, stop_at: int | None = None,
                 restart_delay: float = 0.0, overwrite: bool = False,
                 processes: Any = None) -> None:
        # where the processes run: here (LocalProcesses) or through agents on other hosts
        # (narun.runtime.agents.AgentProcesses); the supervision below is the same
        self.processes = processes or LocalProcesses()
        self.check_config(cfg, here=isinstance(self.processes, LocalProcesses))
        self.cfg = cfg
        self.resume = resolve_resume(cfg, resume)
        claim_out_dir(cfg, self.resume, overwrite)
        self.reporter = record_run(reporter, cfg.training, fresh=self.resume is None)
        self.first_resume = self.resume
        self.bucket_bytes = bucket_bytes
        rt = cfg.runtime
        self.wait_timeout = wait_timeout or max(60.0, 6 * rt.heartbeat_timeout)
        self.delays = {str(k): float(v) for k, v in (delays or {}).items()}
        self.stop_at = stop_at
        self.restart_delay = restart_delay
        self.job = build_job(cfg)
        self.start = restore(self.job, self.resume) if self.resume else 0
        if self.resume:  # the line and event a one-process run gives (narun.train.train)
            log.info("resumed", checkpoint=str(self.resume), step=self.start)
        self.plan = plan_for(self.job.model, rt.ps_shards, bucket_bytes)
        self.supervisor = Supervisor(rt.max_restarts)
        self.pids: list[int] = []  # every process started, for callers and tests
        self.generation = 0
        self.steps_redone = 0
        self._incarnations: dict[bytes, int] = {}
        self._failure: BaseException | None = None
        self._signal: int | None = None
        self._closing = False
        self._endpoint = ""
        self.control: Mailbox | None = None
        self._changed = Broadcast()  # notified whenever what a wait of the job checks moves
        self.init_state: Path | None = None  # narun.runtime.shard_start's file, while running
        self._members_lock = asyncio.Lock()
        self._reset_generation()

    def _reset_generation(self) -> None:
        """Forget the processes of the last generation (all stopped)."""
        self.children: list[Worker] = []  # the live incarnation of each role and rank
        self.shard_links: list[Mailbox] = []
        self.shard_endpoints: list[str] = []
        self._tasks = Background("coordinator", on_error=self._fail, expected=(_Rollback,))
        self._reports: dict[int, dict[int, Message]] = {}
        self._latest: dict[int, int] = {}  # trainer rank -> the last step it reported
        # step -> trainer 0's persistent buffers (BatchNorm statistics) after that step
        self._buffers: dict[int, dict[str, np.ndarray]] = {}
        self._hello: set[int] = set()  # pids that joined
        self._seen: dict[int, float] = {}  # pid -> last message
        self._exited: dict[int, int] = {}  # pid -> exit status
        self._hung: dict[int, str] = {}  # pid -> why it was declared dead and killed
        # pid -> the last step that process reported: by pid, not by role-rank identity,
        # which every incarnation shares (a replacement that dies before its first
        # heartbeat has reported nothing, not its predecessor's step)
        self._last_step: dict[int, int] = {}
        self.members = set(range(self.cfg.runtime.workers))
        self._away: dict[int, float] = {}  # dead trainer rank -> when to stop waiting for it
        self._rollback: _Rollback | None = None
        self._draining: str | None = None
        self._ending = False  # the generation is being stopped: exits are expected
        self._completed = self.start
        self._last_change = time.monotonic()

    # -- the job -----------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        """Run the job; returns the `done` event's fields (plus `signal`)."""
        context = zmq.asyncio.Context()
        loop = asyncio.get_running_loop()
        handled = _install_signals(loop, self._on_signal)
        # Slices of checkpoints an earlier run did not finish (killed mid-checkpoint): they
        # are nobody's now, and each is a full copy of the model's slice.
        _clear_staging(self._staging())
        rt = self.cfg.runtime
        job_keys = self.processes.job_keys
        auth = job_keys.authenticator(context) if job_keys is not None else None
        try:
            channel = _listen(context, self.processes.listen_address(rt.host, rt.port),
                              job_keys.server(auth) if job_keys is not None else None)
            self._endpoint = channel.endpoint
            self.control = Mailbox(channel, "coordinator", self._handle,
                                   on_error=self._fail).start()
            await self.processes.open(context, self._endpoint, self._roles(), rt)
            # Once per run, for every generation's shards: the layout, and a fresh start's
            # values, which a rollback before the first checkpoint starts from again.
            self.init_state = await asyncio.to_thread(
                write_init_state, self.job.model, self.cfg.training.out_dir,
                values=self.first_resume is None)
            self.reporter.start(self.cfg.training.steps, self.start)
            if self.first_resume is not None:
                self.reporter.emit("resumed", step=self.start,
                                   checkpoint=str(self.first_resume))
            began = time.perf_counter()
            while True:
                if self._signal is not None:  # stopped while rolling back: that checkpoint
                    return self._done(self.start, None, self.resume, began)  # is the last
                try:
                    await self._start_processes(context)
                    return await self._follow(began)
                except (_Rollback, ActorDiedError, WaitTimeout):
                    # ActorDiedError, WaitTimeout: a call to a shard that just died (a
                    # checkpoint, an eval), whose death already asked for a rollback, unless
                    # it was one too many.
                    if self._rollback is None or self._failure is not None:
                        raise
                    await self._end_generation()
                    await self._roll_back(self._rollback)
        finally:
            self._closing = True
            await self._end_generation()
            if self.control is not None:
                self.control.close()
            if self.init_state is not None:  # every process of the run has stopped
                remove_init_state(self.init_state)
            await self.processes.close()
            if auth is not None:
                auth.stop()
            context.destroy(linger=0)
            for sig in handled:
                loop.remove_signal_handler(sig)
            # After a failure too: a job service runs many jobs in one process, and each
            # job's event log and TensorBoard writer must not outlive it (closed once; last,
            # so that what stopping the processes reports is recorded).
            self.reporter.close()

    # -- what a subclass running another layout of processes changes ---------------------
    stepping_role = "trainer"  # the processes whose step_done reports make a step

    @staticmethod
    def check_config(cfg: JobConfig, here: bool = True) -> None:
        check_config(cfg, here)

    def _roles(self) -> list[tuple[str, int]]:
        rt = self.cfg.runtime
        return ([("ps", k) for k in range(rt.ps_shards)] +
                [("trainer", r) for r in range(rt.workers)])

    def _summary(self, reports: list[Message], speed_key: str,
                 per_sample: int) -> dict[str, Any]:
        return _summary(reports, speed_key, per_sample)

    def _assemble(self, files: list[Path]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return assemble(self.plan, files, self.job.model, self.job.optimizer)

    def _spec(self, **changes: Any) -> WorkerSpec:
        # Paths absolute: an agent starts processes in their job's directory on its host.
        config = to_dict(self.cfg)
        if config["data"]["path"] is not None:
            config["data"]["path"] = str(Path(config["data"]["path"]).resolve())
        fields: dict[str, Any] = dict(
            config=config, coordinator=self._endpoint,
            bucket_bytes=self.bucket_bytes, wait_timeout=self.wait_timeout,
            resume=str(self.resume.resolve()) if self.resume else None, delays=self.delays,
            stop_at=self.stop_at,
            init_state=str(self.init_state.resolve()) if self.init_state else None)
        return WorkerSpec(**{**fields, **changes})

    async def _start_processes(self, context: zmq.asyncio.Context) -> None:
        rt = self.cfg.runtime
        spec = self._spec()
        # Trainers start at once and read the shards' endpoints from stdin when known, so
        # their start-up (imports, building the job) overlaps the shards'.
        shards = [await self._spawn("ps", k, spec) for k in range(rt.ps_shards)]
        trainers = [await self._spawn("trainer", r, spec) for r in range(rt.workers)]
        self.shard_endpoints = await self._exchange_endpoints(shards, trainers,
                                                              "shard_endpoints")
        await self._all_joined()
        self._link_shards(context)

    def _link_shards(self, context: zmq.asyncio.Context) -> None:
        """The coordinator's own connections to the shards (members, eval, checkpoints)."""
        for k, ep in enumerate(self.shard_endpoints):
            ch = open_channel(context, "dealer", connect=ep, identity=b"coordinator",
                              curve=None if self.processes.job_keys is None else
                              self.processes.job_keys.client())
            self.shard_links.append(Mailbox(ch, f"ps {k}", watch=True,
                                            on_error=self._fail).start())

    async def _exchange_endpoints(self, printers: list[Worker], readers: list[Worker],
                                  key: str) -> list[str]:
        """The endpoints `printers` print first thing, sent as `{key: [...]}` to the stdin
        of `readers`; the printers' stdout is forwarded to the log from then on."""
        try:
            endpoints = list(await asyncio.gather(
                *(c.read_endpoint(self.wait_timeout) for c in printers)))
        except ActorDiedError:
            await self._started_dead(printers)
            raise
        for c in printers:
            self._tasks.spawn(c.forward_stdout(), f"{c.name}'s stdout")
        line = (json.dumps({key: endpoints}) + "\n").encode()
        for c in readers:
            try:
                await c.write_line(line)
            except ActorDiedError:
                # _watch judges it: a trainer's replacement gets the endpoints in its spec,
                # a stage's death rolls the job back
                await self._started_dead([c])
        return endpoints

    async def _all_joined(self) -> None:
        """Watch heartbeats from now on, and wait until every process said hello."""
        self._tasks.spawn(self._watchdog(), "watchdog")
        await self._wait_until(lambda: all(c.pid in self._hello for c in self.children),
                               lambda: "hello from " + ", ".join(
                                   c.name for c in self.children if c.pid not in self._hello))

    async def _started_dead(self, children: list[Worker]) -> None:
        """One of `children` died starting: once _watch has judged it, raise what it
        decided (a misconfiguration fails the job; a killed shard rolls back; a killed
        trainer is being replaced, so this returns)."""
        await self._wait_until(lambda: any(c.pid in self._exited for c in children),
                               "a dead process's exit status")
        self._check()  # _watch judged it in the same step that recorded the exit

    async def _spawn(self, role: str, rank: int, spec: WorkerSpec) -> Worker:
        identity = f"{role}-{rank}".encode()
        incarnation = self._incarnations.get(identity, -1) + 1
        self._incarnations[identity] = incarnation
        child = await self.processes.spawn(role, rank, spec, incarnation,
                                           Path(self.cfg.training.out_dir) / "logs")
        self.children = [c for c in self.children if c.identity != identity] + [child]
        self.pids.append(child.pid)
        self._tasks.spawn(self._watch(child), f"watch {child.name} (pid {child.pid})")
        return child

    def live_children(self) -> list[Worker]:
        """The processes that joined the job and are running now."""
        return [c for c in self.children if self._alive(c)]

    def _trainers(self) -> list[Worker]:
        return [c for c in self.children if c.role == self.stepping_role]

    def _alive(self, c: Worker) -> bool:
        return c.pid in self._hello and c.pid not in self._exited

    async def _follow(self, began: float) -> dict[str, Any]:
        cfg, job = self.cfg, self.job
        t = cfg.training
        text = job.text
        per_sample = cfg.data.seq_len if text else 1
        speed_key = "tokens_per_s" if text else "samples_per_s"
        end = t.steps if self.stop_at is None else min(self.stop_at, t.steps)
        step, last_ckpt, val_loss, val_step = self.start, None, None, None
        while step < end:
            if not await self._wait_step(step + 1):
                break
            step += 1
            self._completed = step
            reports = list(self._reports.pop(step, {}).values())
            for old in [s for s in self._reports if s <= step]:
                del self._reports[old]
            # trainer 0's statistics: of those up to this step only the latest can be used
            for old in sorted(s for s in self._buffers if s <= step)[:-1]:
                del self._buffers[old]
            lr = job.scheduler.get_last_lr()[0]
            job.scheduler.step()
            if not text:
                job.sampler.next_batch()  # keeps the checkpointed sampler position exact
            if reports:  # none when every trainer skipped it, catching up after a restart
                self.reporter.emit("step", step=step, lr=lr,
                                   **self._summary(reports, speed_key, per_sample))
            is_eval = bool(t.eval_every and step % t.eval_every == 0 and step < t.steps)
            is_ckpt = bool(t.checkpoint_every and step % t.checkpoint_every == 0
                           and step < t.steps)
            if is_ckpt:
                last_ckpt = await self._checkpoint(step)
            elif is_eval:
                await self._pull_model(step)
            if is_eval:
                val_loss, val_step = await asyncio.to_thread(job.evaluate), step
                self.reporter.emit("eval", step=step, val_loss=val_loss)
            if is_ckpt:
                self.reporter.emit("checkpoint", step=step, path=str(last_ckpt))
        if last_ckpt is None or not last_ckpt.name.endswith(f"{step:06d}"):
            last_ckpt = await self._checkpoint(step)
            self.reporter.emit("checkpoint", step=step, path=str(last_ckpt))
        if self._rollback is not None and self._signal is None:
            raise self._rollback  # a shard asked to leave: drained, checkpointed, restart
        if step == t.steps:
            val_loss, val_step = await asyncio.to_thread(job.evaluate, None), step
        return self._done(step, val_loss, last_ckpt, began, val_step)

    def _done(self, step: int, val_loss: float | None, checkpoint: Path | None,
              began: float, val_step: int | None = None) -> dict[str, Any]:
        # val_step: the step val_loss is from (as narun.train.train's done event)
        done = {"step": step, "val_loss": val_loss, "val_step": val_step,
                "checkpoint": str(checkpoint),
                "seconds": time.perf_counter() - began,
                "interrupted": step < self.cfg.training.steps,
                "restarts": len(self.supervisor.failures), "steps_redone": self.steps_redone}
        self.reporter.emit("done", **done)
        self.reporter.close()
        done["signal"] = self._signal
        return done

    # -- waiting -----------------------------------------------------------------------
    async def _wait_until(self, ready: Callable[[], bool], what: Callable[[], str] | str) -> None:
        """Wait up to wait_timeout for `ready()`; a failure or rollback of the job ends the
        wait at once (raised)."""
        def checked() -> bool:
            self._check()
            return ready()

        await self._changed.wait_until(checked, timeout=self.wait_timeout, who="coordinator",
                                       what=what)

    async def _wait_step(self, step: int) -> bool:
        """True once every trainer reported `step` (or a later one: a trainer catching up
        after a restart may skip steps); False when a drain stopped the trainers first."""
        began = time.monotonic()
        while True:
            # the clock restarts when a trainer is restarted or rejoins
            deadline = max(began, self._last_change) + self.wait_timeout
            try:
                await self._changed.wait_until(
                    lambda: self._check() or self._reported(step) or self._draining is not None,
                    timeout=deadline - time.monotonic(), who="coordinator",
                    what=lambda: f"step {step} from every trainer; reported: ranks "
                                 f"{sorted(r for r, s in self._latest.items() if s >= step)}")
            except WaitTimeout:
                if max(began, self._last_change) + self.wait_timeout > time.monotonic():
                    continue
                raise
            if self._reported(step):
                return True
            return await self._drain_step(step)

    def _reported(self, step: int) -> bool:
        # Finished trainers count with their last report: they may exit before this
        # loop, busy with a checkpoint, has caught up with their reports. Dead ones count
        # until runtime.rejoin_timeout: their replacements report where they stopped.
        counted = [c for c in self._trainers() if self._alive(c) or c.rank in self._away
                   or self._exited.get(c.pid) == 0]
        return bool(counted) and all(self._latest.get(c.rank, -1) >= step for c in counted)

    async def _drain_step(self, step: int) -> bool:
        """Draining: the trainers finish their step and stop. True when they all reported
        `step` first. Trainers still running after heartbeat_timeout are told to stop now."""
        def stopped() -> bool:
            self._check()
            return self._reported(step) or all(c.pid in self._exited for c in self._trainers())

        def running() -> str:
            return ", ".join(c.name for c in self._trainers() if c.pid not in self._exited)

        try:
            await self._changed.wait_until(stopped, timeout=self.cfg.runtime.heartbeat_timeout,
                                           who="coordinator", what=lambda: f"{running()} "
                                           f"to finish step {step} and stop (draining)")
        except WaitTimeout:  # stuck behind trainers that stopped stepping
            await self._shutdown([c for c in self._trainers() if c.pid not in self._exited],
                                 "drain timed out", drain=False)
            await self._wait_until(stopped, lambda: f"{running()} to stop (drain timed out)")
        return self._reported(step)

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._rollback is not None and not self._rollback.planned:
            raise self._rollback

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None and not self._closing:
            self._failure = exc
        self._changed.notify()

    # -- failures and restarts ---------------------------------------------------------
    async def _watch(self, child: Worker) -> None:
        code = await child.wait()
        self._exited[child.pid] = code
        self._changed.notify()
        if self.control is not None and self._current(child.identity) is child:
            self.control.peer_died(child.identity, f"{child.name} exited")
        if self._closing or self._ending:
            return
        if code == 0 and child.role == self.stepping_role:
            return  # finished its steps, or stopped by a drain
        joined = child.pid in self._hello
        if not joined and code > 0 and code != EXIT_LEFT:
            self._fail(StartupFailure(f"{child.died_message(code)}\n(it exited before "
                                      f"joining the job: a restart would fail the same way)"))
            return
        reason = self._hung.pop(child.pid, None) or child.how_it_died(code)
        if self._draining is not None:
            log.warning("coordinator.exit_while_draining", role=child.role, rank=child.rank,
                        reason=reason)
            return
        if code != EXIT_LEFT:
            failure = Failure(child.role, child.rank, child.pid,
                              self._last_step.get(child.pid, -1), reason,
                              Path(child.log_path), child.host)
            if not self.supervisor.record(failure):
                self._fail(self.supervisor.exhausted(child.log_tail()))
                return
        if child.role == "trainer":
            self._tasks.spawn(self._replace(child, reason), f"replace {child.name}")
        else:  # a shard or a pipeline stage takes state nobody else holds with it
            self._roll_back_soon(child, reason, planned=False)

    def _current(self, identity: bytes) -> Worker | None:
        return next((c for c in self.children if c.identity == identity), None)

    async def _replace(self, dead: Worker, reason: str) -> None:
        """Start a new incarnation of a dead trainer. Steps wait for it (up to
        runtime.rejoin_timeout): in ps-sync it rejoins at the step the others wait on, in
        ps-async where its predecessor stopped, so no trainer's share of the data is lost."""
        self._away[dead.rank] = time.monotonic() + self.cfg.runtime.rejoin_timeout
        if self.restart_delay:
            await asyncio.sleep(self.restart_delay)
        if self._ending or self._closing or self._draining is not None:
            return
        await self._wait_until(lambda: bool(self.shard_endpoints), "the shards' endpoints")
        start = self._latest.get(dead.rank, self.start)
        if dead.rank not in self._away:  # given up on: it joins at the current step
            start = max(start, self._completed)
        # No checkpoint to load: the shards hold the state (and the generation's checkpoint
        # may have been pruned since).
        child = await self._spawn("trainer", dead.rank, self._spec(
            shard_endpoints=self.shard_endpoints, start_step=start, resume=None))
        self._last_change = time.monotonic()
        # step: the job's last completed step (the event's documented field); rejoins_at:
        # the step the replacement starts at; last_step: the dead one's last reported step
        fields = dict(role="trainer", rank=dead.rank, reason=reason, step=self._completed,
                      rejoins_at=start, last_step=self._last_step.get(dead.pid, -1),
                      host=child.host)
        log.warning("coordinator.restarted", pid=child.pid, **fields)
        self.reporter.emit("restart", **fields)

    def _roll_back_soon(self, child: Worker, reason: str, planned: bool) -> None:
        if self._rollback is None:
            self._rollback = _Rollback(reason, child.role, child.rank, planned,
                                       self._last_step.get(child.pid, -1))
            if planned:
                self._drain(f"{child.name} is leaving: checkpoint, then restart without it")
        self._changed.notify()

    async def _roll_back(self, rollback: _Rollback) -> None:
        """Reload the newest good checkpoint (or the job's start) and start a generation."""
        reached = self._completed
        run_id = self.job.run_id
        path = latest_good(checkpoint_dir(self.cfg), run_id) or self.first_resume

        def reload() -> tuple[Any, int]:
            job = build_job(self.cfg)
            step = restore(job, path) if path else 0
            job.run_id = run_id  # the same run, whatever it reloaded
            return job, step

        self.job, self.start = await asyncio.to_thread(reload)
        self.resume = path
        self.steps_redone += max(reached - self.start, 0)
        self.generation += 1
        self._reset_generation()
        # step (the event's documented field) and rolled_back_to: the step every process
        # restarts from; reached: the job's last completed step before; last_step: the
        # shard's own last reported step (as in its actor.dead line)
        fields = dict(role=rollback.role, rank=rollback.rank, reason=rollback.reason,
                      step=self.start, rolled_back_to=self.start, reached=reached,
                      last_step=rollback.last_step)
        log.warning("coordinator.rolled_back", generation=self.generation,
                    checkpoint=str(path), **fields)
        self.reporter.emit("restart", **fields)

    async def _watchdog(self) -> None:
        rt = self.cfg.runtime
        while True:
            await asyncio.sleep(min(rt.heartbeat_interval, 0.5))
            now = time.monotonic()
            for c in self.children:
                seen = self._seen.get(c.pid)
                if seen is None or c.pid in self._exited or c.pid in self._hung:
                    continue
                if now - seen > rt.heartbeat_timeout:
                    # declared dead: a hung process gets no grace period
                    self._hung[c.pid] = (f"sent no heartbeat for {now - seen:.1f} s "
                                         f"(runtime.heartbeat_timeout {rt.heartbeat_timeout:g} s)")
                    c.kill()
            for rank, deadline in list(self._away.items()):
                if now > deadline:
                    del self._away[rank]
                    log.warning("coordinator.continuing_without", rank=rank,
                                waited=rt.rejoin_timeout)
                    if rank in self.members:
                        self.members.discard(rank)
                        self._tasks.spawn(self._send_members(), f"send members (without {rank})")
                    self._changed.notify()  # a step that waited only for it is complete

    async def _send_members(self) -> None:
        """Tell every shard whose pushes complete a ps-sync step."""
        async with self._members_lock:
            ranks = sorted(self.members)
            calls = [link.call(message("members", new_id(), ranks=ranks),
                               timeout=self.wait_timeout, what=f"members {ranks}")
                     for link in self.shard_links]
            with contextlib.suppress(ActorDiedError):  # a dead shard rolls the job back
                await asyncio.gather(*calls)

    async def _handle(self, msg: Message, route: bytes | None) -> Message | None:
        assert route is not None
        child = self._current(route)
        if child is not None:
            self._seen[child.pid] = time.monotonic()
        if msg.type == "heartbeat":
            if child is not None:
                self._last_step[child.pid] = msg["step"]
            return reply(msg, "heartbeat", role="coordinator", rank=0, step=self._completed,
                         time=time.time())
        if msg.type == "hello":
            return await self._welcome(msg, route, child)
        if msg.type == "step_done":
            rank, step = msg["rank"], msg["step"]
            self._latest[rank] = max(self._latest.get(rank, -1), step)
            if child is not None:
                self._last_step[child.pid] = step
            if step > self._completed:
                self._reports.setdefault(step, {})[rank] = msg
            buffers = msg.get("buffers")
            if buffers is not None:
                self._buffers[step] = buffers
            self._changed.notify()
        elif msg.type == "shutdown" and child is not None:  # a worker's own SIGTERM
            log.warning("coordinator.leave_requested", role=child.role, rank=child.rank,
                        reason=msg["reason"])
            if child.role != "trainer" and self._draining is None:
                self._roll_back_soon(child, msg["reason"], planned=True)
        return None

    async def _welcome(self, msg: Message, route: bytes, child: Worker | None) -> Message:
        assert self.control is not None
        if child is not None:
            self._hello.add(child.pid)
            self._seen[child.pid] = time.monotonic()
        self.control.revive(route)
        rank = msg["rank"]
        if msg["role"] == "trainer" and self._away.pop(rank, None) is not None:
            self._last_change = time.monotonic()
        if msg["role"] == "trainer" and rank not in self.members:
            self.members.add(rank)  # back after ps-sync went on without it: wait for it again
            log.warning("coordinator.rejoined", rank=rank, trainers=len(self.members))
            # Not awaited: the hello that waits for this welcome is bounded by
            # heartbeat_timeout, the shards' answers by wait_timeout. Until a shard has the
            # new list it completes steps without waiting for this trainer, whose pushes it
            # still averages in when they come before the others' (or answers them late).
            self._tasks.spawn(self._send_members(), f"send members (trainer {rank} is back)")
        self._changed.notify()
        extra = {}
        if msg["role"] == "trainer" and rank == 0 and self._buffers:
            extra["buffers"] = self._buffers[max(self._buffers)]  # a replacement goes on
        return reply(msg, "welcome", role="coordinator", software=narun.__version__,
                     heartbeat_interval=self.cfg.runtime.heartbeat_interval, **extra)

    def _on_signal(self, signum: int) -> None:
        if self._signal is not None:
            return
        self._signal = signum
        log.warning("coordinator.draining", signal=signal.Signals(signum).name)
        self._drain(f"signal {signum}")

    def _drain(self, reason: str) -> None:
        """Trainers finish their step and stop; the job then checkpoints."""
        if self._draining is None:
            self._draining = reason
            self._tasks.spawn(self._shutdown(self._trainers(), reason, drain=True), "drain")
        self._changed.notify()

    # -- parameters, checkpoints -------------------------------------------------------
    async def _pull_model(self, step: int) -> None:
        msg = [message("pull_params", new_id(), keys=[], min_version=step)
               for _ in self.shard_links]
        replies = await asyncio.gather(*(
            link.call(m, timeout=self.wait_timeout, step=step, what="every bucket for eval")
            for link, m in zip(self.shard_links, msg)))
        flats = {k: v for r in replies for k, v in r["params"].items()}
        self._load(join(self.plan, flats), step)

    def _load(self, state: dict[str, np.ndarray], step: int) -> None:
        """The shards' parameters, and trainer 0's buffers as of `step` (the latest it
        reported up to then; none reported yet: the model's own, fresh or resumed)."""
        for name, p in self.job.model.named_parameters():
            p.data[...] = state[name]
        reported = [s for s in self._buffers if s <= step]  # _follow keeps one of these
        if reported:
            load_buffers(self.job.model, self._buffers[max(reported)])

    async def _checkpoint(self, step: int) -> Path:
        """Every shard's slice of `step`, then one checkpoint written whole (manifest last):
        a checkpoint holds all slices of one step or does not exist."""
        assert self.control is not None
        staging = self._staging(step)
        shards = [c for c in self.children if c.role == "ps"]

        async def slice_of(c: Worker) -> Path:
            answer = await self.control.call(  # type: ignore[union-attr]
                message("checkpoint", new_id(), step=step,
                        path=self.processes.checkpoint_path(c, staging)),
                to=c.identity, timeout=self.wait_timeout, step=step,
                what="its checkpoint slice")
            return await self.processes.collect(c, answer["path"], staging)

        try:
            files = list(await asyncio.gather(*(slice_of(c) for c in shards)))
            return await asyncio.to_thread(self._save, step, files)
        finally:  # written into the checkpoint, or of no use: a failed one is redone whole
            await asyncio.to_thread(shutil.rmtree, staging, True)

    def _staging(self, step: int | None = None) -> Path:
        root = Path(self.cfg.training.out_dir) / STAGING
        return root if step is None else root / f"step-{step:06d}"

    def _save(self, step: int, files: list[Path]) -> Path:
        job, cfg = self.job, self.cfg
        model_state, opt_state = self._assemble(files)
        self._load(model_state, step)
        extra = {"config": to_dict(cfg), "rng": narun.get_rng_state(),
                 "scheduler": job.scheduler.state_dict()}
        if not job.text:
            extra["sampler"] = job.sampler.state_dict()
        path = save_checkpoint(checkpoint_dir(cfg), step, job.model.state_dict(), opt_state,
                               extra, keep=cfg.training.keep_checkpoints, run_id=job.run_id)
        return path

    # -- stopping ----------------------------------------------------------------------
    async def _shutdown(self, children: list[Worker], reason: str, drain: bool) -> None:
        if self.control is None:
            return
        for c in children:
            if c.pid in self._exited or self.control.is_dead(c.identity):
                continue
            with contextlib.suppress(ActorDiedError, WaitTimeout):
                await self.control.send(message("shutdown", new_id(), reason=reason,
                                                drain=drain), to=c.identity, timeout=1.0)

    async def _end_generation(self) -> None:
        """Stop every process of this generation and forget them, and any checkpoint slices
        they wrote that no checkpoint took (a shard may still write one after its
        checkpoint request failed elsewhere)."""
        self._ending = True
        self._tasks.cancel()
        await self._shutdown(self.children, "job finished" if self._closing else
                             "restarting from a checkpoint", drain=False)
        await asyncio.gather(*(c.stop(STOP_GRACE) for c in self.children),
                             return_exceptions=True)
        for link in self.shard_links:
            link.close()
        self.shard_links = []
        for endpoint in self.shard_endpoints:  # a killed shard leaves its socket file
            remove_local_endpoint(endpoint)
        await asyncio.to_thread(_clear_staging, self._staging())


def _clear_staging(root: Path) -> None:
    """Remove every checkpoint's staged slices under `root` (the job's own files stay)."""
    for staged in root.glob("step-*"):
        shutil.rmtree(staged, ignore_errors=True)


#: The trainers' step timings a `step` event carries (their mean over the trainers).
TIMINGS = ("compute", "push", "wait", "pull", "pack", "tail")


def _summary(reports: list[Message], speed_key: str, per_sample: int) -> dict[str, Any]:
    """The `step` event's fields from the trainers' reports of one step."""
    timings = {k: float(np.mean([r["timings"].get(k, 0.0) for r in reports]))
               for k in TIMINGS}
    # Throughput from the trainers' own step times: reports arrive in bursts when the
    # trainers run ahead of the coordinator, so arrival times would mislead.
    speed = sum(r["samples"] * per_sample / max(
        sum(r["timings"].get(k, 0.0) for k in ("compute", "wait", "pull")), 1e-9)
        for r in reports)
    return {"loss": float(np.mean([r["loss"] for r in reports])), speed_key: speed,
            "timings": timings,
            "stale": int(sum(r["timings"].get("stale", 0) for r in reports))}


def _listen(context: zmq.asyncio.Context, address: str, curve: CurveServer | None) -> Any:
    """The coordinator's control socket on runtime.host:runtime.port; a port in use or an
    address this host does not have fails now, named."""
    try:
        return open_channel(context, "router", bind=address, curve=curve)
    except ConfigError as exc:
        hint = ("runtime.port: another process (another job?) listens there; pick another "
                "port, or 0 for any free one" if "in use" in str(exc) else
                "runtime.host: not an address of this host (or not an address at all); "
                "use 127.0.0.1 for a job on this host")
        raise ConfigError(f"the coordinator cannot listen on {address}: {exc.__cause__ or exc}"
                          f" ({hint})") from None


def check_config(cfg: JobConfig, here: bool = True) -> None:
    """What the parameter-server runtime supports, checked before any process starts: what
    `narun train` checks of every job (narun.train.check_job), in mode ps-sync / ps-async."""
    if cfg.runtime.mode not in ("ps-sync", "ps-async"):
        raise ConfigError(f"runtime.mode: the parameter-server runtime runs ps-sync or "
                          f"ps-async, got {cfg.runtime.mode!r}")
    check_job(cfg, here)


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
