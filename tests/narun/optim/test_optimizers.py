"""SGD, Adam, AdamW and Lion against their update rules written out in NumPy float64, against
torch.optim, and through a state_dict round trip that must equal an uninterrupted run."""

from __future__ import annotations

import json

import numpy as np
import pytest

import narun
from narun import nn, optim
from narun.errors import CheckpointError, ConfigError
from tests.opcheck import HAS_TORCH

if HAS_TORCH:
    import torch

    torch.set_num_threads(1)  # its spinning worker threads crawl on a shared 2-core box

# (4, 3) and (3,) are tiny; (150, 250) float64 is larger than one of the optimizer's
# cache-sized slices, so the slicing and its ragged last slice are exercised too.
SHAPES = [(4, 3), (3,), (150, 250)]
STEPS = 20


# ---- reference update rules (textbook form, float64) ---------------------------------------
def ref_sgd(p, g, st, c):
    if c.get("maximize"):
        g = -g
    if c.get("weight_decay", 0):
        g = g + c["weight_decay"] * p
    mom = c.get("momentum", 0)
    if mom:
        if "buf" not in st:
            st["buf"] = g.copy()
        else:
            st["buf"] = mom * st["buf"] + (1 - c.get("dampening", 0)) * g
        g = g + mom * st["buf"] if c.get("nesterov") else st["buf"]
    return p - c["lr"] * g


def ref_adam(p, g, st, c, decoupled=False):
    b1, b2 = c.get("betas", (0.9, 0.999))
    eps, wd, lr = c.get("eps", 1e-8), c.get("weight_decay", 0.01 if decoupled else 0), c["lr"]
    if c.get("maximize"):
        g = -g
    if decoupled:
        p = p * (1 - lr * wd)
    elif wd:
        g = g + wd * p
    t = st["t"] = st.get("t", 0) + 1
    st["m"] = b1 * st.get("m", 0) + (1 - b1) * g
    st["v"] = b2 * st.get("v", 0) + (1 - b2) * g * g
    v = st["v"]
    if c.get("amsgrad"):
        v = st["vmax"] = np.maximum(st.get("vmax", 0), st["v"])
    m_hat = st["m"] / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps)


def ref_adamw(p, g, st, c):
    return ref_adam(p, g, st, c, decoupled=True)


def ref_lion(p, g, st, c):
    b1, b2 = c.get("betas", (0.9, 0.99))
    lr, wd = c.get("lr", 1e-4), c.get("weight_decay", 0)
    if c.get("maximize"):
        g = -g
    m = st.get("m", np.zeros_like(p))
    p = p * (1 - lr * wd) - lr * np.sign(b1 * m + (1 - b1) * g)
    st["m"] = b2 * m + (1 - b2) * g
    return p


CASES = [
    ("SGD", ref_sgd, dict(lr=0.1)),
    ("SGD", ref_sgd, dict(lr=0.1, momentum=0.9)),
    ("SGD", ref_sgd, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1)),
    ("SGD", ref_sgd, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    ("SGD", ref_sgd, dict(lr=0.02, momentum=0.9, nesterov=True, maximize=True)),
    ("SGD", ref_sgd, dict(lr=0.1, momentum=0.9, maximize=True, weight_decay=0.1)),
    ("Adam", ref_adam, dict(lr=0.01)),
    ("Adam", ref_adam, dict(lr=0.01, betas=(0.8, 0.99), eps=0.1, weight_decay=0.1)),
    ("Adam", ref_adam, dict(lr=0.01, amsgrad=True, eps=1e-3)),
    ("Adam", ref_adam, dict(lr=0.01, maximize=True, weight_decay=0.05)),
    ("AdamW", ref_adamw, dict(lr=0.01)),
    ("AdamW", ref_adamw, dict(lr=0.01, weight_decay=0.2, amsgrad=True, eps=1e-3)),
    ("AdamW", ref_adamw, dict(lr=0.01, maximize=True, eps=0.05)),
    ("Lion", ref_lion, dict(lr=0.01)),
    ("Lion", ref_lion, dict(lr=0.01, betas=(0.95, 0.98), weight_decay=0.5)),
    ("Lion", ref_lion, dict(lr=0.003, maximize=True, weight_decay=0.1)),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]


