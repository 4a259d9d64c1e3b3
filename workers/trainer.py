"""A data-parallel trainer: pulls parameters, runs forward/backward on its share of each
global batch in the device executor, and streams gradient buckets to their shards while
backward is still running.

Each parameter has a post-accumulate-grad hook. Backward finishes parameters last layer
first; when every parameter touching a bucket is final, the hook (on the executor thread)
packs the bucket into its send buffer and hands it to the event loop, which pushes it at
once: communication of the last layers overlaps backward of the first. The shard answers
each push with the bucket's new values (ps-sync: once every trainer pushed; ps-async: at
once, or `stale`, after which the trainer re-pulls and recomputes the step).

Where a trainer is in the job comes from the shards in ps-sync: its next step is the oldest
version among its buckets, so a restarted trainer rejoins at the step the others are
waiting for (its pushes for buckets already past it are answered, not applied). In ps-async
each trainer counts its own steps; a restarted one starts where the coordinator says its
predecessor stopped (`spec.start_step`).

On a GPU (`runtime.device` cuda:N, or auto where CuPy sees one) the model lives on the
device; each bucket is packed there and copied to the host once (pinned), and the shards'
values are copied back once per bucket before they are unpacked into the parameters.

With training.grad_clip, ps-sync clips by the norm of the mean gradient, which no process
holds whole: each push is answered with its bucket's share of the squared norm, and once
all are in, the trainer sends every shard the total and gets the clipped step's values
back (one more round trip per step). In ps-async the trainer clips its own gradient as one
process would, so its pushes wait for the end of backward.

Timings per step (seconds): compute (forward + backward + packing), push (the part of
communication overlapped with backward: first bucket sent -> backward done), wait (backward
done -> last reply), pull (copying the new values into the model); and within compute, pack
(copying gradients into the buckets) and tail (backward after the last bucket left: what
could not overlap).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np
import structlog

from narun.errors import ConfigError, Refused, WaitTimeout
from narun.nn.utils import clip_grad_norm_, load_buffers, persistent_buffers
from narun.runtime.buckets import pack_grads, plan_for, unpack
from narun.runtime.mailbox import Mailbox, new_id
from narun.runtime.spec import WorkerSpec
from narun.tensor import _backend
from narun.tensor._backend import get_array_module
from narun.train import build_job, restore
from protocol import Message, message, open_channel
from workers._job import JobActor, read_endpoints
from workers.executor import CpuExecutor, make_executor, training_device

log = structlog.get_logger("workers.trainer")

MAX_STALE_RETRIES = 100  # re-pulls of one step before giving up (ps-async)


class Trainer(JobActor):
    role = "trainer"

    def __init__(self, rank: int, spec: WorkerSpec) -> None:
        super().__init__(rank, spec)
        rt, t = self.cfg.runtime, self.cfg.training
        # The whole job, seeded like every process's; its values are replaced by the
        # shards' before the first step.
        self.job = build_job(self.cfg)
        self.start = restore(self.job, spec.resume) if spec.resume else 0
        self.plan = plan_for(self.job.model, rt.ps_shards, spec.bucket_bytes)
        self.world = rt.workers
        self.sync = rt.mode == "ps-sync"
        self.clip = t.grad_clip or None
        self.local_batch = t.batch_size // self.world
        if self.local_batch % t.grad_accum:
            raise ConfigError(f"training.grad_accum: {t.grad_accum} does not divide the "
                             f"per-trainer batch {self.local_batch} (batch_size {t.batch_size} "
                             f"/ {self.world} workers)")
        self.params = list(self.job.model.parameters())
        # Trainer 0's running statistics (BatchNorm) are the job's: each trainer keeps its
        # own, as DDP without SyncBatchNorm does, and the coordinator evaluates and
        # checkpoints with the ones trainer 0 reports after each step.
        self.sends_buffers = rank == 0 and bool(persistent_buffers(self.job.model))
        self.buckets_of = self.plan.buckets_of()
        self.counts = [len(b.pieces) for b in self.plan.buckets]
        self.bufs = [np.empty(b.size, np.float32) for b in self.plan.buckets]
        self.versions = [self.start] * len(self.plan.buckets)
        self.delay = float(spec.delays.get(str(rank), 0.0))
        self.shards: list[Mailbox] = []
        self.executor: Any = None
        self.dev_bufs: list[Any] | None = None  # packing buffers on a GPU or MLX
        self.xp: Any = np  # the engine's array module there
        self.stale = 0
        self._pending: list[int] = []
        self._streaming = False
        self._step_in_flight = 0
        self._pushes: list[asyncio.Task[tuple[int, Message]]] = []
        self._first_push = 0.0
        self._pack_s = 0.0  # this step's packing, on the executor thread
        self._last_launch = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        for j, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(lambda _t, j=j: self._grad_ready(j))

    async def setup(self) -> None:
        assert self.context is not None
        self._loop = asyncio.get_running_loop()
        device = training_device(self.cfg.runtime.device, self.cfg.runtime.mode)
        self.executor = (CpuExecutor(blas_threads=self.spec.blas_threads) if device == "cpu"
                         else make_executor(device))
        if device != "cpu":
            await self.executor.run(self._to_device, device)
        endpoints = self.spec.shard_endpoints or await read_endpoints("trainer", "shard_endpoints")
        for k, endpoint in enumerate(endpoints):
            channel = open_channel(self.context, "dealer", connect=endpoint,
                                   identity=f"trainer-{self.rank}".encode(),
                                   curve=self.curve_client())
            self.shards.append(Mailbox(channel, f"ps {k}", watch=True,
                                       on_error=self.fail).start())

    async def teardown(self) -> None:
        for tasks in self._pushes:
            tasks.cancel()
        for shard in self.shards:
            shard.close()
        if self.executor is not None:
            await self.executor.aclose()

    # -- the loop ----------------------------------------------------------------------
    async def main(self) -> None:
        reported = self.welcome.get("buffers") if self.welcome is not None else None
        if self.sends_buffers and reported:  # trainer 0, replaced: on from its statistics
            load_buffers(self.job.model, reported)
        await self._pull(range(len(self.plan.buckets)), self.start)
        steps = self.cfg.training.steps
        if self.spec.stop_at is not None:
            steps = min(steps, self.spec.stop_at)
        step = min(self.versions) if self.sync else (self.spec.start_step or self.start)
        while step < steps and not self.stopping:
            self._step_in_flight = step
            x, y = self.job.batch(step)
            lo = self.rank * self.local_batch
            x, y = x[lo:lo + self.local_batch], y[lo:lo + self.local_batch]
            if self.delay:
                await asyncio.sleep(self.delay)  # fault injection: a slow trainer (tests)
            for _attempt in range(MAX_STALE_RETRIES):
                done = await self._step_once(step, x, y)
                if done is not None:
                    break
                self.stale += 1
                await self._pull(range(len(self.plan.buckets)), 0)
            else:
                raise WaitTimeout(f"trainer {self.rank}: step {step} was refused as stale "
                                  f"{MAX_STALE_RETRIES} times; raise runtime.max_staleness")
            loss, timings = done
            step = min(self.versions) if self.sync else step + 1
            self.step = step
            timings["stale"] = self.stale
            extra = {}
            if self.sends_buffers:  # copied: the next step updates them while this is sent
                extra["buffers"] = {k: np.array(v.numpy())
                                    for k, v in persistent_buffers(self.job.model).items()}
            assert self.control is not None
            await self.control.send(message(
                "step_done", new_id(), step=step, rank=self.rank, loss=loss,
                samples=self.local_batch, timings=timings, **extra))

    async def _step_once(self, step: int, x: np.ndarray,
                         y: np.ndarray) -> tuple[float, dict[str, float]] | None:
        """One forward/backward with streamed pushes; None when a push was stale."""
        t0 = time.perf_counter()
        self._pushes = []
        self._first_push = self._pack_s = self._last_launch = 0.0
        loss = await self.executor.run(self._compute, x, y)
        t1 = time.perf_counter()
        results = await asyncio.gather(*self._pushes, return_exceptions=True)
        self._pushes = []
        stale = False
        replies = []
        for r in results:
            if isinstance(r, Refused) and r.code == "stale":
                stale = True
            elif isinstance(r, BaseException):
                raise r
            else:
                replies.append(r)
        if self.clip and self.sync:
            replies = await self._apply_clipped(step, replies)
        t2 = time.perf_counter()
        await self.executor.run(self._load, replies)
        t3 = time.perf_counter()
        if stale:
            return None
        push = t1 - self._first_push if self._first_push else 0.0
        tail = t1 - self._last_launch if self._last_launch else 0.0
        return loss, {"compute": t1 - t0, "push": push, "wait": t2 - t1, "pull": t3 - t2,
                      "pack": self._pack_s, "tail": tail}

    def _compute(self, x: np.ndarray, y: np.ndarray) -> float:
        """Forward and backward on the executor thread; the hooks launch the pushes."""
        job, accum = self.job, self.cfg.training.grad_accum
        job.optimizer.zero_grad()
        micro = len(x) // accum
        total = 0.0
        for i in range(accum):
            # gradients are final in the last backward; a local clip needs all of them first
            self._streaming = i == accum - 1 and not (self.clip and not self.sync)
            self._pending = list(self.counts)
            loss = job.loss(x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro])
            (loss / accum).backward() if accum > 1 else loss.backward()
            total += loss.item() / accum
        self._streaming = False
        # MLX is lazy: BatchNorm statistics would chain every step's update until read
        _backend.settle(b.data for b in job.model.buffers())
        if self.clip and not self.sync:
            clip_grad_norm_(self.params, self.clip)
        for b, left in enumerate(self._pending):  # parameters the loss did not reach
            if left:
                self._pending[b] = 0
                self._launch(b)
        return total

    def _grad_ready(self, j: int) -> None:
        if not self._streaming:
            return
        for b in self.buckets_of[j]:
            self._pending[b] -= 1
            if self._pending[b] == 0:
                self._launch(b)

    def _to_device(self, device: str) -> None:
        """On the executor thread: the model, the batches and the packing buffers there."""
        self.job.model.to(device)
        self.job.device = device
        self.xp = xp = get_array_module(self.params[0].data)
        self.dev_bufs = [xp.empty(b.size, xp.float32) for b in self.plan.buckets]

    def _launch(self, b: int) -> None:
        t0 = time.perf_counter()
        bucket = self.plan.buckets[b]
        if self.dev_bufs is None:
            pack_grads(bucket, self.params, self.bufs[b])
        else:  # one device-to-host copy per bucket; the message owns the host array
            self.bufs[b] = self.executor.to_host(pack_grads(bucket, self.params,
                                                            self.dev_bufs[b]))
        self._last_launch = time.perf_counter()
        self._pack_s += self._last_launch - t0
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._start_push, b)

    def _start_push(self, b: int) -> None:
        if not self._first_push:
            self._first_push = time.perf_counter()
        self._pushes.append(asyncio.ensure_future(self._push(b, self._step_in_flight)))

    async def _push(self, b: int, step: int) -> tuple[int, Message]:
        bucket = self.plan.buckets[b]
        msg = message("push_grads", new_id(), step=step, rank=self.rank,
                      version=self.versions[b], grads={bucket.key: self.bufs[b]})
        reply = await self.shards[bucket.shard].call(
            msg, timeout=self.spec.wait_timeout, step=step,
            what=f"the update of bucket {bucket.key} from trainer {self.rank}")
        return b, reply

    async def _apply_clipped(self, step: int,
                             pushed: list[tuple[int, Message]]) -> list[tuple[int, Message]]:
        """ps-sync clipping: the global norm from the buckets' shares, sent to every shard,
        which applies the step and answers all its buckets."""
        sq = [0.0] * len(self.plan.buckets)
        for b, r in pushed:
            sq[b] = r["sq"]
        norm = math.sqrt(sum(sq))  # summed in bucket order: every trainer gets the same

        async def one(k: int) -> list[tuple[int, Message]]:
            msg = message("apply_step", new_id(), step=step, rank=self.rank, norm=norm)
            r = await self.shards[k].call(msg, timeout=self.spec.wait_timeout, step=step,
                                          what=f"step {step} clipped by norm {norm:.6g}")
            return [(b.index, r) for b in self.plan.shard_buckets(k)]

        applied = await asyncio.gather(*(one(k) for k in range(len(self.shards))))
        return [pair for pairs in applied for pair in pairs]

    async def _pull(self, indices: Any, min_version: int) -> None:
        async def one(b: int) -> tuple[int, Message]:
            bucket = self.plan.buckets[b]
            msg = message("pull_params", new_id(), keys=[bucket.key], min_version=min_version)
            return b, await self.shards[bucket.shard].call(
                msg, timeout=self.spec.wait_timeout, step=self._step_in_flight,
                what=f"bucket {bucket.key} at version >= {min_version}")

        replies = await asyncio.gather(*(one(b) for b in indices))
        await self.executor.run(self._load, replies)

    def _load(self, replies: list[tuple[int, Message]]) -> None:
        arrays = [p.data for p in self.params]
        for b, reply in replies:
            bucket = self.plan.buckets[b]
            flat = reply["params"][bucket.key]
            if self.dev_bufs is not None:  # (the engine's array: MLX's is wrapped)
                flat = self.xp.asarray(self.executor.to_device(np.asarray(flat)))
            unpack(bucket, flat, arrays)
            self.versions[b] = reply["version"]
