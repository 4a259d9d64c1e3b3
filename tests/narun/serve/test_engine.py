"""The serving engine: each request's tokens as if it ran alone, whatever joins, leaves or
prefills beside it; stop, length and cancellation; argument checks."""

import numpy as np
import pytest

from narun.errors import ConfigError
from narun.models.gpt import sampling_probs
from narun.serve import Engine
from tests.narun.models.test_gpt import CASES, small_gpt

BLOCK = 32
LENGTHS = (1, 5, 9, 12, 3, 7)  # prompts longer and shorter than the prefill chunk


def make_model(case="gpt2", dtype=np.float64):
    preset, overrides = CASES[case]
    return small_gpt(preset, dtype=dtype, block_size=BLOCK, **overrides)


def prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n) for n in LENGTHS]


def run(engine, schedule):
    """Adds each request before the step its schedule names, steps until idle; returns
    {request_id: [Output, ...]} and how many steps ran."""
    outs, step = {}, 0
    while step <= max(schedule) or not engine.idle:
        for rid, prompt, kwargs in schedule.get(step, []):
            engine.add(rid, prompt, **kwargs)
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
        step += 1
        assert step < 1000, "the engine never went idle"
    return outs, step


def staggered(ps, n_new, sampling):
    """Requests joining at steps 0, 0, 2, 3, 5, 9: while others prefill and decode."""
    joins = (0, 0, 2, 3, 5, 9)
    schedule = {}
    for i, (p, at) in enumerate(zip(ps, joins, strict=True)):
        schedule.setdefault(at, []).append((i, p, dict(max_new_tokens=n_new, **sampling(i))))
    return schedule


def tokens(outs):
    return [o.token for o in outs]


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_in_a_busy_batch_equal_generate_of_each_prompt_alone(case):
    model = make_model(case)
    ps = prompts()
    # 3 slots for 6 requests: later ones wait, then reuse slots whose stale keys are longer
    engine = Engine(model, max_batch=3, prefill_chunk=4)
    outs, _ = run(engine, staggered(ps, 12, lambda i: {}))
    for i, p in enumerate(ps):
        alone = model.generate(p[None], 12, temperature=0.0)[0]
        assert tokens(outs[i]) == alone[len(p):].tolist(), i
        assert [o.index for o in outs[i]] == list(range(12))
        assert [o.finished for o in outs[i]] == [None] * 11 + ["length"]
        # a greedy token's logprob is under the model's own softmax at that position
        full = log_softmax(model(alone[None, :-1]).numpy()[0, len(p) - 1:])
        expected = full[np.arange(12), alone[len(p):]]
        np.testing.assert_allclose([o.logprob for o in outs[i]], expected, rtol=1e-9,
                                   atol=1e-12)
    assert len({tuple(tokens(o)) for o in outs.values()}) == len(ps), "distinct streams"


def test_the_engine_serves_in_eval_mode_even_when_the_model_is_switched_back():
    preset, overrides = CASES["gpt2"]
    model = small_gpt(preset, block_size=BLOCK, dropout=0.5, **overrides)
    p = prompts()[3]
    alone = model.generate(p[None], 8, temperature=0.0)[0, len(p):].tolist()
    assert model.training
    engine = Engine(model, max_batch=2)
    assert not model.training
    model.train()  # dropout on: a step must not sample with it
    outs, _ = run(engine, {0: [("r", p, dict(max_new_tokens=8))]})
    assert tokens(outs["r"]) == alone and not model.training


def sampling_of(i):
    return [dict(temperature=0.9, seed=11), dict(temperature=0.0),
            dict(temperature=1.3, top_k=20, seed=12), dict(temperature=0.7, top_k=3, seed=13),
            dict(temperature=1.0, seed=14), dict(temperature=2.0, top_k=50, seed=15)][i]


