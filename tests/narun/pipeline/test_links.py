"""Stages talking over ZeroMQ (StageLinks): a pipelined step over real sockets is one
process's step, tied gradients cross between the end stages, and messages of other steps
or of other kinds are dropped without stopping anything."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import zmq
import zmq.asyncio

from narun.pipeline import StageModule, StageWork, make_schedule, plan_stages, run_actions
from narun.pipeline.links import StageLinks, StepIO
from narun.runtime.mailbox import new_id
from protocol import message, open_channel
from tests.narun.pipeline.test_stages import batch, reference, small_gpt


async def _linked(p: int, errors: list):
    context = zmq.asyncio.Context()
    links = [StageLinks(context, s, p, errors.append) for s in range(p)]
    for link in links:
        link.connect([x.endpoint for x in links])
    return context, links


def _close(context, links):
    for link in links:
        link.close()
    context.destroy(linger=0)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_step_over_sockets_is_one_process_step_with_tied_gradients_summed(schedule):
    p, m = 3, 4
    model = small_gpt()
    x, y = batch(model)
    want_loss, want = reference(copy.deepcopy(model), x, y)
    plans = plan_stages(model, p)
    works = [StageWork(StageModule(copy.deepcopy(model), plan), m) for plan in plans]
    actions = make_schedule(schedule, p, m)
    errors: list = []

    async def run():
        context, links = await _linked(p, errors)
        try:
            await asyncio.gather(*(run_actions(w, actions[s], StepIO(links[s], 0, x, y, m))
                                   for s, w in enumerate(works)))
            # the end stages swap their tied gradients and each adds the other's
            ends = [works[0], works[-1]]
            mine = [{"wte.weight": w.module.parameters["wte.weight"].grad.numpy()}
                    for w in ends]
            await asyncio.gather(links[0].send_tied(0, mine[0]), links[-1].send_tied(0, mine[1]))
            got = await asyncio.gather(links[0].recv_tied(0), links[-1].recv_tied(0))
            for w, other in zip(ends, got):  # each end adds what the other sent
                w.module.parameters["wte.weight"].grad.data += other["wte.weight"]
        finally:
            _close(context, links)

    asyncio.run(run())
    assert errors == []
    assert works[-1].loss == pytest.approx(want_loss, rel=1e-12)
    for w in works:
        for name, param in w.module.parameters.items():
            np.testing.assert_allclose(param.grad.numpy(), want[name], rtol=1e-10,
                                       atol=1e-12, err_msg=f"stage {w.module.plan.index} {name}")
    # the tied copies got the same sum, so they stay identical after identical steps
    np.testing.assert_array_equal(works[0].module.parameters["wte.weight"].grad.numpy(),
                                  works[-1].module.parameters["wte.weight"].grad.numpy())


def test_messages_of_other_steps_and_kinds_are_dropped_and_the_stage_goes_on():
    errors: list = []

    async def run():
        context, links = await _linked(2, errors)
        stranger = open_channel(context, "dealer", connect=links[1].endpoint,
                                identity=b"stage-9")
        try:
            links[1].begin(5)
            data = np.arange(6.0).reshape(2, 3)
            for step in (3, 4, 7):  # a previous incarnation's, and too far ahead
                await stranger.send(message("activation", new_id(), step=step, micro_batch=0,
                                            data=data))
            await stranger.send(message("heartbeat", new_id(), role="stage", rank=0, step=1,
                                        time=0.0))
            stranger.socket.send_multipart([b"garbage"])
            await links[0].send_act(6, 1, data + 1)  # the next step's: kept
            await links[0].send_act(5, 0, data)
            got = await asyncio.wait_for(links[1].recv_act(5, 0), 5)
            ahead = await asyncio.wait_for(links[1].recv_act(6, 1), 5)
            np.testing.assert_array_equal(got, data)
            np.testing.assert_array_equal(ahead, data + 1)
            # the stranger's frames arrive in its send order, but not ordered against the
            # other stage's: wait (bounded) for the garbage behind its dropped activations
            for _ in range(500):
                if links[1].dropped == 3 and links[1].inbox.refused == 1:
                    break
                await asyncio.sleep(0.01)
            assert links[1].dropped == 3
            assert links[1].inbox.refused == 1
        finally:
            stranger.close()
            _close(context, links)

    asyncio.run(run())
    assert errors == []


@pytest.mark.parametrize("start", [0, 5])
def test_a_stage_that_starts_late_keeps_what_came_for_its_first_step(start):
    """After a rollback to step 5, a neighbour may send step 5's activations before this
    stage has begun step 5: the links made for a start at 5 keep them."""
    errors: list = []

    async def run():
        context = zmq.asyncio.Context()
        links = [StageLinks(context, s, 2, errors.append, step=start) for s in range(2)]
        for link in links:
            link.connect([x.endpoint for x in links])
        try:
            data = np.arange(6, dtype=np.float32).reshape(2, 3)
            await links[0].send_act(start, 0, data)
            await asyncio.sleep(0.2)  # delivered before stage 1 begins its first step
            links[1].begin(start)
            got = await asyncio.wait_for(links[1].recv_act(start, 0), 5.0)
            np.testing.assert_array_equal(got, data)
            assert links[1].dropped == 0
        finally:
            _close(context, links)

    asyncio.run(run())
    assert errors == []
