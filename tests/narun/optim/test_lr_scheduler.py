"""LR schedules: against torch where torch has the schedule, against closed forms otherwise,
and through state_dict round trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import narun
from narun import nn, optim
from narun.errors import CheckpointError, ConfigError
from narun.optim import lr_scheduler as S
from tests.opcheck import HAS_TORCH

if HAS_TORCH:
    import torch

    torch.set_num_threads(1)  # its spinning worker threads crawl on a shared 2-core box

LRS = (0.1, 0.03)


def _opt(lrs=LRS) -> optim.SGD:
    return optim.SGD([{"params": [nn.Parameter(narun.zeros(2))], "lr": lr} for lr in lrs],
                     lr=1.0, momentum=0.9)


def _trace(sched, steps: int) -> list[list[float]]:
    out = [sched.get_last_lr()]
    for _ in range(steps):
        sched.optimizer.step()
        sched.step()
        out.append(sched.get_last_lr())
        assert out[-1] == [g["lr"] for g in sched.optimizer.param_groups]
    return out


def _torch_trace(make, steps: int) -> list[list[float]]:
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in LRS]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, LRS)], lr=1.0)
    sched = make(opt)
    out = [sched.get_last_lr()]
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr())
    return out


TORCH_CASES = [
    ("StepLR", lambda o: S.StepLR(o, step_size=3, gamma=0.5),
     lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
    ("CosineAnnealingLR", lambda o: S.CosineAnnealingLR(o, T_max=10, eta_min=0.01),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.01)),
    ("LambdaLR", lambda o: S.LambdaLR(o, lambda e: 0.95**e),
     lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.95**e)),
    ("LambdaLR-per-group", lambda o: S.LambdaLR(o, [lambda e: 1 / (e + 1), lambda e: e % 3]),
     lambda o: torch.optim.lr_scheduler.LambdaLR(o, [lambda e: 1 / (e + 1),
                                                     lambda e: e % 3])),
    ("step-no-warmup", lambda o: S.build_scheduler("step", o, 0, 12, step_size=4, gamma=0.3),
     lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.3)),
]


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
@pytest.mark.parametrize("name,mine,theirs", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_matches_torch(name, mine, theirs):
    ours = _trace(mine(_opt()), 25)
    ref = _torch_trace(theirs, 25)
    np.testing.assert_allclose(np.array(ours), np.array(ref), rtol=1e-9, atol=1e-15)


def _warmup_cosine(t, base, warmup, total, ratio):
    if t < warmup:
        return base * t / warmup
    progress = min((t - warmup) / max(total - warmup, 1), 1.0)  # no decay phase: drop at once
    return base * (ratio + (1 - ratio) * (1 + math.cos(math.pi * progress)) / 2)


@pytest.mark.parametrize("warmup,total,ratio", [(5, 20, 0.0), (5, 20, 0.1), (0, 10, 0.0),
                                                 (3, 3, 0.2)])
def test_warmup_cosine_closed_form(warmup, total, ratio):
    trace = _trace(S.warmup_cosine(_opt(), warmup, total, min_lr_ratio=ratio), total + 5)
    for t, lrs in enumerate(trace):
        for lr, base in zip(lrs, LRS):
            assert lr == pytest.approx(_warmup_cosine(t, base, warmup, total, ratio),
                                       rel=1e-12, abs=1e-15)
    assert trace[0] == ([0.0, 0.0] if warmup else list(LRS))
    assert trace[warmup] == pytest.approx(list(LRS))
    assert trace[-1] == pytest.approx([ratio * b for b in LRS])  # flat after total_steps


def test_constant_linear_and_step_with_warmup():
    const = _trace(S.constant_with_warmup(_opt(), 4), 10)
    assert [lrs[0] for lrs in const] == pytest.approx([0.0, 0.025, 0.05, 0.075] + [0.1] * 7)

    lin = _trace(S.build_scheduler("linear", _opt(), 2, 6), 8)
    assert [lrs[0] for lrs in lin] == pytest.approx([0.0, 0.05, 0.1, 0.075, 0.05, 0.025, 0.0,
                                                     0.0, 0.0])
    step = _trace(S.build_scheduler("step", _opt(), 2, 11), 11)  # step_size (11-2)//3 = 3
    assert [lrs[1] for lrs in step] == pytest.approx(
        [0.0, 0.015, 0.03, 0.03, 0.03, 0.003, 0.003, 0.003, 3e-4, 3e-4, 3e-4, 3e-5])

    cos = S.build_scheduler("cosine", _opt(), 2, 10, min_lr_ratio=0.5)
    assert isinstance(cos, S.WarmupCosineLR) and cos.min_lr_ratio == 0.5
    assert isinstance(S.build_scheduler("constant", _opt(), 2, 10), S.WarmupConstantLR)


def test_build_scheduler_errors_name_valid_schedules():
    with pytest.raises(ConfigError, match="unknown schedule 'cosin'; valid names are "
                                          "constant, cosine, linear, step"):
        S.build_scheduler("cosin", _opt(), 10, 100)
    with pytest.raises(ConfigError, match="total_steps must be an int >= warmup_steps"):
        S.build_scheduler("cosine", _opt(), 10, 5)
    with pytest.raises(ConfigError, match="warmup_steps"):
        S.warmup_cosine(_opt(), -1, 5)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        S.warmup_cosine(_opt(), 1, 5, min_lr_ratio=2.0)
    with pytest.raises(ConfigError, match="2 lr_lambdas for 1 param groups"):
        S.LambdaLR(_opt((0.1,)), [lambda e: 1.0, lambda e: 1.0])
    with pytest.raises(TypeError, match="narun Optimizer"):
        S.StepLR(object(), 3)


@pytest.mark.parametrize("make", [
    lambda o: S.warmup_cosine(o, 4, 20, 0.1),
    lambda o: S.StepLR(o, 3, 0.5),
    lambda o: S.CosineAnnealingLR(o, 7),
    lambda o: S.build_scheduler("linear", o, 3, 15),
    lambda o: S.build_scheduler("step", o, 3, 15),
], ids=["warmup_cosine", "StepLR", "CosineAnnealingLR", "linear", "step"])
def test_state_dict_resume_gives_the_same_lrs(make):
    straight = _trace(make(_opt()), 16)

    opt = _opt()
    sched = make(opt)
    first = _trace(sched, 8)
    opt_sd, sched_sd = opt.state_dict(), json.loads(json.dumps(sched.state_dict()))
    opt2 = _opt((5.0, 5.0))
    opt2.load_state_dict(opt_sd)
    sched2 = make(opt2)
    sched2.load_state_dict(sched_sd)
    assert sched2.last_epoch == 8 and sched2.get_last_lr() == first[-1]
    rest = _trace(sched2, 8)
    np.testing.assert_allclose(np.array(first + rest[1:]), np.array(straight), rtol=1e-15)


def test_last_epoch_semantics():
    opt = _opt()
    sched = S.StepLR(opt, 2, 0.5)
    assert sched.last_epoch == 0 and opt.param_groups[0]["initial_lr"] == 0.1
    with pytest.raises(ConfigError, match="initial_lr"):
        S.StepLR(_opt(), 2, last_epoch=3)
    resumed = S.StepLR(opt, 2, 0.5, last_epoch=3)  # initial_lr now present
    assert resumed.last_epoch == 4 and resumed.get_last_lr()[0] == pytest.approx(0.025)
    with pytest.raises(CheckpointError, match="unknown keys"):
        sched.load_state_dict({"bogus": 1})