@pytest.mark.parametrize("case", ["gpt2", "modern"])
def test_sampled_tokens_depend_on_the_seed_not_on_the_batch(case):
    model = make_model(case)
    ps = prompts(1)
    busy, _ = run(Engine(model, max_batch=4, prefill_chunk=5), staggered(ps, 14, sampling_of))
    for i, p in enumerate(ps):
        alone, _ = run(Engine(model, max_batch=1, prefill_chunk=64),
                       {0: [(i, p, dict(max_new_tokens=14, **sampling_of(i)))]})
        assert tokens(busy[i]) == tokens(alone[i]), i
        # and the same tokens as generate, which draws from the same generator alike
        ref = model.generate(p[None], 14, **{"temperature": 1.0, **sampling_of(i)})[0]
        assert tokens(busy[i]) == ref[len(p):].tolist(), i
        s = sampling_of(i)
        if s["temperature"] > 0:
            logits = model(ref[None, :-1]).numpy()[0, len(p) - 1:]
            probs = sampling_probs(logits, s["temperature"], s.get("top_k"))
            expected = np.log(probs[np.arange(14), ref[len(p):]])
            np.testing.assert_allclose([o.logprob for o in busy[i]], expected, rtol=1e-9)
    other, _ = run(Engine(model, max_batch=1),
                   {0: [(0, ps[0], dict(max_new_tokens=14, temperature=0.9, seed=99))]})
    assert tokens(other[0]) != tokens(busy[0]), "another seed, other tokens"


@pytest.mark.parametrize("case", ["gpt2", "modern"])
def test_float32_greedy_tokens_in_a_busy_batch_match_generate(case):
    model = make_model(case, dtype=np.float32)
    ps = prompts(2)
    outs, _ = run(Engine(model, max_batch=4, prefill_chunk=4), staggered(ps, 12, lambda i: {}))
    for i, p in enumerate(ps):
        alone = model.generate(p[None], 12, temperature=0.0)[0]
        assert tokens(outs[i]) == alone[len(p):].tolist(), i
        assert all(isinstance(o.logprob, float) and o.logprob <= 0 for o in outs[i])
        # greedy logprobs come from float32 logits: float32's precision, not float64's
        logits = model(alone[None, :-1]).numpy()[0, len(p) - 1:].astype(np.float64)
        expected = log_softmax(logits)[np.arange(12), alone[len(p):]]
        np.testing.assert_allclose([o.logprob for o in outs[i]], expected, rtol=1e-4,
                                   atol=1e-5)


def test_a_long_prompt_is_prefilled_in_chunks_without_stalling_the_decoders():
    model = make_model("modern")
    engine = Engine(model, max_batch=4, prefill_chunk=3)
    short, long_ = prompts(3)[1], np.random.default_rng(4).integers(0, 256, 17)
    engine.add("short", short, max_new_tokens=20)
    per_step = [engine.step() for _ in range(2)]  # the 5-token prompt: chunks of 3 and 2
    engine.add("long", long_, max_new_tokens=4)
    while not engine.idle:
        per_step.append(engine.step())
    ids = [[o.request_id for o in outs] for outs in per_step]
    assert ids[0] == [] and ids[1] == ["short"]
    # the long prompt takes ceil(17 / 3) = 6 steps, and "short" gets a token in every one
    assert ids[2:8] == [["short"]] * 5 + [["short", "long"]]
    assert ids[8:11] == [["short", "long"]] * 3
    assert all(i == ["short"] for i in ids[11:]) and len(ids) == 2 + 19
    for rid, p, n in (("short", short, 20), ("long", long_, 4)):
        got = [o.token for outs in per_step for o in outs if o.request_id == rid]
        assert got == model.generate(p[None], n, temperature=0.0)[0, len(p):].tolist()


def test_the_prefill_budget_is_shared_by_the_prompts_that_join_together():
    model = make_model("gpt2")
    engine = Engine(model, max_batch=4, prefill_chunk=4)
    for rid, n in (("a", 3), ("b", 6), ("c", 2)):
        engine.add(rid, np.arange(1, n + 1), max_new_tokens=2)
    firsts = {}
    for step in range(5):
        for o in engine.step():
            firsts.setdefault(o.request_id, step)
    # 4 prompt tokens a step, first come first served: a 3 + b 1 | b 4 | b 1 + c 2
    assert firsts == {"a": 0, "b": 2, "c": 2}


