"""Pipeline schedules: the generators' exact action lists, validate's refusals (each naming
the stage and action), simulate's makespan / bubble / peak activations against the closed
forms, and check_pipeline's refusals naming the fix."""

from __future__ import annotations

import re

import pytest

from narun.errors import ConfigError
from narun.pipeline import (
    Action,
    ScheduleError,
    check_pipeline,
    gpipe,
    make_schedule,
    one_f_one_b,
    simulate,
    validate,
)

SIZES = [(p, m) for p in range(1, 5) for m in range(1, 9)]


def _stage(text: str) -> list[Action]:
    """'recv_act 0, forward 0, step' -> the actions."""
    actions = []
    for item in text.split(","):
        kind, *i = item.split()
        actions.append(Action(kind, int(i[0])) if i else Action(kind))
    return actions


def _text(actions: list[Action]) -> str:
    return ", ".join(map(str, actions))


def _refused(schedules: list[list[Action]], m: int, message: str) -> None:
    with pytest.raises(ScheduleError, match=re.escape(message)):
        validate(schedules, m)


# -- actions and generators ---------------------------------------------------------------

def test_action_text_and_refusals():
    assert str(Action("forward", 3)) == "forward 3"
    assert str(Action("recv_act", 2)) == "recv_act 2"
    assert str(Action("step")) == "step"
    with pytest.raises(ScheduleError, match="must be one of forward, backward"):
        Action("fwd", 0)
    with pytest.raises(ScheduleError, match="micro-batch must be >= 0, got -1"):
        Action("forward")
    with pytest.raises(ScheduleError, match="step: takes no micro-batch"):
        Action("step", 0)
    assert issubclass(ScheduleError, ConfigError)


def test_gpipe_action_lists():
    s0, s1 = gpipe(2, 2)
    assert _text(s0) == ("forward 0, send_act 0, forward 1, send_act 1, "
                         "recv_grad 0, backward 0, recv_grad 1, backward 1, step")
    assert _text(s1) == ("recv_act 0, forward 0, recv_act 1, forward 1, "
                         "backward 0, send_grad 0, backward 1, send_grad 1, step")
    assert _text(gpipe(1, 2)[0]) == "forward 0, forward 1, backward 0, backward 1, step"


def test_one_f_one_b_action_lists():
    s0, s1, s2 = (_text(s) for s in one_f_one_b(3, 3))
    assert s0 == ("forward 0, send_act 0, forward 1, send_act 1, "
                  "forward 2, send_act 2, recv_grad 0, backward 0, "
                  "recv_grad 1, backward 1, recv_grad 2, backward 2, step")
    assert s1 == ("recv_act 0, forward 0, send_act 0, "
                  "recv_act 1, forward 1, send_act 1, recv_grad 0, backward 0, send_grad 0, "
                  "recv_act 2, forward 2, send_act 2, recv_grad 1, backward 1, send_grad 1, "
                  "recv_grad 2, backward 2, send_grad 2, step")
    assert s2 == ("recv_act 0, forward 0, backward 0, send_grad 0, "
                  "recv_act 1, forward 1, backward 1, send_grad 1, "
                  "recv_act 2, forward 2, backward 2, send_grad 2, step")


@pytest.mark.parametrize("p, m", [(p, m) for p, m in SIZES if m >= p])
def test_one_f_one_b_warmup_is_p_minus_s_minus_1_then_alternates(p, m):
    for s, actions in enumerate(one_f_one_b(p, m)):
        compute = [(a.kind[0].upper(), a.micro_batch) for a in actions
                   if a.kind in ("forward", "backward")]
        warmup = p - s - 1
        expected = [("F", i) for i in range(warmup)]
        for k in range(m - warmup):
            expected += [("F", warmup + k), ("B", k)]
        expected += [("B", k) for k in range(m - warmup, m)]
        assert compute == expected


@pytest.mark.parametrize("p, m", SIZES + [(6, 6), (5, 13), (8, 3)])
def test_generated_schedules_validate(p, m):
    validate(gpipe(p, m), m)
    assert make_schedule("gpipe", p, m) == gpipe(p, m)
    if m >= p:
        validate(one_f_one_b(p, m), m)
        assert make_schedule("1f1b", p, m) == one_f_one_b(p, m)


def test_generators_refuse_bad_sizes():
    with pytest.raises(ScheduleError, match="got 2 micro-batches for 3 stages; raise "
                       "micro-batches to at least 3 or use gpipe"):
        one_f_one_b(3, 2)
    with pytest.raises(ScheduleError, match="stages: must be >= 1, got 0"):
        gpipe(0, 4)
    with pytest.raises(ScheduleError, match="micro-batches: must be >= 1, got 0"):
        gpipe(2, 0)
    with pytest.raises(ScheduleError, match="must be one of gpipe, 1f1b, got 'zb'"):
        make_schedule("zb", 2, 2)


# -- validate's refusals ------------------------------------------------------------------

def test_backward_before_forward():
    _refused([_stage("backward 0, forward 0, step")], 1,
             "stage 0, action 0 (backward 0): its forward 0 has not run")


