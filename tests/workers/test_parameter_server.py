"""A parameter-server shard's ps-sync clipping exchange, driven in this process through its
handlers: the held step, the norm shares, applying once, and what restarted trainers get."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from narun.config import to_dict
from narun.runtime.mailbox import ReplyError
from narun.runtime.shard_start import write_init_state
from narun.runtime.spec import WorkerSpec
from narun.train import build_job
from protocol import message
from tests.integration.conftest import mlp_config
from workers.parameter_server import ParameterServer

CLIP, LR = 0.05, 0.5


def shard(blobs, tmp_path, grad_clip=CLIP) -> ParameterServer:
    """Shard 0 of 1 holding the MLP in one bucket; plain SGD at a constant lr, so a step
    is w - lr * grad."""
    cfg = mlp_config(blobs, tmp_path, "ps-sync", workers=2, shards=1, optimizer="sgd", lr=LR,
                     weight_decay=0.0, schedule="constant", warmup_steps=0,
                     grad_clip=grad_clip)
    init = write_init_state(build_job(cfg).model, tmp_path, values=True)
    spec = WorkerSpec(to_dict(cfg), coordinator="tcp://127.0.0.1:9", bucket_bytes=1 << 20,
                      wait_timeout=5.0, init_state=str(init))
    return ParameterServer(0, spec)


def push(ps, rank, step, grad):
    (key,) = ps.buckets
    return ps.on_push_grads(message("push_grads", rank * 1000 + step + 1, step=step,
                                    rank=rank, version=step, grads={key: grad}), None)


def apply(ps, rank, step, norm):
    return ps.on_apply_step(message("apply_step", 7, step=step, rank=rank, norm=norm), None)


def test_a_step_is_held_until_the_norm_arrives_then_applied_once_and_clipped(blobs, tmp_path):
    async def main():
        ps = shard(blobs, tmp_path)
        (b,) = ps.buckets.values()
        w0 = b.w.copy()
        rng = np.random.default_rng(0)
        g0, g1 = (rng.normal(0, 0.1, b.bucket.size).astype(np.float32) for _ in range(2))
        mean = (g0 + g1) / 2

        first = asyncio.ensure_future(push(ps, 0, 0, g0))
        await asyncio.sleep(0)
        assert not first.done()  # waits for trainer 1
        second = await push(ps, 1, 0, g1)
        first = await first
        sq = float(np.dot(mean, mean))
        for r in (first, second):
            assert r.type == "grad_norm" and r["step"] == 0
            assert r["sq"] == pytest.approx(sq, rel=1e-6)
        np.testing.assert_array_equal(b.w, w0)  # nothing applied before the norm
        again = await push(ps, 1, 0, g1 * 100)  # a restarted trainer's recomputation
        assert again["sq"] == first["sq"] and b.version == 0

        with pytest.raises(ReplyError, match="trainer 1 applies step 3"):
            await apply(ps, 1, 3, 1.0)
        norm = np.sqrt(sq)
        values = (await apply(ps, 0, 0, norm))["params"]
        coef = CLIP / (norm + 1e-6)
        assert coef < 0.5  # the test clips
        np.testing.assert_allclose(b.w, w0 - LR * coef * mean, rtol=1e-5, atol=1e-7)
        later = await apply(ps, 1, 0, norm)  # the other trainer's request: no second step
        assert later["version"] == 1 and b.version == 1
        np.testing.assert_array_equal(later["params"][b.bucket.key], values[b.bucket.key])

        late = await push(ps, 1, 0, g1)  # a replacement pushing the step just applied
        assert late.type == "grad_norm" and late["sq"] == first["sq"] and b.version == 1
        with pytest.raises(ReplyError, match="has not assembled step 1"):
            await apply(ps, 0, 1, norm)
    asyncio.run(main())


def test_without_clipping_a_push_is_answered_with_values_and_apply_step_refused(blobs,
                                                                                 tmp_path):
    async def main():
        ps = shard(blobs, tmp_path, grad_clip=None)
        (b,) = ps.buckets.values()
        w0 = b.w.copy()
        g = np.ones(b.bucket.size, np.float32)
        replies = await asyncio.gather(push(ps, 0, 0, g), push(ps, 1, 0, g))
        assert [r.type for r in replies] == ["params", "params"]
        np.testing.assert_allclose(b.w, w0 - LR, rtol=1e-6)
        with pytest.raises(ReplyError, match="apply_step is for ps-sync with training.grad_clip"):
            await apply(ps, 0, 0, 1.0)
    asyncio.run(main())