def test_stop_sequences_end_a_request_with_its_last_token():
    model = make_model("gpt2")
    p = prompts()[2]
    free = model.generate(p[None], 10, temperature=0.0)[0, len(p):].tolist()
    unseen = min(set(range(256)) - set(free))
    engine = Engine(model, max_batch=2)
    # [free[0], unseen] starts to match and never completes
    engine.add("two", p, max_new_tokens=10, stop=[[free[0], unseen], free[3:5]])
    engine.add("one", p, max_new_tokens=10, stop=[[free[6]]])
    outs, _ = run(engine, {0: []})
    n_two = next(i for i in range(2, 6) if free[i - 2:i] == free[3:5])
    n_one = free.index(free[6]) + 1
    for rid, n in (("two", n_two), ("one", n_one)):
        assert tokens(outs[rid]) == free[:n], rid
        assert [o.finished for o in outs[rid]] == [None] * (n - 1) + ["stop"], rid


@pytest.mark.parametrize("temperature", [1e-310, 5e-324])
def test_a_tiny_temperature_samples_the_argmax_with_a_finite_logprob(temperature):
    # logits / temperature overflowed to inf, and inf - inf made every probability NaN:
    # token 0 each time, logprob NaN (which the HTTP endpoint wrote as bare NaN: not JSON)
    model = make_model("gpt2")
    p = prompts()[1]
    greedy = model.generate(p[None], 6, temperature=0.0)[0, len(p):].tolist()
    engine = Engine(model, max_batch=1)
    engine.add("t", p, max_new_tokens=6, temperature=temperature, seed=1)
    outs, _ = run(engine, {0: []})
    assert tokens(outs["t"]) == greedy
    assert all(np.isfinite(o.logprob) for o in outs["t"])


def test_cancel_frees_the_slot_for_a_queued_request_and_leaves_the_others_alone():
    model = make_model("modern")
    ps = prompts(5)
    engine = Engine(model, max_batch=2, prefill_chunk=8)
    engine.add("a", ps[0], max_new_tokens=10)
    engine.add("b", ps[1], max_new_tokens=10)
    engine.add("c", ps[2], max_new_tokens=10)
    engine.add("d", ps[3], max_new_tokens=10)
    assert (engine.pending, engine.running, engine.idle) == (4, 0, False)
    outs = {}
    for _ in range(3):
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert (engine.pending, engine.running) == (2, 2)
    assert engine.cancel("b") and engine.cancel("d")
    assert not engine.cancel("b") and not engine.cancel("nobody")
    assert (engine.pending, engine.running) == (1, 1)
    first = engine.step()
    assert [(o.request_id, o.token, o.finished) for o in first[:2]] == [
        ("b", None, "cancelled"), ("d", None, "cancelled")]
    assert first[0].index == len(outs["b"]) and first[1].index == 0
    assert (engine.pending, engine.running) == (0, 2), "c took b's slot"
    for o in first[2:]:
        outs.setdefault(o.request_id, []).append(o)
    while not engine.idle:
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert "d" not in outs
    for rid, p in (("a", ps[0]), ("c", ps[2])):
        alone = model.generate(p[None], 10, temperature=0.0)[0, len(p):].tolist()
        assert tokens(outs[rid]) == alone, rid
    assert not engine.cancel("a"), "finished requests cannot be cancelled"
    engine.add("a", ps[0], max_new_tokens=1)  # a finished id may be used again
    assert [(o.request_id, o.finished) for o in engine.step()] == [("a", "length")]
    assert engine.idle and engine.step() == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_ids=[]), "prompt_ids is empty"),
    (dict(prompt_ids=[[1, 2]]), "1-D sequence of token ids"),
    (dict(prompt_ids=[1.5, 2.0]), "1-D sequence of token ids"),
    (dict(prompt_ids=[1, 256]), r"token id 256, outside the model's vocabulary \[0, 256\)"),
    (dict(prompt_ids=[-1]), "token id -1"),
    (dict(prompt_ids=list(range(30)), max_new_tokens=3),
     "prompt of 30 tokens \\+ max_new_tokens 3 = 33 exceeds the model's block_size 32"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be an int >= 1"),
    (dict(top_k=2.5), "top_k must be an int >= 1"),
    (dict(stop=[[]]), r"stop\[0\] is empty"),
    (dict(stop=[[3], [999]]), r"stop\[1\] holds token id 999"),
    (dict(stop=[7]), r"stop\[0\] must be a 1-D sequence"),
])
def test_bad_requests_are_refused_at_add_with_the_argument_named(kwargs, match):
    engine = Engine(make_model("gpt2"), max_batch=2)
    args = {"request_id": "r", "prompt_ids": [1, 2, 3], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ConfigError, match=match):
        engine.add(**args)
    assert engine.idle and engine.pending == 0


