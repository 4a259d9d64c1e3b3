"""GPT: logits, loss and every gradient against an independent PyTorch model; generation."""

import math

import numpy as np
import pytest

import narun
from narun.errors import ConfigError, ShapeError
from narun.models import GPT, PRESETS, GPTConfig, KVCache, build_model, gpt_config
from narun.models.gpt import _sample

SMALL = dict(n_layer=2, n_embd=32, n_head=2, block_size=16)
CASES = {
    "gpt2": ("gpt2-tiny", {}),
    "gpt2-untied": ("gpt2-tiny", {"tie_weights": False}),
    "modern": ("gpt-modern-tiny", {}),
    "modern-bias-hidden": ("gpt-modern-tiny", {"bias": True, "mlp_hidden": 48,
                                               "rope_base": 500.0}),
}


def small_gpt(preset, dtype=np.float64, seed=0, **overrides):
    narun.manual_seed(seed)
    model = GPT(gpt_config(preset, **{**SMALL, **overrides}))
    model.to(dtype=dtype)
    # GPT-2's init (std 0.02) makes near-uniform logits; larger weights make every term of
    # the model matter to the comparison, and give generation peaked distributions.
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = (p.data + 0.3 * rng.standard_normal(p.shape)).astype(p.dtype)
    return model


# ---- an independent PyTorch GPT, written from the papers' equations ---------------------

