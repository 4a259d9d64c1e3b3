"""A trainer's backward pass, run in this process: when each gradient bucket is handed to
the event loop to be pushed, and what it holds then."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from narun.config import to_dict
from narun.runtime.buckets import pack
from narun.runtime.spec import WorkerSpec
from narun.tensor._tensor import Tensor
from tests.integration.conftest import mlp_config
from workers.trainer import Trainer


class Recording(Trainer):
    """Records each bucket launch: which backward call it came in (counted from 1), whether
    that call had returned, and a copy of the packed gradient it hands to the push."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backwards = 0  # backward calls begun
        self.returned = 0  # backward calls that returned
        self.launches: list[tuple[int, int, bool, np.ndarray]] = []

    def _launch(self, b: int) -> None:
        super()._launch(b)
        self.launches.append((b, self.backwards, self.returned == self.backwards,
                              self.bufs[b].copy()))


@pytest.mark.parametrize("mode, grad_clip, grad_accum, streams", [
    ("ps-sync", None, 1, True),
    ("ps-sync", None, 2, True),  # the last micro-batch's backward streams
    ("ps-sync", 0.05, 1, True),  # the shards clip: the trainer streams
    ("ps-async", None, 2, True),
    ("ps-async", 0.05, 1, False),  # the trainer clips its own gradient: needs it whole
])
def test_buckets_are_pushed_while_backward_runs(blobs, tmp_path, monkeypatch, mode, grad_clip,
                                                grad_accum, streams):
    """README: "Trainers push each bucket's gradient as soon as backward has produced it".
    The MLP in 512-byte buckets has 6; streaming, every bucket is launched inside the last
    backward call (the first one before it returns), never inside an earlier micro-batch's
    (its gradient is partial), and each launch holds the bucket's final gradient. In
    ps-async with grad_clip the trainer clips first, so it launches only after backward."""
    cfg = mlp_config(blobs, tmp_path, mode, workers=2, shards=2, grad_clip=grad_clip,
                     grad_accum=grad_accum)
    spec = WorkerSpec(to_dict(cfg), coordinator="tcp://127.0.0.1:9", bucket_bytes=512,
                      wait_timeout=5.0)
    trainer = Recording(0, spec)
    assert len(trainer.plan.buckets) >= 4  # several buckets, so "the first" means something
    loop = asyncio.new_event_loop()  # _launch hands each push to it; it never runs here
    trainer._loop = loop
    original = Tensor.backward

    def backward(self, *args, **kwargs):
        trainer.backwards += 1
        original(self, *args, **kwargs)
        trainer.returned += 1

    monkeypatch.setattr(Tensor, "backward", backward)
    x, y = trainer.job.batch(0)
    try:
        trainer._compute(x[:trainer.local_batch], y[:trainer.local_batch])
    finally:
        loop.close()

    assert trainer.backwards == grad_accum
    launched = [b for b, *_ in trainer.launches]
    assert sorted(launched) == list(range(len(trainer.plan.buckets))), launched  # each once
    during = [not done for _, _, done, _ in trainer.launches]
    if streams:
        assert all(during), "a bucket was launched after backward returned"
        assert {call for _, call, _, _ in trainer.launches} == {grad_accum}, \
            "a bucket was launched during an earlier micro-batch's backward"
    else:
        assert not any(during), "a bucket was launched before the local clip"
    grads = [p.grad.data for p in trainer.params]
    for b, _, _, sent in trainer.launches:
        final = pack(trainer.plan.buckets[b], grads, np.empty_like(sent))
        np.testing.assert_array_equal(sent, final, err_msg=f"bucket {b} pushed {sent} "
                                                           f"but its gradient is {final}")


@pytest.mark.parametrize("grad_accum", [2, 3])
def test_accumulated_micro_batches_give_the_local_batchs_gradient(blobs, tmp_path, grad_accum):
    """The gradient a trainer pushes after grad_accum micro-batches is the gradient of the
    mean loss over its whole share of the batch (6 samples of 12), to float32 rounding."""
    cfg = mlp_config(blobs, tmp_path, "ps-sync", workers=2, shards=2, grad_accum=grad_accum)
    spec = WorkerSpec(to_dict(cfg), coordinator="tcp://127.0.0.1:9", bucket_bytes=512,
                      wait_timeout=5.0)
    trainer = Recording(0, spec)
    loop = asyncio.new_event_loop()
    trainer._loop = loop
    x, y = trainer.job.batch(0)
    x, y = x[:trainer.local_batch], y[:trainer.local_batch]
    try:
        loss = trainer._compute(x, y)
    finally:
        loop.close()
    pushed = [p.grad.data.copy() for p in trainer.params]
    trainer.job.optimizer.zero_grad()
    whole = trainer.job.loss(x, y)
    whole.backward()  # not streamed: _compute is over
    assert loss == pytest.approx(whole.item(), rel=1e-6)
    for p, got in zip(trainer.params, pushed):
        scale = np.abs(p.grad.data).max()
        assert scale > 0
        np.testing.assert_allclose(got, p.grad.data, rtol=1e-5, atol=1e-6 * scale)
