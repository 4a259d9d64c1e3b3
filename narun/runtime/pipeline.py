"""The coordinator of a pipeline-parallel job (runtime.mode pipeline): the model cut into
runtime.stages stage processes (`python -m workers stage`, workers/stage.py), each step's
batch into runtime.micro_batches, run by runtime.schedule.

It is the parameter-server coordinator with another layout of processes: the same
generations, heartbeats, restart budget, drain and events. What differs:
- the stages start first, each prints the endpoint of its inbox, and every stage then
  reads all of them (its neighbours' and, for tied weights, the other end's);
- the stages step on their own; a step is done once every stage reported it, and its
  loss is the last stage's;
- with training.grad_clip every stage sends its squared gradient norm (`grad_norm`) and
  waits; once all are in, each gets the global norm (`apply_step`);
- a stage writes its slice (parameters and optimizer state) after each eval, checkpoint
  and last step, before it reports the step; eval and checkpoints assemble the model from
  those slices (narun.pipeline.slices), so a pipeline checkpoint is an ordinary one;
- any stage that dies takes its slice of the model with it: the job rolls back to the last
  checkpoint, every stage restarts from it (as a shard's death does).

Pipeline x data parallel (runtime.workers r > 0): r replicas of each stage (stage process
rank j p + s is replica j of stage s; the replicas j form pipeline j, on their share of each
batch) and one parameter-server shard per stage, which averages its stage's replicas and
holds the stage's optimizer state (narun.runtime.buckets.make_stage_plan). The shards then
keep the model as in ps-sync: eval and checkpoints take it from them, not from slices, and
a shard's death rolls the job back like a stage's. A step's loss is the mean of the last
stage's replicas' (each the mean over an equal share of the batch).
"""

from __future__ import annotations

import asyncio
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import uvloop
import zmq.asyncio

from narun.config import JobConfig
from narun.errors import ConfigError
from narun.events import Reporter
from narun.pipeline import plan_stages
from narun.pipeline.slices import assemble_slices, slice_path
from narun.runtime.buckets import plan_for
from narun.runtime.coordinator import STAGING, Coordinator
from narun.runtime.launcher import LocalProcesses
from narun.runtime.mailbox import ReplyError
from narun.runtime.spec import WorkerSpec
from narun.train import check_job
from protocol import Message, reply

log = structlog.get_logger("narun.runtime")


