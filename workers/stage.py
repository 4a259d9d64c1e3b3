"""A pipeline stage: one slice of the model's blocks, its parameters and their optimizer
state, running its schedule's actions every step (narun.pipeline).

Every stage builds the whole job from the config (the model seeded as every process's, the
data sampler, the optimizer) and keeps its slice: the optimizer skips parameters without a
gradient, so stepping the job's optimizer advances exactly this stage's parameters, and
a checkpoint (or resume) is the ordinary one. Per step:

1. run the schedule's actions: forwards and backwards of the m micro-batches on the
   executor thread, activations and their gradients over StageLinks, which receives the
   next micro-batch while this one computes;
2. the end stages swap the tied embedding's gradients and each adds the other's, so both
   copies take the same step;
3. with training.grad_clip, the stage's squared norm goes to the coordinator (`grad_norm`),
   which answers every stage with the global norm once all are in (`apply_step`);
4. the optimizer and LR schedule step; `step_done` goes to the coordinator (the last
   stage's carries the loss).

After an eval or checkpoint step, the last step, and a drained step, the stage writes its
parameters and optimizer state to the job's staging directory before reporting the step,
so the coordinator, which runs behind, assembles the model of exactly that step.

Pipeline x data parallel (runtime.workers r > 0): process `rank` is replica rank // p of
stage rank % p, and runs on rows [j B / r, (j + 1) B / r) of each batch; the replicas j of
all stages form pipeline j. Steps 3-4 then go through the stage's parameter-server shard
(workers/_stage_shard.py), which holds the optimizer state and the checkpoints' values.
"""

from __future__ import annotations

import asyncio
import functools
import json
import resource
import sys
import time

import numpy as np

from narun.errors import ConfigError
from narun.nn.utils import clip_coefficient
from narun.pipeline import StageModule, StageWork, make_schedule, plan_stages, run_actions
from narun.pipeline.links import StageLinks, StepIO
from narun.pipeline.partition import tied_names
from narun.pipeline.slices import slice_path, write_slice
from narun.runtime.buckets import plan_for
from narun.runtime.mailbox import Mailbox, new_id
from narun.runtime.spec import WorkerSpec
from narun.train import build_job, restore
from protocol import message, open_channel
from workers._job import JobActor, read_endpoints
from workers._stage_shard import StageShard
from workers.executor import CpuExecutor