class Problem:
    """Gradients that depend on the parameters (a noisy quadratic), so any error compounds."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.init = [rng.standard_normal(s) for s in SHAPES]
        self.target = [rng.standard_normal(s) for s in SHAPES]
        self.scale = [rng.uniform(0.1, 3.0, s) for s in SHAPES]
        self.noise = [[rng.standard_normal(s) * 0.3 for s in SHAPES] for _ in range(2 * STEPS)]

    def grad(self, i: int, p: np.ndarray, step: int) -> np.ndarray:
        return self.scale[i] * (p - self.target[i]) + self.noise[step][i]


def reference(prob: Problem, ref, configs: list[dict], steps: int = STEPS) -> list[np.ndarray]:
    params = [x.copy() for x in prob.init]
    states: list[dict] = [{} for _ in params]
    for t in range(steps):
        grads = [prob.grad(i, p, t) for i, p in enumerate(params)]
        params = [ref(p, g, st, c) for p, g, st, c in zip(params, grads, states, configs)]
    return params


def run_narun(prob, opt, params, start: int, stop: int) -> None:
    for t in range(start, stop):
        for i, p in enumerate(params):
            p.grad = narun.tensor(prob.grad(i, p.numpy().astype(np.float64), t), dtype=p.dtype)
        opt.step()


def make_params(prob: Problem, dtype=np.float64) -> list[nn.Parameter]:
    return [nn.Parameter(x.astype(dtype)) for x in prob.init]


@pytest.mark.parametrize("name,ref,cfg", CASES, ids=IDS)
def test_matches_reference_formula(name, ref, cfg):
    prob = Problem()
    params = make_params(prob)
    opt = getattr(optim, name)(params, **cfg)
    run_narun(prob, opt, params, 0, STEPS)
    expected = reference(prob, ref, [cfg] * len(params))
    for p, e in zip(params, expected):
        assert p.dtype == np.float64
        np.testing.assert_allclose(p.numpy(), e, rtol=1e-9, atol=1e-12)
        assert not np.allclose(p.numpy(), prob.init[0].ravel()[0])  # it moved


@pytest.mark.parametrize("name,ref,cfg", CASES, ids=IDS)
def test_float32_stays_float32(name, ref, cfg):
    prob = Problem(1)
    params = make_params(prob, np.float32)
    opt = getattr(optim, name)(params, **cfg)
    run_narun(prob, opt, params, 0, 5)
    expected = reference(prob, ref, [cfg] * len(params), steps=5)
    for p, e in zip(params, expected):
        assert p.dtype == np.float32
        np.testing.assert_allclose(p.numpy(), e, rtol=1e-4, atol=1e-5)
    for state in opt.state.values():
        for v in state.values():
            assert not hasattr(v, "dtype") or v.dtype == np.float32


def _groups(params, cfg):
    """Three groups: its own lr and weight decay, the defaults, and a zero-lr group."""
    return [{"params": [params[0]], "lr": cfg.get("lr", 1e-3) * 0.5, "weight_decay": 0.3},
            {"params": [params[1]]},
            {"params": [params[2]], "lr": cfg.get("lr", 1e-3) * 2}]


def _group_configs(cfg):
    return [dict(cfg, lr=cfg.get("lr", 1e-3) * 0.5, weight_decay=0.3), dict(cfg),
            dict(cfg, lr=cfg.get("lr", 1e-3) * 2)]


@pytest.mark.parametrize("name,ref,cfg", CASES, ids=IDS)
def test_param_groups_match_reference(name, ref, cfg):
    prob = Problem(2)
    params = make_params(prob)
    opt = getattr(optim, name)(_groups(params, cfg), **cfg)
    run_narun(prob, opt, params, 0, STEPS)
    expected = reference(prob, ref, _group_configs(cfg))
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.numpy(), e, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
@pytest.mark.parametrize("name,ref,cfg", [c for c in CASES if c[0] != "Lion"],
                         ids=[i for i, c in zip(IDS, CASES) if c[0] != "Lion"])
def test_matches_torch_with_param_groups(name, ref, cfg):
    prob = Problem(3)
    params = make_params(prob)
    opt = getattr(optim, name)(_groups(params, cfg), **cfg)
    tparams = [torch.nn.Parameter(torch.tensor(x)) for x in prob.init]
    topt = getattr(torch.optim, name)(_groups(tparams, cfg), foreach=False, **cfg)
    for t in range(STEPS):
        for i, (p, tp) in enumerate(zip(params, tparams)):
            g = prob.grad(i, p.numpy(), t)
            p.grad = narun.tensor(g, dtype=narun.float64)
            tp.grad = torch.tensor(prob.grad(i, tp.detach().numpy(), t))
        opt.step()
        topt.step()
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), rtol=1e-6, atol=1e-9)


def _through_json(sd: dict) -> dict:
    """What a checkpoint does: arrays to a tensor file, everything else to JSON."""
    arrays: dict[str, np.ndarray] = {}

    def strip(obj, path):
        if isinstance(obj, np.ndarray):
            arrays[path] = obj.copy()
            return {"__array__": path}
        if isinstance(obj, dict):
            return {str(k): strip(v, f"{path}.{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [strip(v, f"{path}.{i}") for i, v in enumerate(obj)]
        assert obj is None or isinstance(obj, (bool, int, float, str)), type(obj)
        return obj

    def fill(obj):
        if isinstance(obj, dict):
            if "__array__" in obj:
                return arrays[obj["__array__"]]
            return {k: fill(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [fill(v) for v in obj]
        return obj

    return fill(json.loads(json.dumps(strip(sd, "sd"))))


@pytest.mark.parametrize("name,ref,cfg", CASES, ids=IDS)
def test_state_dict_round_trip_is_exact(name, ref, cfg):
    prob = Problem(4)
    straight = make_params(prob)
    opt = getattr(optim, name)(_groups(straight, cfg), **cfg)
    run_narun(prob, opt, straight, 0, STEPS)

    first = make_params(prob)
    opt1 = getattr(optim, name)(_groups(first, cfg), **cfg)
    run_narun(prob, opt1, first, 0, STEPS // 2)
    sd = _through_json(opt1.state_dict())
    resumed = [nn.Parameter(p.numpy().copy()) for p in first]
    opt2 = getattr(optim, name)(_groups(resumed, {"lr": 123.0}))  # hyperparameters from sd
    opt2.load_state_dict(sd)
    run_narun(prob, opt2, resumed, STEPS // 2, STEPS)
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert opt2.param_groups[0]["lr"] == opt1.param_groups[0]["lr"]


def test_state_dict_layout_is_plain_data():
    params = [nn.Parameter(narun.zeros(2, 3)), nn.Parameter(narun.zeros(3))]
    opt = optim.Adam([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.5}],
                     betas=(0.8, 0.9))
    params[0].grad = narun.ones(2, 3)
    opt.step()
    sd = opt.state_dict()
    assert list(sd["state"]) == [0]  # params[1] has had no gradient: no state
    assert sd["state"][0]["step"] == 1 and type(sd["state"][0]["step"]) is int
    assert isinstance(sd["state"][0]["exp_avg"], np.ndarray)
    assert sd["state"][0]["exp_avg"].dtype == np.float32
    assert sd["param_groups"][0]["params"] == [0] and sd["param_groups"][1]["params"] == [1]
    assert sd["param_groups"][1]["lr"] == 0.5 and sd["param_groups"][0]["betas"] == (0.8, 0.9)
    sd["state"][0]["exp_avg"][...] = 99  # a snapshot, not the live state
    assert opt.state[params[0]]["exp_avg"].max() < 1
    opt.load_state_dict(_through_json(sd))
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)  # a tuple again after JSON
    np.testing.assert_array_equal(opt.state[params[0]]["exp_avg"], np.full((2, 3), 99))


def test_load_state_dict_errors():
    a = [nn.Parameter(narun.zeros(2, 3)), nn.Parameter(narun.zeros(3))]
    opt = optim.Adam(a)
    for p in a:
        p.grad = narun.ones(*p.shape)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(CheckpointError, match="has 1 parameter groups, this Adam has 2"):
        optim.Adam([{"params": [a[0]]}, {"params": [a[1]]}]).load_state_dict(sd)
    with pytest.raises(CheckpointError, match="group 0: the state dict has 2 parameters, this "
                                              "optimizer has 1"):
        optim.Adam([a[0]]).load_state_dict(sd)
    swapped = [nn.Parameter(narun.zeros(3)), nn.Parameter(narun.zeros(2, 3))]
    with pytest.raises(CheckpointError, match=r"'exp_avg' of parameter 0 \(group 0\) has shape "
                                              r"\(2, 3\), the parameter has shape \(3,\)"):
        optim.Adam(swapped).load_state_dict(sd)
    with pytest.raises(CheckpointError, match="'state' and 'param_groups'"):
        opt.load_state_dict({"state": {}})


def test_skips_params_without_grad_and_zero_grad():
    a, b = nn.Parameter(narun.ones(3)), nn.Parameter(narun.ones(3))
    opt = optim.AdamW([a, b], lr=0.1)
    a.grad = narun.ones(3)
    opt.step()
    np.testing.assert_array_equal(b.numpy(), np.ones(3))  # no grad: not even weight decay
    assert b not in opt.state and opt.state[a]["step"] == 1
    opt.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(a.grad.numpy(), np.zeros(3))
    opt.zero_grad()
    assert a.grad is None


def test_step_runs_closure_with_grad():
    w = nn.Parameter(narun.tensor([2.0]))
    opt = optim.SGD([w], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return loss

    with narun.no_grad():
        loss = opt.step(closure)
    assert loss.item() == 4.0 and w.item() == pytest.approx(1.0)


def test_non_contiguous_parameter_is_updated_in_place():
    base = np.random.default_rng(0).standard_normal((5, 4))
    p = nn.Parameter(base.T)  # a transposed view: not C-contiguous
    opt = optim.Adam([p], lr=0.1, weight_decay=0.1)
    g = np.random.default_rng(1).standard_normal((4, 5))
    expected = ref_adam(base.T.copy(), g, {}, dict(lr=0.1, weight_decay=0.1))
    p.grad = narun.tensor(g, dtype=narun.float64)
    opt.step()
    np.testing.assert_allclose(base.T, expected, rtol=1e-12)  # written through the view
    assert p.data.base is base


def test_optimizer_keeps_working_after_module_load_state_dict():
    lin = nn.Linear(3, 2)
    opt = optim.SGD(lin.parameters(), lr=1.0)
    lin.load_state_dict({"weight": np.zeros((2, 3)), "bias": np.zeros(2)})
    lin(narun.ones(1, 3)).sum().backward()
    opt.step()
    np.testing.assert_array_equal(lin.weight.numpy(), -np.ones((2, 3)))


@pytest.mark.parametrize("make,match", [
    (lambda p: optim.SGD([], lr=0.1), "empty parameter list"),
    (lambda p: optim.SGD(p[0], lr=0.1), "single Tensor"),
    (lambda p: optim.SGD(set(p), lr=0.1), "ordered collection"),
    (lambda p: optim.SGD([p[0], p[0]], lr=0.1), "more than once"),
    (lambda p: optim.SGD([{"params": [p[0]]}, {"params": [p[0]]}]), "more than once"),
    (lambda p: optim.SGD([p[0] * 2], lr=0.1), "not a leaf"),
    (lambda p: optim.SGD(p, lr=-1.0), "lr must be"),
    (lambda p: optim.SGD(p, lr=0.1, nesterov=True), "Nesterov"),
    (lambda p: optim.Adam(p, betas=(0.9, 1.0)), "betas"),
    (lambda p: optim.Adam(p, eps=-1.0), "eps"),
    (lambda p: optim.AdamW([{"params": p, "weight_decay": -0.1}]), "group 0: weight_decay"),
    (lambda p: optim.Lion(p, betas=(0.9,)), "betas"),
])
def test_bad_arguments_are_named(make, match):
    params = [nn.Parameter(narun.zeros(2))]
    with pytest.raises((ConfigError, TypeError), match=match):
        make(params)


def test_add_param_group_and_repr():
    a, b = nn.Parameter(narun.zeros(2)), nn.Parameter(narun.zeros(2))
    opt = optim.Adam([a], lr=0.1)
    opt.add_param_group({"params": b, "lr": 0.01})
    assert len(opt.param_groups[1]["params"]) == 1 and opt.param_groups[1]["params"][0] is b
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)
    text = repr(opt)
    assert text.startswith("Adam (\nParameter Group 0\n") and "lr: 0.01" in text


@pytest.mark.parametrize("make", [
    lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    lambda ps: optim.Adam(ps, weight_decay=0.1, amsgrad=True),
    lambda ps: optim.AdamW(ps, maximize=True),
    lambda ps: optim.Lion(ps, weight_decay=0.1),
], ids=["SGD", "Adam", "AdamW", "Lion"])
def test_steady_state_step_allocates_no_parameter_sized_memory(make):
    import tracemalloc

    params = [nn.Parameter(narun.zeros(512, 512)), nn.Parameter(narun.zeros(512))]
    for p in params:
        p.grad = narun.ones(*p.shape)
    opt = make(params)
    opt.step()  # creates the state and the optimizer's cache-sized scratch slices
    tracemalloc.start()
    try:
        opt.step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"a step allocated {peak} bytes (the parameter has 1 MiB)"
