"""A data-parallel pipeline stage's exchange with its stage's parameter-server shard.

With runtime.workers r, each stage runs in r replicas, each on its share of every batch;
replica j of every stage forms pipeline j. Stage s's replicas average their gradients
through shard s, which holds the stage's parameters and optimizer state and steps them as
ps-sync does for trainers (workers/parameter_server.py): once all r replicas pushed a
bucket, the mean is applied once and every replica gets the new values.

With training.grad_clip the shard holds the step and answers each push with the squared
norm of the bucket's mean gradient. The stage adds up its buckets' (a tied embedding is in
both end stages' shards; the last stage leaves it out, so the norm counts it once, as one
process does), the coordinator adds every stage's (`grad_norm`) and answers with the
global norm, and `apply_step` asks the shard for the clipped step's values.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from narun.runtime.buckets import Bucket, Plan, pack_grads, unpack
from narun.runtime.mailbox import Mailbox, new_id
from protocol import Message, message

#: On the executor thread: run(fn, *args) -> fn's result
Run = Callable[..., Awaitable[Any]]


class StageShard:
    """Replica `replica` of a stage whose buckets (of `plan`) are shard `stage`'s. `params`
    are the model's parameters in model order (the plan's indices); only the stage's are
    read and written. `uncounted` names parameters this stage leaves out of the norm."""

    def __init__(self, shard: Mailbox, plan: Plan, stage: int, replica: int,
                 params: Sequence[Any], uncounted: Sequence[str], wait_timeout: float,
                 run: Run) -> None:
        self.shard, self.replica, self.params = shard, replica, list(params)
        self.buckets = plan.shard_buckets(stage)
        self.counted = [not all(p.name in uncounted for p in b.pieces) for b in self.buckets]
        self.bufs = [np.empty(b.size, np.float32) for b in self.buckets]
        self.wait_timeout, self.run = wait_timeout, run
        self.version = 0  # the version of the values the stage holds

    async def pull(self, version: int) -> None:
        """Load the stage's values at `version` (at least) from the shard."""
        msg = message("pull_params", new_id(), keys=[b.key for b in self.buckets],
                      min_version=version)
        answer = await self.shard.call(msg, timeout=self.wait_timeout, step=version,
                                       what=f"the stage's values at version >= {version}")
        await self.run(self._load, answer)

    async def step(self, step: int,
                   global_norm: Callable[[float], Awaitable[float]] | None) -> None:
        """Push this replica's gradients of `step`; load the values after the step. With
        `global_norm` (clipping), the stage's squared norm goes to it and the shard applies
        the step clipped by the norm it returns."""
        await self.run(self._pack)
        replies = await asyncio.gather(*(self._push(step, b, buf)
                                         for b, buf in zip(self.buckets, self.bufs)))
        if global_norm is not None:
            sq = sum(r["sq"] for r, counted in zip(replies, self.counted) if counted)
            norm = await global_norm(sq)
            msg = message("apply_step", new_id(), step=step, rank=self.replica, norm=norm)
            replies = [await self.shard.call(msg, timeout=self.wait_timeout, step=step,
                                             what=f"step {step} clipped by norm {norm:.6g}")]
        for answer in replies:
            await self.run(self._load, answer)

    async def _push(self, step: int, bucket: Bucket, buf: np.ndarray) -> Message:
        msg = message("push_grads", new_id(), step=step, rank=self.replica,
                      version=self.version, grads={bucket.key: buf})
        return await self.shard.call(msg, timeout=self.wait_timeout, step=step,
                                     what=f"the update of bucket {bucket.key} from "
                                          f"replica {self.replica}")

    def _pack(self) -> None:
        for b, buf in zip(self.buckets, self.bufs):  # the stage's own buckets only
            pack_grads(b, self.params, buf)
        for p in self.params:  # the shard steps the values; nothing accumulates here
            p.grad = None

    def _load(self, answer: Message) -> None:
        arrays = [p.data for p in self.params]
        by_key = {b.key: b for b in self.buckets}
        for key, flat in answer["params"].items():
            unpack(by_key[key], np.asarray(flat), arrays)
        self.version = answer["version"]