class PipelineCoordinator(Coordinator):
    """Runs one runtime.mode pipeline job to its end; see `train`."""

    stepping_role = "stage"

    def __init__(self, cfg: JobConfig, reporter: Reporter, resume: str | None = None,
                 **options: Any) -> None:
        super().__init__(cfg, reporter, resume, **options)
        rt = cfg.runtime
        self.replicas = rt.workers  # of each stage; 0: one, which owns its optimizer state
        self.stage_names = None
        if self.replicas:
            self.stage_names = [list(plan.names) for plan in plan_stages(self.job.model,
                                                                          rt.stages)]
            self.plan = plan_for(self.job.model, rt.stages, self.bucket_bytes,
                                 self.stage_names)

    @staticmethod
    def check_config(cfg: JobConfig, here: bool = True) -> None:
        if cfg.runtime.mode != "pipeline":
            raise ConfigError(f"runtime.mode: the pipeline runtime runs mode pipeline, got "
                              f"{cfg.runtime.mode!r}")
        check_job(cfg, here)

    def _reset_generation(self) -> None:
        super()._reset_generation()
        for _, norm in getattr(self, "_norms", {}).values():
            norm.cancel()  # the last generation's stages that waited for it are gone
        # step -> (stage -> squared norm, the global norm once every stage sent its own)
        self._norms: dict[int, tuple[dict[int, float], asyncio.Future[float]]] = {}

    @property
    def _stage_staging(self) -> str:
        """Where stages write their slices: here, the job's staging directory itself; on
        an agent's host, the job's directory there (the coordinator fetches them)."""
        here = isinstance(self.processes, LocalProcesses)
        return str(self._staging().resolve()) if here else STAGING

    def _spec(self, **changes: Any) -> WorkerSpec:
        return super()._spec(**{"staging": self._stage_staging,
                                "stage_names": self.stage_names, **changes})

    @property
    def _processes(self) -> int:
        """Stage processes: p, or p x r with replicas."""
        return self.cfg.runtime.stages * max(self.replicas, 1)

    def _roles(self) -> list[tuple[str, int]]:
        shards = self.cfg.runtime.stages if self.replicas else 0
        return ([("ps", s) for s in range(shards)] +
                [("stage", k) for k in range(self._processes)])

    async def _start_processes(self, context: zmq.asyncio.Context) -> None:
        p = self.cfg.runtime.stages
        plans = plan_stages(self.job.model, p)
        log.info("pipeline.placement", stages=[plan.describe() for plan in plans],
                 replicas=max(self.replicas, 1))
        self.reporter.emit("placement", replicas=max(self.replicas, 1), stages=[
            {"stage": plan.index, "blocks": [plan.first_unit, plan.end_unit - 1],
             "parameters": len(plan.names)} for plan in plans])
        spec = self._spec()
        shards = [await self._spawn("ps", s, spec) for s in range(p)] if self.replicas else []
        stages = [await self._spawn("stage", k, spec) for k in range(self._processes)]
        if shards:  # each stage reads the shards' endpoints, then the stages'
            self.shard_endpoints = await self._exchange_endpoints(shards, stages,
                                                                  "shard_endpoints")
        # every stage prints its inbox's endpoint and reads everyone's
        await self._exchange_endpoints(stages, stages, "stage_endpoints")
        await self._all_joined()
        self._link_shards(context)

    def _summary(self, reports: list[Message], speed_key: str,
                 per_sample: int) -> dict[str, Any]:
        """One step's fields: the last stage's loss (the mean of its replicas'); the speed
        of the slowest stage (a pipeline runs at its pace)."""
        by_rank = sorted(reports, key=lambda r: r["rank"])
        p = self.cfg.runtime.stages
        lasts = [r for r in by_rank if r["rank"] % p == p - 1]
        last = lasts[0]
        slowest = max(r["timings"].get("compute", 0.0) for r in reports)
        return {"loss": float(np.mean([r["loss"] for r in lasts])),
                speed_key: last["samples"] * per_sample / max(slowest, 1e-9),
                "timings": {"compute": slowest},
                # per stage: step time, seconds computing (the rest is bubble), the most
                # micro-batches' activations held at once, peak memory
                "stages": [{"step": r["timings"].get("compute", 0.0),
                            "busy": r["timings"].get("busy", 0.0),
                            "held": int(r["timings"].get("held", 0)),
                            "rss_mb": r["timings"].get("rss_mb", 0.0)} for r in by_rank]}

    # -- the global gradient norm ------------------------------------------------------
    async def _handle(self, msg: Message, route: bytes | None) -> Message | None:
        if msg.type != "grad_norm":
            return await super()._handle(msg, route)
        assert route is not None
        child = self._current(route)
        if child is None or child.role != "stage":
            raise ReplyError("unsupported", "grad_norm is for the job's pipeline stages")
        step, p = msg["step"], self.cfg.runtime.stages
        if step not in self._norms:
            self._norms[step] = ({}, asyncio.get_running_loop().create_future())
        sqs, norm = self._norms[step]
        sqs[child.rank] = float(msg["sq"])
        if len(sqs) == self._processes and not norm.done():
            # the replicas of a stage send the same (their shard's mean gradient's): the
            # first pipeline's, ranks 0 .. p - 1, in stage order
            norm.set_result(math.sqrt(sum(sqs[s] for s in range(p))))
            for old in [s for s in self._norms if s < step]:
                del self._norms[old]
        value = await asyncio.wait_for(asyncio.shield(norm), self.wait_timeout)
        return reply(msg, "apply_step", step=step, rank=child.rank, norm=value)

    # -- the model of a step, from the stages' slices ----------------------------------
    async def _slices(self, step: int) -> list[Path]:
        """Every stage's slice of `step`, here (fetched from the stages' hosts)."""
        staging = self._staging(step)
        stages = sorted(self._trainers(), key=lambda c: c.rank)
        return list(await asyncio.gather(*(
            self.processes.collect(c, str(slice_path(self._stage_staging, step, c.rank)),
                                   staging) for c in stages)))

    def _assemble(self, files: list[Path]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if self.replicas:  # the shards' files
            return super()._assemble(files)
        return assemble_slices(files, self.job.model, self.job.optimizer)

    async def _pull_model(self, step: int) -> None:
        if self.replicas:
            return await super()._pull_model(step)
        try:
            state, _ = await asyncio.to_thread(self._assemble, await self._slices(step))
            self._load(state, step)
        finally:
            await asyncio.to_thread(shutil.rmtree, self._staging(step), True)

    async def _checkpoint(self, step: int) -> Path:
        if step == self.start and self.resume is not None:
            return self.resume  # rolled back to this step's checkpoint, with nothing left
        if self.replicas:
            return await super()._checkpoint(step)
        try:
            return await asyncio.to_thread(self._save, step, await self._slices(step))
        finally:
            await asyncio.to_thread(shutil.rmtree, self._staging(step), True)


def train(cfg: JobConfig, reporter: Reporter | None = None, resume: str | None = None,
          **options: Any) -> dict[str, Any]:
    """Run a pipeline job with local processes; returns the `done` fields."""
    from narun.events import JsonLinesReporter

    coordinator = PipelineCoordinator(cfg, reporter or JsonLinesReporter(), resume, **options)
    return uvloop.run(coordinator.run())
