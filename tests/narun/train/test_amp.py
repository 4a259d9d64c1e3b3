"""Mixed precision on the CPU path with float16 arrays: the loss-scale rule, training that
follows float32, a forced overflow that skips exactly one step, checkpoints of float32
masters that resume exactly, and the configs it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest

import narun
from narun.amp import GradScaler, MixedPrecision
from narun.checkpoint import load_checkpoint
from narun.config import config_from_dict
from narun.errors import ConfigError
from narun.models import GPT, gpt_config
from narun.nn.utils import clip_grad_norm_
from narun.train import check_job, train
from tests.narun.train.test_train import TINY, Events


def test_the_scale_backs_off_on_overflow_and_grows_after_clean_steps():
    s = GradScaler(init_scale=1024.0, growth_interval=3)
    for _ in range(2):
        s.update(found_inf=False)
    assert s.scale == 1024.0
    s.update(found_inf=True)  # the clean count starts again
    assert (s.scale, s.clean_steps, s.skipped) == (512.0, 0, 1)
    for _ in range(3):
        s.update(found_inf=False)
    assert (s.scale, s.clean_steps) == (1024.0, 0)
    t = GradScaler()
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.state_dict() == s.state_dict()
    with pytest.raises(ConfigError, match="growth_factor"):
        GradScaler(growth_factor=0.5)


def tiny_gpt():
    narun.manual_seed(0)
    return GPT(gpt_config("gpt2-tiny", n_layer=1, n_embd=32, n_head=2, block_size=16))


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 40,
                         np.uint8).astype(np.int64)
    for _ in range(n):
        i = rng.integers(0, len(text) - 17, 8)
        yield (narun.tensor(np.stack([text[j:j + 16] for j in i])),
               narun.tensor(np.stack([text[j + 1:j + 17] for j in i])))


def test_float16_training_follows_float32():
    # SGD, whose step is proportional to the gradient: a wrong scale would show (Adam's
    # update would hide it, being invariant to the gradient's scale)
    ref = tiny_gpt()
    ref_opt = narun.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    model = tiny_gpt()
    amp = MixedPrecision(model, "fp16")
    opt = narun.optim.SGD(amp.parameters(), lr=0.5, momentum=0.9)
    assert {p.dtype for p in model.parameters()} == {np.dtype(np.float16)}
    assert {m.dtype for m in amp.parameters()} == {np.dtype(np.float32)}
    for x, y in batches(20):
        ref_opt.zero_grad()
        want = ref.loss(x, y)
        want.backward()
        clip_grad_norm_(ref.parameters(), 5.0)
        ref_opt.step()
        opt.zero_grad()
        loss = model.loss(x, y)
        assert loss.dtype == np.float32  # taken in float32 from float16 logits
        amp.backward(loss)
        assert amp.step(opt, max_norm=5.0)
        assert loss.item() == pytest.approx(want.item(), rel=5e-3)
    for p, m in zip(model.parameters(), amp.parameters()):  # the model holds the masters
        np.testing.assert_array_equal(p.data, m.data.astype(np.float16))
    diff = np.sqrt(sum(float(np.sum((m.data - p.data) ** 2))
                       for p, m in zip(ref.parameters(), amp.parameters())))
    norm = np.sqrt(sum(float(np.sum(p.data ** 2)) for p in ref.parameters()))
    assert diff / norm < 1e-2, diff / norm  # float16 rounding of 20 steps: 2.6e-3 here


def test_a_forced_overflow_skips_exactly_one_step():
    model = tiny_gpt()
    amp = MixedPrecision(model, "fp16", GradScaler(init_scale=256.0, growth_interval=1000))
    opt = narun.optim.Adam(amp.parameters(), lr=1e-3)
    outcomes = []
    for i, (x, y) in enumerate(batches(6)):
        opt.zero_grad()
        amp.backward(model.loss(x, y))
        if i == 3:  # one gradient overflows: inf in one element
            p = next(iter(model.parameters()))
            p.grad.data.reshape(-1)[0] = np.inf
            before = [m.data.copy() for m in amp.parameters()]
            steps = {id(m): opt.state[m]["step"] for m in amp.parameters()}
            scale = amp.scaler.scale
        stepped = amp.step(opt)
        outcomes.append(stepped)
        if i == 3:
            for b, m in zip(before, amp.parameters()):  # nothing moved
                np.testing.assert_array_equal(m.data, b)
            assert all(opt.state[m]["step"] == steps[id(m)] for m in amp.parameters())
            assert amp.scaler.scale == scale / 2
            assert all(p.grad is None for p in model.parameters())
    assert outcomes == [True, True, True, False, True, True]
    assert amp.scaler.skipped == 1


def cfg(tmp_path, precision="fp16", **training):
    data = json.loads(json.dumps(TINY))
    data["model"].update(n_layer=1, n_embd=32, block_size=16, dropout=0.0)
    data["data"]["seq_len"] = 16
    data["training"].update(out_dir=str(tmp_path), steps=12, precision=precision, **training)
    return config_from_dict(data)


def test_narun_train_in_float16_follows_float32_and_resumes_exactly(tmp_path):
    ref, half = Events(), Events()
    train(cfg(tmp_path / "fp32", "fp32"), ref)
    straight = train(cfg(tmp_path / "a"), half)
    steps = [e for e in half.events if e["event"] == "step"]
    want = [e["loss"] for e in ref.events if e["event"] == "step"]
    np.testing.assert_allclose([e["loss"] for e in steps], want, rtol=2e-3)
    assert all(not e["skipped"] for e in steps[1:])
    # the checkpoint is an ordinary float32 one: the masters, and the loss scale
    c = load_checkpoint(straight["checkpoint"])
    assert {v.dtype for v in c.model.values()} == {np.dtype(np.float32)}
    assert c.extra["amp"]["scaler"]["scale"] == steps[-1]["loss_scale"]
    first = train(cfg(tmp_path / "b"), Events(), stop_at=6)
    assert first["step"] == 6 and first["interrupted"]
    second = train(cfg(tmp_path / "b"), Events(), resume="auto")
    a, b = c.model, load_checkpoint(second["checkpoint"]).model
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("change,match", [
    ({"training": {"precision": "bf16"}}, r"bf16 needs bfloat16 arrays, which NumPy \(cpu\) "
     r"and CuPy \(cuda\) do not have; use fp16"),
    ({"runtime": {"mode": "ps-sync", "workers": 1}}, "trains in mode local"),
    ({"training": {"precision": "fp8"}}, "precision"),
])
def test_configs_it_cannot_run_are_refused(tmp_path, change, match):
    data = json.loads(json.dumps(TINY))
    data["training"].update(out_dir=str(tmp_path), precision="fp16")
    for section, values in change.items():
        data.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=match):
        check_job(config_from_dict(data))