class Stage(JobActor):
    role = "stage"

    def __init__(self, rank: int, spec: WorkerSpec) -> None:
        super().__init__(rank, spec)
        rt = self.cfg.runtime
        if rt.device not in ("cpu", "auto"):
            raise ConfigError(f"runtime.device: pipeline stages run on the cpu, got "
                              f"{rt.device!r}")
        self.job = build_job(self.cfg)
        self.start = restore(self.job, spec.resume) if spec.resume else 0
        self.stages, self.micro_batches = rt.stages, rt.micro_batches
        self.replicas = max(rt.workers, 1)
        self.stage, self.replica = rank % self.stages, rank // self.stages
        plan = plan_stages(self.job.model, self.stages)[self.stage]
        self.module = StageModule(self.job.model, plan)
        self.actions = make_schedule(rt.schedule, self.stages, self.micro_batches)[self.stage]
        self.tied = tied_names(self.job.model) if (
            self.stages > 1 and (plan.first or plan.last)) else ()
        self.delay = float(spec.delays.get(str(rank), 0.0))  # fault tests: a slow stage
        self.links: StageLinks | None = None
        self.executor: CpuExecutor | None = None
        self.shard: StageShard | None = None  # pipeline x data parallel only

    async def setup(self) -> None:
        assert self.context is not None
        self.executor = CpuExecutor(blas_threads=self.spec.blas_threads)
        self.links = StageLinks(self.context, self.stage, self.stages, self.fail,
                                host=self.spec.host, curve_server=self.curve_server(),
                                curve_client=self.curve_client(), step=self.start)
        sys.stdout.write(json.dumps({"endpoint": self.links.endpoint}) + "\n")
        sys.stdout.flush()
        if self.spec.stage_names is not None:  # the coordinator sends the shards' first
            await self._open_shard(await read_endpoints("stage", "shard_endpoints"))
        p, j = self.stages, self.replica
        self.links.connect((await read_endpoints("stage", "stage_endpoints"))[j * p:(j + 1) * p])

    async def _open_shard(self, endpoints: list[str]) -> None:
        assert self.context is not None and self.executor is not None
        channel = open_channel(self.context, "dealer", connect=endpoints[self.stage],
                               identity=f"stage-{self.rank}".encode(),
                               curve=self.curve_client())
        mailbox = Mailbox(channel, f"ps {self.stage}", watch=True, on_error=self.fail).start()
        model = self.job.model
        plan = plan_for(model, 1, self.spec.bucket_bytes, self.spec.stage_names)
        uncounted = self.tied if self.module.plan.last else ()
        self.shard = StageShard(mailbox, plan, self.stage, self.replica, list(model.parameters()),
                                uncounted, self.spec.wait_timeout, self.executor.run)

    async def teardown(self) -> None:
        if self.shard is not None:
            self.shard.shard.close()
        if self.links is not None:
            self.links.close()
        if self.executor is not None:
            await self.executor.aclose()

    def on_leave(self) -> None:
        # The others cannot finish a step without this stage: keep stepping, and ask the
        # coordinator to drain the job, checkpoint it and restart it (it stops us when done).
        assert self.control is not None
        self.tasks.spawn(self.control.send(message(
            "shutdown", new_id(), reason=f"{self.name} got SIGTERM", drain=True)),
            "ask to leave")

    # -- the loop ----------------------------------------------------------------------
    async def main(self) -> None:
        t = self.cfg.training
        end = t.steps if self.spec.stop_at is None else min(t.steps, self.spec.stop_at)
        step = self.start
        if self.shard is not None:
            await self.shard.pull(step)
        while step < end and not self.stopping:
            if self.delay:
                await asyncio.sleep(self.delay)
            t0 = time.perf_counter()
            work = await self._step(step)
            step += 1
            self.step = step
            if self.shard is None and self._keeps(step, end):  # else the shards keep it
                await asyncio.get_running_loop().run_in_executor(None, self._write_slice, step)
            assert self.control is not None
            await self.control.send(message(
                "step_done", new_id(), step=step, rank=self.rank,
                loss=work.loss if self.module.plan.last else 0.0, samples=t.batch_size,
                timings={"compute": time.perf_counter() - t0, "busy": work.busy,
                         "held": float(work.peak_held), "rss_mb": peak_rss_mb()}))

    async def _step(self, step: int) -> StageWork:
        assert self.links is not None and self.executor is not None
        self.links.begin(step)
        x, y = self.job.batch(step)
        if self.replicas > 1:  # this replica's share of the batch
            rows = len(x) // self.replicas
            x, y = (a[self.replica * rows:(self.replica + 1) * rows] for a in (x, y))
        work = StageWork(self.module, self.micro_batches)
        await run_actions(work, self.actions, StepIO(self.links, step, x, y,
                                                     self.micro_batches), self.executor.run)
        if self.tied:
            await self._sum_tied(step)
        clip = bool(self.cfg.training.grad_clip)
        if self.shard is not None:  # the shard steps: waiting for it is not this stage's work
            await self.shard.step(step, functools.partial(self._global_norm, step)
                                  if clip else None)
            self._advance()
            return work
        scale = await self._clip_scale(step, work) if clip else 1.0
        began = time.perf_counter()
        await self.executor.run(self._apply, scale)
        work.busy += time.perf_counter() - began  # the optimizer's step is work, not bubble
        return work

    async def _sum_tied(self, step: int) -> None:
        assert self.links is not None
        params = self.module.parameters
        await self.links.send_tied(step, {n: params[n].grad.data for n in self.tied})
        other = await self.links.recv_tied(step)
        for name in self.tied:
            params[name].grad.data += other[name]

    async def _clip_scale(self, step: int, work: StageWork) -> float:
        """The factor every stage scales its gradients by, from the global norm as one
        process's clip_grad_norm_ takes it (a dot product a parameter, summed as Python
        floats). The tied weight counts once (on the first stage), as in one process."""
        began = time.perf_counter()
        last = self.module.plan.last
        sq = 0.0
        for name, p in self.module.parameters.items():
            if p.grad is not None and not (last and name in self.tied):
                g = p.grad.data.reshape(-1)
                sq += float(np.dot(g, g))
        work.busy += time.perf_counter() - began  # computing is work; the answer's wait not
        norm = await self._global_norm(step, sq)
        return clip_coefficient(norm, self.cfg.training.grad_clip)

    async def _global_norm(self, step: int, sq: float) -> float:
        """The coordinator's answer for `step`, given this stage's squared norm `sq`: the
        norm of every stage's."""
        assert self.control is not None
        answer = await self.control.call(
            message("grad_norm", new_id(), step=step, sq=sq),
            timeout=self.spec.wait_timeout, what=f"the global gradient norm of step {step}")
        return float(answer["norm"])

    def _apply(self, scale: float) -> None:
        job = self.job
        if scale != 1.0:
            with np.errstate(invalid="ignore"):  # a non-finite norm scales by nan, as torch
                for p in self.module.parameters.values():
                    if p.grad is not None:
                        p.grad.data *= scale
        job.optimizer.step()
        job.optimizer.zero_grad()
        self._advance()

    def _advance(self) -> None:
        """The schedule's and the sampler's position, as a checkpoint records them."""
        job = self.job
        job.scheduler.step()
        if not job.text:
            job.sampler.next_batch()

    # -- slices ------------------------------------------------------------------------
    def _keeps(self, step: int, end: int) -> bool:
        t = self.cfg.training
        return (step == end or self.stopping
                or bool(t.eval_every and step % t.eval_every == 0)
                or bool(t.checkpoint_every and step % t.checkpoint_every == 0))

    def _write_slice(self, step: int) -> None:
        assert self.spec.staging is not None, "the coordinator names the staging directory"
        write_slice(slice_path(self.spec.staging, step, self.rank), step,
                    self.module.parameters, self.job.optimizer)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB): what its activations cost shows
    as the difference between schedules."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
