"""A ps-sync shard keeps the values after eval and checkpoint steps (snapshots) until the
coordinator takes them, and never more than MAX_SNAPSHOTS of them: trainers that run
ahead of a slow coordinator wait instead of piling up copies of the model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from narun.config import to_dict
from narun.errors import WaitTimeout
from narun.runtime.shard_start import write_init_state
from narun.runtime.spec import WorkerSpec
from narun.train import build_job
from protocol import message
from tests.integration.conftest import mlp_config
from workers.parameter_server import MAX_SNAPSHOTS, ParameterServer


def shard(blobs, tmp_path, wait_timeout=5.0) -> ParameterServer:
    """Shard 0 of 1 (one bucket) for 2 trainers; every step is an eval step."""
    cfg = mlp_config(blobs, tmp_path, "ps-sync", workers=2, shards=1, steps=50, eval_every=1)
    init = write_init_state(build_job(cfg).model, tmp_path, values=True)
    spec = WorkerSpec(to_dict(cfg), coordinator="tcp://127.0.0.1:9", bucket_bytes=1 << 20,
                      wait_timeout=wait_timeout, init_state=str(init))
    return ParameterServer(0, spec)


def step(ps, step_):
    """Both trainers push `step_`."""
    (key,) = ps.buckets
    grad = np.full(ps.buckets[key].bucket.size, 0.01, np.float32)
    return asyncio.gather(*(ps.on_push_grads(message(
        "push_grads", 100 * step_ + rank + 1, step=step_, rank=rank, version=step_,
        grads={key: grad}), None) for rank in (0, 1)))


def eval_pull(ps, version):
    return ps.on_pull_params(message("pull_params", 9, keys=[], min_version=version), None)


def test_pushes_wait_while_the_snapshots_wait_for_the_coordinator(blobs, tmp_path):
    async def main():
        ps = shard(blobs, tmp_path)
        (b,) = ps.buckets.values()
        for s in range(MAX_SNAPSHOTS):
            await step(ps, s)
        assert sorted(b.snapshots) == list(range(1, MAX_SNAPSHOTS + 1))
        held = asyncio.ensure_future(step(ps, MAX_SNAPSHOTS))
        await asyncio.sleep(0.05)
        assert not held.done() and b.version == MAX_SNAPSHOTS
        values = b.snapshots[1][0].copy()
        taken = await eval_pull(ps, 1)  # the coordinator evaluates step 1
        np.testing.assert_array_equal(taken["params"][b.bucket.key], values)
        await asyncio.wait_for(held, 2.0)
        assert b.version == MAX_SNAPSHOTS + 1
        assert len(b.snapshots) == MAX_SNAPSHOTS
    asyncio.run(main())


def test_a_coordinator_that_never_takes_them_is_named_in_the_timeout(blobs, tmp_path):
    async def main():
        ps = shard(blobs, tmp_path, wait_timeout=0.3)
        for s in range(MAX_SNAPSHOTS):
            await step(ps, s)
        with pytest.raises(WaitTimeout, match=r"bucket b0 waited 0.3 s for the coordinator "
                                              r"to take the snapshots of steps \[1, 2\]"):
            await step(ps, MAX_SNAPSHOTS)
    asyncio.run(main())