def test_a_prompt_that_fills_the_context_exactly_is_served():
    model = make_model("gpt2")
    engine = Engine(model, max_batch=2, prefill_chunk=7)
    p = np.arange(BLOCK - 2) % 256
    outs, _ = run(engine, {0: [("r", p, dict(max_new_tokens=2))]})
    assert tokens(outs["r"]) == model.generate(p[None], 2, temperature=0.0)[0, -2:].tolist()


def test_a_failing_forward_advances_nothing_and_loses_no_cancellation():
    model = make_model("gpt2")
    engine = Engine(model, max_batch=2, prefill_chunk=4)
    p = prompts()[2]
    engine.add("a", p, max_new_tokens=6)
    engine.add("b", p, max_new_tokens=6)
    first = engine.step()
    engine.cancel("b")
    forward_at = model.forward_at
    model.forward_at = lambda *a, **k: (_ for _ in ()).throw(MemoryError("out of memory"))
    with pytest.raises(MemoryError):
        engine.step()
    model.forward_at = forward_at
    outs = first + engine.step()
    assert [(o.request_id, o.finished) for o in outs] == [("b", "cancelled")]
    while not engine.idle:
        outs += engine.step()
    alone = model.generate(p[None], 6, temperature=0.0)[0, len(p):].tolist()
    assert [o.token for o in outs if o.request_id == "a"] == alone


def test_duplicate_ids_and_bad_engine_settings_are_config_errors():
    model = make_model("gpt2")
    engine = Engine(model, max_batch=1)
    engine.add("r", [1, 2], max_new_tokens=3)
    with pytest.raises(ConfigError, match="request_id 'r' is already queued or running"):
        engine.add("r", [1, 2], max_new_tokens=3)
    for kwargs in (dict(max_batch=0), dict(prefill_chunk=0), dict(max_batch=2.5)):
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            Engine(model, **kwargs)


@pytest.mark.parametrize("case", ["gpt2", "modern"])
def test_the_last_request_in_a_high_slot_decodes_as_it_would_alone(case):
    # Slots 0 .. 2 finish early; slot 3's request goes on alone, its step gathered from the
    # cache (1 of 4 slots running), then "e" joins in slot 0 (a free slot between them).
    model = make_model(case)
    ps = prompts(6)
    engine = Engine(model, max_batch=4, prefill_chunk=16)
    news = (2, 3, 2, 14)
    for i, (p, n) in enumerate(zip(ps[:4], news, strict=True)):
        engine.add(i, p, max_new_tokens=n)
    outs, _ = run(engine, {6: [("e", ps[4], dict(max_new_tokens=5))]})
    for rid, p, n in [(i, ps[i], n) for i, n in enumerate(news)] + [("e", ps[4], 5)]:
        alone = model.generate(p[None], n, temperature=0.0)[0, len(p):].tolist()
        assert tokens(outs[rid]) == alone, rid