def torch_gpt(cfg):
    torch = pytest.importorskip("torch", reason="PyTorch is the oracle for these tests")
    tnn, tF = torch.nn, torch.nn.functional
    C, H = cfg.n_embd, cfg.n_head
    D = C // H

    class RMSNorm(tnn.Module):
        def __init__(self):
            super().__init__()
            self.weight = tnn.Parameter(torch.ones(C, dtype=torch.float64))

        def forward(self, x):
            eps = torch.finfo(x.dtype).eps
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.weight

    def norm():
        if cfg.norm == "rmsnorm":
            return RMSNorm()
        return tnn.LayerNorm(C, bias=cfg.bias, dtype=torch.float64)

    def linear(n_in, n_out):
        return tnn.Linear(n_in, n_out, bias=cfg.bias, dtype=torch.float64)

    def rope_tables(T):
        inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
        angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def rotate(x, cos, sin):  # x (B, H, T, D), rotate-half convention
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    class Attention(tnn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = linear(C, 3 * C)
            self.proj = linear(C, C)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.qkv(x).split(C, dim=2)
            q, k, v = (a.view(B, T, H, D).transpose(1, 2) for a in (q, k, v))
            if cfg.position == "rope":
                cos, sin = rope_tables(T)
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            return self.proj((att @ v).transpose(1, 2).reshape(B, T, C))

    class FeedForward(tnn.Module):
        def __init__(self):
            super().__init__()
            if cfg.mlp == "swiglu":
                self.w1, self.w3 = linear(C, cfg.hidden), linear(C, cfg.hidden)
                self.w2 = linear(cfg.hidden, C)
            else:
                self.fc, self.proj = linear(C, cfg.hidden), linear(cfg.hidden, C)

        def forward(self, x):
            if cfg.mlp == "swiglu":
                return self.w2(tF.silu(self.w1(x)) * self.w3(x))
            return self.proj(tF.gelu(self.fc(x), approximate="tanh"))

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn, self.ln_2, self.mlp = norm(), Attention(), norm(), FeedForward()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class TorchGPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.wte = tnn.Embedding(cfg.vocab_size, C, dtype=torch.float64)
            if cfg.position == "learned":
                self.wpe = tnn.Embedding(cfg.block_size, C, dtype=torch.float64)
            self.h = tnn.ModuleList([Block() for _ in range(cfg.n_layer)])
            self.ln_f = norm()
            if not cfg.tie_weights:
                self.lm_head = tnn.Linear(C, cfg.vocab_size, bias=False, dtype=torch.float64)

        def forward(self, idx):
            x = self.wte(idx)
            if cfg.position == "learned":
                x = x + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            x = self.ln_f(x)
            head = self.wte.weight if cfg.tie_weights else self.lm_head.weight
            return x @ head.T

    return torch, TorchGPT()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_loss_and_every_gradient_match_pytorch(case):
    preset, overrides = CASES[case]
    model = small_gpt(preset, **overrides)
    torch, ref = torch_gpt(model.config)
    # strict: the torch model's parameter names are the narun names, one for one
    ref.load_state_dict({k: torch.from_numpy(v.numpy().copy())
                         for k, v in model.state_dict().items()}, strict=True)
    rng = np.random.default_rng(1)
    B, T = 3, model.config.block_size
    idx = rng.integers(0, model.config.vocab_size, (B, T))
    targets = rng.integers(0, model.config.vocab_size, (B, T))

    logits = model(idx)
    expected = ref(torch.from_numpy(idx))
    assert logits.dtype == np.float64 and logits.shape == (B, T, model.config.vocab_size)
    np.testing.assert_allclose(logits.numpy(), expected.detach().numpy(), rtol=1e-9,
                               atol=1e-10)
    # a shorter sequence uses the first positions (learned table / RoPE angles from 0)
    np.testing.assert_allclose(model(idx[:, :5]).numpy(), expected[:, :5].detach().numpy(),
                               rtol=1e-9, atol=1e-10)

    loss = model.loss(idx, targets)
    ref_loss = torch.nn.functional.cross_entropy(expected.reshape(B * T, -1),
                                                 torch.from_numpy(targets).reshape(-1))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert loss.item() > 0.5  # the scaled weights make the loss far from trivial

    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(ref_params)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        g, tg = p.grad.numpy(), ref_params[name].grad.numpy()
        scale = np.abs(tg).max()
        assert scale > 0, name
        np.testing.assert_allclose(g, tg, rtol=1e-8, atol=1e-10 * scale, err_msg=name)


def test_float32_model_matches_its_float64_self():
    m32 = small_gpt("gpt-modern-tiny", dtype=np.float32)
    m64 = small_gpt("gpt-modern-tiny", dtype=np.float64)
    idx = np.random.default_rng(2).integers(0, 256, (2, 16))
    l32, l64 = m32(idx), m64(idx)
    assert l32.dtype == np.float32
    np.testing.assert_allclose(l32.numpy(), l64.numpy(), rtol=1e-4, atol=1e-4)


# ---- the KV cache -------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["gpt2-tiny", "gpt-modern-tiny"])
def test_cached_forward_in_chunks_equals_the_full_forward(preset):
    model = small_gpt(preset)
    cfg = model.config
    model.eval()
    idx = np.random.default_rng(3).integers(0, 256, (2, 12))
    full = model(idx).numpy()
    caches = [KVCache(2, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head,
                      model.wte.weight) for _ in model.h]
    # a prompt, then a chunk of several tokens with history (the masked path), then one
    parts = [model(idx[:, :5], caches), model(idx[:, 5:11], caches), model(idx[:, 11:], caches)]
    np.testing.assert_allclose(np.concatenate([p.numpy() for p in parts], axis=1), full,
                               rtol=1e-9, atol=1e-10)
    assert caches[0].length == 12
    with pytest.raises(ShapeError, match="block_size"):
        model(idx[:, :5], caches)  # 12 cached + 5 > 16


@pytest.mark.parametrize("preset", ["gpt2-tiny", "gpt-modern-tiny"])
def test_forward_at_explicit_positions_equals_the_forward(preset):
    model = small_gpt(preset)
    cfg = model.config
    model.eval()
    idx = np.random.default_rng(5).integers(0, 256, (1, 12))
    full = model(idx).numpy()
    caches = [KVCache(1, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head,
                      model.wte.weight) for _ in model.h]
    first = model.forward_at(narun.tensor(idx[:, :7]), np.arange(7), caches)
    # the rest at positions 7.., asking for two columns' logits only
    rest = model.forward_at(narun.tensor(idx[:, 7:]), np.arange(7, 12), caches, rows=[4, 1])
    np.testing.assert_allclose(first.numpy(), full[:, :7], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(rest.numpy(), full[:, [11, 8]], rtol=1e-9, atol=1e-10)


def test_forward_longer_than_block_size_is_a_shape_error():
    model = small_gpt("gpt2-tiny")
    with pytest.raises(ShapeError, match="17 positions exceed block_size 16"):
        model(np.zeros((1, 17), dtype=np.int64))


# ---- generation ---------------------------------------------------------------------------

PROMPTS = np.array([[1, 2, 3, 4, 5], [200, 100, 50, 25, 12]])


@pytest.mark.parametrize("preset", ["gpt2-tiny", "gpt-modern-tiny"])
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.7, 5), (1.3, 40)])
def test_cached_and_uncached_generation_give_the_same_tokens(preset, temperature, top_k):
    model = small_gpt(preset, dtype=np.float32)
    # 5 + 20 tokens > block_size 16: the cache is refilled from the cropped context
    for seed in (0, 1, 2):
        kw = dict(temperature=temperature, top_k=top_k, seed=seed)
        cached = model.generate(PROMPTS, 20, use_cache=True, **kw)
        plain = model.generate(PROMPTS, 20, use_cache=False, **kw)
        assert cached.shape == (2, 25)
        np.testing.assert_array_equal(cached[:, :5], PROMPTS)
        np.testing.assert_array_equal(cached, plain)
    assert model.training, "generate restores the training mode"