def test_missing_micro_batch():
    _refused([_stage("forward 0, backward 0, step")], 2,
             "stage 0: no forward of micro-batch(es) 1")
    _refused([_stage("forward 0, forward 1, backward 1, step")], 2,
             "stage 0: no backward of micro-batch(es) 0")


def test_duplicated_micro_batch():
    _refused([_stage("forward 0, backward 0, forward 0, backward 0, step")], 1,
             "stage 0, action 2 (forward 0): forward 0 already ran")


def test_micro_batch_out_of_range():
    _refused([_stage("forward 0, backward 0, forward 1, backward 1, step")], 1,
             "stage 0, action 2 (forward 1): micro-batch out of range, there are 1 (0..0)")


def test_step_not_last_and_missing():
    _refused([_stage("forward 0, step, backward 0")], 1,
             "stage 0, action 1 (step): step must be the stage's last action, "
             "1 action(s) follow it")
    _refused([_stage("forward 0, backward 0, step, step")], 1,
             "stage 0, action 2 (step): step must be the stage's last action")
    _refused([_stage("forward 0, backward 0")], 1, "stage 0: must end with one step")


def test_transfers_only_where_the_conventions_put_them():
    good = gpipe(2, 1)
    _refused([_stage("recv_act 0, forward 0, send_act 0, recv_grad 0, backward 0, step"),
              good[1]], 1,
             "stage 0, action 0 (recv_act 0): stage 0 has no stage before it to talk to")
    _refused([good[0], _stage("recv_act 0, forward 0, send_act 0, backward 0, send_grad 0, "
                              "step")], 1,
             "stage 1, action 2 (send_act 0): the last stage has no stage after it")
    # a receive that is not right before its forward
    _refused([good[0], _stage("recv_act 0, backward 0, forward 0, send_grad 0, step")], 1,
             "stage 1, action 0 (recv_act 0): must come right before forward 0")
    # the last stage's backward without its send_grad
    _refused([good[0], _stage("recv_act 0, forward 0, backward 0, step")], 1,
             "stage 1, action 2 (backward 0): must be followed by send_grad 0, "
             "stage 0 waits for it")


def test_recv_with_no_send():
    # stage 1 receives activation 0, but stage 0 never sends it
    _refused([_stage("forward 0, recv_grad 0, backward 0, step"), gpipe(2, 1)[1]], 1,
             "stage 0, action 0 (forward 0): must be followed by send_act 0, "
             "stage 1 waits for it")
    # and a forward on stage 1 with no receive before it
    _refused([gpipe(2, 1)[0], _stage("forward 0, backward 0, send_grad 0, step")], 1,
             "stage 1, action 0 (forward 0): must come right after recv_act 0, "
             "its input is on stage 0")


def test_fifo_order_violated():
    s0, s1 = gpipe(2, 2)
    # stage 1 takes its forwards in the order 1, 0; stage 0 sends 0 first
    s1 = _stage("recv_act 1, forward 1, recv_act 0, forward 0, "
                "backward 0, send_grad 0, backward 1, send_grad 1, step")
    _refused([s0, s1], 2,
             "stage 1, action 0 (recv_act 1): the channel from stage 0 is FIFO and its "
             "message number 0 is act 0 (stage 0 sends 0 1; stage 1 receives 1 0)")
    # same on the gradient channel: stage 1 sends grads 1, 0; stage 0 expects 0 first
    s0, s1 = gpipe(2, 2)
    s1 = s1[:4] + _stage("backward 1, send_grad 1, backward 0, send_grad 0, step")
    _refused([s0, s1], 2, "stage 0, action 4 (recv_grad 0): the channel from stage 1 is "
                          "FIFO and its message number 0 is grad 1")


def test_deadlock_two_stages_each_receiving_before_sending():
    # stage 0 waits for gradient 0 before sending activation 1; stage 1 waits for
    # activation 1 before its first backward: neither can move
    s0 = _stage("forward 0, send_act 0, recv_grad 0, backward 0, "
                "forward 1, send_act 1, recv_grad 1, backward 1, step")
    s1 = gpipe(2, 2)[1]
    _refused([s0, s1], 2,
             "deadlock: stage 0, action 2 (recv_grad 0) waits for stage 1's send_grad 0; "
             "stage 1, action 2 (recv_act 1) waits for stage 0's send_act 1")
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate([s0, s1])


def test_deadlock_names_every_stuck_stage_of_three():
    s = gpipe(3, 2)
    # stage 0 runs its second forward only after both its backwards: stage 0 then waits
    # on stage 1, which waits on stage 2, which waits on stage 1's second activation
    s[0] = _stage("forward 0, send_act 0, recv_grad 0, backward 0, "
                  "forward 1, send_act 1, recv_grad 1, backward 1, step")
    with pytest.raises(ScheduleError) as info:
        validate(s, 2)
    message = str(info.value)
    assert message.startswith("deadlock: ")
    assert "stage 0, action 2 (recv_grad 0) waits for stage 1's send_grad 0" in message
    assert "stage 1, action 3 (recv_act 1) waits for stage 0's send_act 1" in message
    assert "stage 2, action 2 (recv_act 1) waits for stage 1's send_act 1" in message


