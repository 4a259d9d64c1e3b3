"""A model cut into stages computes one process's step: the balanced split, and every stage's
loss and gradients (float64) against the whole model's, with each stage holding its own copy
of the model as a stage process does, and the tied embedding's two gradients summed."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest

import narun
from narun.errors import ConfigError
from narun.models import GPT, MLP, gpt_config
from narun.pipeline.partition import StageModule, plan_stages, tied_names, units
from narun.pipeline.runner import run_actions
from narun.pipeline.schedule import gpipe, one_f_one_b
from narun.pipeline.stage import StageWork
from narun.tensor import Tensor


def small_gpt(seed: int = 0, **overrides) -> GPT:
    narun.manual_seed(seed)
    cfg = {"n_layer": 4, "n_head": 2, "n_embd": 16, "block_size": 8, "vocab_size": 32,
           **overrides}
    model = GPT(gpt_config("gpt2-tiny", **cfg))
    model.to(dtype=np.float64)
    rng = np.random.default_rng(seed)  # weights large enough that every term matters
    for p in model.parameters():
        p.data[...] = p.data + 0.3 * rng.standard_normal(p.shape)
    return model


def batch(model, rows: int = 8, seed: int = 1):
    rng = np.random.default_rng(seed)
    if isinstance(model, MLP):
        return rng.standard_normal((rows, model.sizes[0])), rng.integers(0, model.sizes[-1], rows)
    cfg = model.config
    x = rng.integers(0, cfg.vocab_size, (rows, cfg.block_size))
    return x, rng.integers(0, cfg.vocab_size, (rows, cfg.block_size))


def reference(model, x, y):
    """Loss and gradients of one process's step on the whole batch."""
    logits = model(narun.tensor(x))
    loss = StageModule.loss(logits, y)
    loss.backward()
    return loss.item(), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


class Queues:
    """In-memory FIFO channels between neighbouring stages, for one stage."""

    def __init__(self, s, acts, grads, x, y, m):
        self.s, self.acts, self.grads = s, acts, grads
        self.xs, self.ys = np.split(x, m), np.split(y, m)

    async def recv_act(self, i):
        got, data = await self.acts[self.s - 1].get()
        assert got == i
        return data

    async def send_act(self, i, data):
        self.acts[self.s].put_nowait((i, data))

    async def recv_grad(self, i):
        got, data = await self.grads[self.s].get()
        assert got == i
        return data

    async def send_grad(self, i, data):
        self.grads[self.s - 1].put_nowait((i, data))

    def micro_batch(self, i):
        return self.xs[i], self.ys[i]


def pipelined(model, p, m, schedule, x, y):
    """Each stage on its own deep copy of the model; returns (loss, {name: grad}) with
    tied gradients summed over the end stages, as the runtime does before stepping."""
    plans = plan_stages(model, p)
    copies = [copy.deepcopy(model) for _ in range(p)]
    works = [StageWork(StageModule(c, plan), m) for c, plan in zip(copies, plans)]
    actions = schedule(p, m)

    async def run():
        acts = [asyncio.Queue() for _ in range(p)]
        grads = [asyncio.Queue() for _ in range(p)]
        await asyncio.gather(*(run_actions(w, actions[s], Queues(s, acts, grads, x, y, m))
                               for s, w in enumerate(works)))

    asyncio.run(run())
    got = {}
    for w in works:
        for name, param in w.module.parameters.items():
            g = param.grad.numpy()
            got[name] = g if name not in got else got[name] + g  # a tied weight: the sum
    return works[-1].loss, got


@pytest.mark.parametrize("schedule", [gpipe, one_f_one_b], ids=["gpipe", "1f1b"])
@pytest.mark.parametrize("p", [2, 3])
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_a_pipelined_gpt_step_is_one_process_step(schedule, p, position):
    model = small_gpt(position=position, norm="rmsnorm" if position == "rope" else "layernorm")
    x, y = batch(model)
    want_loss, want = reference(copy.deepcopy(model), x, y)
    loss, got = pipelined(model, p, 4, schedule, x, y)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    assert sorted(got) == sorted(want)  # every parameter has exactly one owner (tied: two)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12,
                                   err_msg=name)


def test_a_pipelined_mlp_step_is_one_process_step():
    narun.manual_seed(3)
    model = MLP([6, 12, 10, 8, 4], "gelu")
    model.to(dtype=np.float64)
    x, y = batch(model, rows=12)
    want_loss, want = reference(copy.deepcopy(model), x, y)
    loss, got = pipelined(model, 3, 3, one_f_one_b, x, y)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12,
                                   err_msg=name)


def test_the_tied_embedding_lives_on_both_end_stages_only():
    model = small_gpt()
    plans = plan_stages(model, 3)
    assert tied_names(model) == ("wte.weight",)
    holders = [plan.index for plan in plans if "wte.weight" in plan.names]
    assert holders == [0, 2]
    assert "wpe.weight" in plans[0].names and "ln_f.weight" in plans[2].names
    untied = small_gpt(tie_weights=False)
    assert tied_names(untied) == ()
    assert [p.index for p in plan_stages(untied, 3) if "wte.weight" in p.names] == [0]
    assert [p.index for p in plan_stages(untied, 3) if "lm_head.weight" in p.names] == [2]


def test_the_split_balances_the_estimated_cost():
    # 8 equal blocks over 2, 3, 4 stages; the last block also carries the head
    model = small_gpt(n_layer=8)
    assert [(p.first_unit, p.end_unit) for p in plan_stages(model, 2)] == [(0, 4), (4, 8)]
    assert [p.end_unit - p.first_unit for p in plan_stages(model, 4)] == [2, 2, 2, 2]
    sizes = [p.end_unit - p.first_unit for p in plan_stages(model, 3)]
    assert sorted(sizes) == [2, 3, 3] and sizes[-1] == 2  # the head's stage runs fewer blocks
    # an MLP's big first layer gets a stage of its own
    mlp = MLP([1000, 10, 10, 10, 10], "relu")
    assert [(p.first_unit, p.end_unit) for p in plan_stages(mlp, 2)] == [(0, 1), (1, 4)]
    assert units(mlp) == 4


def test_more_stages_than_blocks_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="the model has 4 blocks.*at most 4 stages"):
        plan_stages(small_gpt(), 5)


def test_a_stage_refuses_a_backward_before_its_forward():
    model = small_gpt()
    work = StageWork(StageModule(model, plan_stages(model, 2)[1]), 2)
    with pytest.raises(ConfigError, match="backward of micro-batch 0 before its forward"):
        work.backward(0, None)
    assert isinstance(work.module.forward(Tensor._wrap(np.zeros((1, 8, 16)))), Tensor)