def test_generate_stream_yields_each_token_as_generate_would_and_checks_eagerly():
    model = small_gpt("gpt2-tiny", dtype=np.float32)
    whole = model.generate(PROMPTS, 20, temperature=0.9, top_k=7, seed=5)
    stream = model.generate_stream(PROMPTS, 20, temperature=0.9, top_k=7, seed=5)
    first = next(stream)  # one token column, before the rest are computed
    assert first.shape == (2,)
    assert not model.training, "eval mode while the stream is open"
    rest = list(stream)
    np.testing.assert_array_equal(np.stack([first, *rest], axis=1), whole[:, 5:])
    assert model.training, "the stream restores the training mode when it ends"
    early = model.generate_stream(PROMPTS, 100_000, temperature=0.0)
    next(early)
    early.close()  # stopping early: no more work, the training mode is back
    assert model.training
    with pytest.raises(ConfigError, match="top_k"):
        model.generate_stream(PROMPTS, 3, top_k=-1)  # at the call, not at the first next()


def test_greedy_generation_is_argmax_of_the_uncached_forward():
    model = small_gpt("gpt-modern-tiny")
    out = model.generate(PROMPTS, 15, temperature=0.0)
    ids = PROMPTS.copy()
    for _ in range(15):
        logits = model(ids[:, -model.config.block_size:]).numpy()[:, -1]
        ids = np.concatenate([ids, logits.argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, ids)
    assert len(np.unique(out[:, 5:])) > 2, "a non-degenerate continuation"


def test_sampling_is_seeded_and_top_k_limits_the_choices():
    model = small_gpt("gpt2-tiny", dtype=np.float32)
    a = model.generate(PROMPTS, 10, temperature=1.0, seed=7)
    assert np.array_equal(a, model.generate(PROMPTS, 10, temperature=1.0, seed=7))
    assert not np.array_equal(a, model.generate(PROMPTS, 10, temperature=1.0, seed=8))
    # top_k=1 is greedy at any temperature
    np.testing.assert_array_equal(model.generate(PROMPTS, 10, temperature=5.0, top_k=1, seed=3),
                                  model.generate(PROMPTS, 10, temperature=0.0))
    # every sampled token is among the top 3 of the logits it was drawn from
    out = model.generate(PROMPTS, 10, temperature=2.0, top_k=3, seed=4)
    for t in range(5, 15):
        logits = model(out[:, max(0, t - 16):t]).numpy()[:, -1]
        top3 = np.argsort(logits, axis=-1)[:, -3:]
        assert all(out[b, t] in top3[b] for b in range(2)), t


def test_sample_frequencies_follow_the_tempered_softmax():
    logits = np.array([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 40000
    rng = np.random.default_rng(0)
    for temperature, top_k in ((1.0, None), (0.5, None), (2.0, 3)):
        scaled = logits / temperature
        if top_k is not None:
            scaled = np.where(scaled >= np.sort(scaled)[-top_k], scaled, -np.inf)
        p = np.exp(scaled - scaled.max())
        p /= p.sum()
        draws = _sample(np.tile(logits, (n, 1)), temperature, top_k, rng)
        freq = np.bincount(draws, minlength=len(logits)) / n
        sigma = np.sqrt(p * (1 - p) / n)
        assert np.all(np.abs(freq - p) <= 5 * sigma + 1e-12), (temperature, top_k, freq, p)


@pytest.mark.parametrize("kwargs,key", [({"temperature": -1.0}, "temperature"),
                                        ({"top_k": 0}, "top_k"), ({"top_k": -2}, "top_k")])
def test_bad_sampling_arguments_are_config_errors(kwargs, key):
    model = small_gpt("gpt2-tiny", dtype=np.float32)
    with pytest.raises(ConfigError, match=key):
        model.generate(PROMPTS, 3, **kwargs)


def test_bad_max_new_tokens_is_a_config_error():
    model = small_gpt("gpt2-tiny", dtype=np.float32)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        model.generate(PROMPTS, -1)
    np.testing.assert_array_equal(model.generate(PROMPTS, 0), PROMPTS)


def test_empty_or_misshapen_prompts_are_shape_errors():
    model = small_gpt("gpt2-tiny", dtype=np.float32)
    with pytest.raises(ShapeError, match=r"T >= 1, got shape \(1, 0\)"):
        model.generate(np.zeros((1, 0), dtype=np.int64), 3)
    with pytest.raises(ShapeError, match=r"\(B, T\)"):
        model.generate(np.zeros((1, 2, 3), dtype=np.int64), 3)
    with pytest.raises(ShapeError, match=r"\(B, T\)"):
        model(np.zeros(4, dtype=np.int64))
    # a 1-D prompt is one sequence
    assert model.generate([1, 2, 3], 2).shape == (1, 5)


# ---- configs and presets ------------------------------------------------------------------

def test_bad_presets_and_keys_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'n_embd'"):
        gpt_config("gpt2-tiny", n_embed=3)
    with pytest.raises(ConfigError, match="unknown preset 'gpt3'.*gpt2-tiny"):
        gpt_config("gpt3")
    with pytest.raises(ConfigError, match="n_embd: 30 is not divisible by model.n_head 4"):
        gpt_config("gpt2-tiny", n_embd=30)
    with pytest.raises(ConfigError, match="model.n_layer: must be > 0"):
        gpt_config("gpt2-tiny", n_layer=0)
    with pytest.raises(ConfigError, match="model.norm"):
        gpt_config("gpt2-tiny", norm="batchnorm")
    with pytest.raises(ConfigError, match="even head size"):
        gpt_config("gpt-modern-tiny", n_embd=12, n_head=4)
    with pytest.raises(ConfigError, match="model.dropout"):
        gpt_config("gpt2-tiny", dropout=1.0)
    with pytest.raises(ConfigError, match="model.mlp_hidden: must be > 0"):
        gpt_config("gpt2-tiny", mlp_hidden=0)
    with pytest.raises(ConfigError, match="model.rope_base: must be > 1"):
        gpt_config("gpt-modern-tiny", rope_base=0.0)
    with pytest.raises(ConfigError, match="model.name: unknown model 'gtp'"):
        build_model("gtp")


def expected_parameter_count(cfg: GPTConfig) -> int:
    """GPT's parameters, counted from the architecture (no allocation)."""
    C, V, hidden, b = cfg.n_embd, cfg.vocab_size, cfg.hidden, int(cfg.bias)
    norm = C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    attn = C * 3 * C + 3 * C * b + C * C + C * b
    if cfg.mlp == "swiglu":
        mlp = 2 * (C * hidden + hidden * b) + hidden * C + C * b
    else:
        mlp = C * hidden + hidden * b + hidden * C + C * b
    total = V * C + cfg.n_layer * (2 * norm + attn + mlp) + norm
    total += cfg.block_size * C if cfg.position == "learned" else 0
    total += 0 if cfg.tie_weights else V * C
    return total


@pytest.mark.parametrize("case", sorted(CASES) + ["gpt2-nobias"])
def test_parameter_count_formula_matches_built_models(case):
    preset, overrides = CASES.get(case, ("gpt2-tiny", {"bias": False}))
    cfg = gpt_config(preset, **{**SMALL, **overrides})
    assert GPT(cfg).num_parameters() == expected_parameter_count(cfg)


def test_gpt2_small_preset_is_gpt2_124m():
    # Building it takes seconds (124M normal draws); the formula is checked against built
    # models above, so counting from the config is exact.
    cfg = gpt_config("gpt2-small")
    assert expected_parameter_count(cfg) == 124_439_808
    assert PRESETS["gpt2-small"]["vocab_size"] == 50257 and cfg.hidden == 3072


def test_gpt2_init_zeroes_biases_and_keeps_norm_gains_at_one():
    from narun.models import GPT, gpt_config

    model = GPT(gpt_config("gpt2-tiny", n_layer=2, n_embd=32, n_head=2, block_size=16))
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            np.testing.assert_array_equal(p.numpy(), 0, err_msg=name)
        elif name.endswith((".ln_1.weight", ".ln_2.weight", "ln_f.weight")):
            np.testing.assert_array_equal(p.numpy(), 1, err_msg=name)