# -- simulate -----------------------------------------------------------------------------

@pytest.mark.parametrize("f, b", [(1.0, 1.0), (1.0, 2.0)])
@pytest.mark.parametrize("p, m", SIZES)
def test_makespan_and_bubble_match_the_closed_form(p, m, f, b):
    makers = [gpipe] + ([one_f_one_b] if m >= p else [])
    for make in makers:
        sim = simulate(make(p, m), forward=f, backward=b)
        assert sim.makespan == pytest.approx((m + p - 1) * (f + b))
        assert sim.busy == pytest.approx([m * (f + b)] * p)
        assert sim.bubble == pytest.approx([(p - 1) / (m + p - 1)] * p)


@pytest.mark.parametrize("p, m", SIZES)
def test_peak_activations(p, m):
    assert simulate(gpipe(p, m)).peak_activations == (m,) * p
    if m >= p:
        assert simulate(one_f_one_b(p, m)).peak_activations == tuple(
            min(p - s, m) for s in range(p))


def test_comm_delays_every_receive():
    # by hand, f=1 b=2 comm=0.5: stage 1 gets act 0 at 1.5, sends grad 0 at 4.5 (stage 0
    # has it at 5.0), gets act 1 (sent at 2) at 2.5 but is busy until 4.5, sends grad 1 at
    # 7.5; stage 0 starts backward 1 at 8.0 and ends at 10.0
    sim = simulate(one_f_one_b(2, 2), forward=1.0, backward=2.0, comm=0.5)
    assert sim.makespan == pytest.approx(10.0)
    assert sim.busy == pytest.approx([6.0, 6.0])
    assert sim.bubble == pytest.approx([0.4, 0.4])
    # one micro-batch crosses each of the p - 1 links twice
    for p in range(1, 5):
        assert simulate(gpipe(p, 1), 1.0, 2.0, comm=0.25).makespan == pytest.approx(
            p * 3.0 + 2 * (p - 1) * 0.25)


def test_simulate_refuses_negative_costs_and_no_stages():
    with pytest.raises(ScheduleError, match="comm cost must be >= 0, got -1"):
        simulate(gpipe(2, 2), comm=-1.0)
    with pytest.raises(ScheduleError, match="needs at least one stage"):
        simulate([])
    # simulate validates first, with m read from the highest micro-batch named
    with pytest.raises(ScheduleError, match=re.escape("stage 0: no forward of micro-batch(es) 1")):
        simulate([_stage("forward 0, forward 2, backward 0, backward 2, step")])


# -- check_pipeline -----------------------------------------------------------------------

def _config_refused(message: str, **overrides: object) -> None:
    settings: dict[str, object] = dict(stages=2, micro_batches=4, schedule="1f1b",
                                       batch_size=16, n_blocks=4)
    settings.update(overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_pipeline(**settings)  # type: ignore[arg-type]


def test_check_pipeline_accepts_good_settings():
    check_pipeline(stages=4, micro_batches=4, schedule="1f1b", batch_size=16, n_blocks=4)
    check_pipeline(stages=3, micro_batches=2, schedule="gpipe", batch_size=6, n_blocks=8)


def test_check_pipeline_refusals_name_the_fix():
    _config_refused("got 1; for one stage use runtime.mode local", stages=1)
    _config_refused("runtime.schedule: must be one of gpipe, 1f1b, got 'interleaved'",
                    schedule="interleaved")
    _config_refused("runtime.micro_batches: 1f1b needs at least one micro-batch per stage, "
                    "got 2 for 3 stages; raise runtime.micro_batches to at least 3 or use "
                    "gpipe", stages=3, micro_batches=2)
    _config_refused("the model has 4 blocks; use at most 4 stages, got 6", stages=6,
                    micro_batches=6)
    _config_refused("runtime.micro_batches: must be >= 1, got 0", micro_batches=0)


def test_check_pipeline_batch_split_suggests_divisors():
    _config_refused("training.batch_size 30 is not divisible by runtime.micro_batches 4; "
                    "use runtime.micro_batches 3 or 5, or make training.batch_size a "
                    "multiple of 4", schedule="gpipe", batch_size=30)
    # 1f1b with 4 stages: 3 is too few micro-batches, so only 5 is offered
    _config_refused("use runtime.micro_batches 5, or make", stages=4, batch_size=30)
    # more micro-batches than samples
    _config_refused("training.batch_size 6 is not divisible by runtime.micro_batches 8; "
                    "use runtime.micro_batches 6, or", schedule="gpipe", batch_size=6,
                    micro_batches=8)
    # 1f1b with 4 stages: no divisor of 3 is at least 4, so only the batch can change
    _config_refused("training.batch_size 3 is not divisible by runtime.micro_batches 4; "
                    "make training.batch_size a multiple of 4", stages=4, batch_size=3)
