"""GPT: the GPT-2 architecture, with switches for the modern variant (RoPE, RMSNorm, SwiGLU).

Shapes follow the PyTorch convention: tokens (B, T) int64 -> logits (B, T, vocab_size).
Attention runs on (B, H, T, head_dim) so each head's matmuls are contiguous BLAS calls.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

import narun
from narun import nn
from narun.amp import at_least_float32
from narun.errors import ConfigError, ShapeError
from narun.models import _inference
from narun.models._registry import register_model
from narun.nn import functional as F
from narun.tensor import Tensor
from narun.utils import checkpoint


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256          # the longest context the model is built for
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True              # biases in Linear layers and LayerNorm
    norm: str = "layernorm"        # "layernorm" | "rmsnorm"
    mlp: str = "gelu"              # "gelu" (4x, tanh GELU as GPT-2) | "swiglu"
    mlp_hidden: int | None = None  # default: 4 * n_embd for gelu, 2 * n_embd for swiglu
    position: str = "learned"      # "learned" | "rope"
    rope_base: float = 10000.0
    tie_weights: bool = True
    # recompute each block's activations in backward instead of keeping them (training only)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"model.{key}: must be > 0, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd: {self.n_embd} is not divisible by "
                              f"model.n_head {self.n_head}")
        choices = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"),
                   "position": ("learned", "rope")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"model.{key}: {getattr(self, key)!r} is not one of {valid}")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"model.n_embd: RoPE needs an even head size, got "
                              f"{self.n_embd // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if self.mlp_hidden is not None and int(self.mlp_hidden) <= 0:
            raise ConfigError(f"model.mlp_hidden: must be > 0 (or null for the default), "
                              f"got {self.mlp_hidden}")
        if not self.rope_base > 1.0:  # base <= 1 gives non-decaying or NaN frequencies
            raise ConfigError(f"model.rope_base: must be > 1, got {self.rope_base}")

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 4 * self.n_embd if self.mlp == "gelu" else 2 * self.n_embd


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": dict(vocab_size=256, block_size=256, n_layer=4, n_head=4, n_embd=128),
    "gpt2-small": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt-modern-tiny": dict(vocab_size=256, block_size=256, n_layer=4, n_head=4, n_embd=256,
                            bias=False, norm="rmsnorm", mlp="swiglu", position="rope"),
}


def gpt_config(preset: str | None = None, **overrides: Any) -> GPTConfig:
    """A GPTConfig from a preset name plus field overrides; ConfigError names bad keys."""
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {preset!r}; "
                              f"valid: {sorted(PRESETS)}")
        base = dict(PRESETS[preset])
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    for key in overrides:
        if key not in fields:
            import difflib
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"model.{key}: not a GPT config field{hint} "
                              f"(valid: {sorted(fields)})")
    base.update(overrides)
    return GPTConfig(**base)


def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd)
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


class KVCache:
    """Keys and values of past positions for one attention layer, preallocated."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, like: Tensor):
        shape = (batch, n_head, max_len, head_dim)
        self.xp, self.device = like.xp, like.device
        self.k = like.xp.zeros(shape, dtype=like.dtype)
        self.v = like.xp.zeros(shape, dtype=like.dtype)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        t = k.shape[2]
        end = self.length + t
        self.k[:, :, self.length:end] = k.data
        self.v[:, :, self.length:end] = v.data
        self.length = end
        return Tensor._wrap(self.k[:, :, :end]), Tensor._wrap(self.v[:, :, :end])

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of the new queries over every cached position plus their own keys.

        Attention layers call this on whatever cache they are given, so a cache with another
        layout decides what each query sees (`GPT.forward_at` calls `attend_arrays`, which
        the serving engine's one-slot-per-sequence cache implements).
        """
        past = self.length
        k, v = self.append(k, v)
        return attend_after(q, k, v, past)

    def attend_arrays(self, q: Any, k: Any, v: Any) -> Any:
        """`attend` for `GPT.forward_at`'s raw arrays, laid out (B, T, H, D)."""
        end = self.length + q.shape[1]
        self.k[:, :, self.length:end] = k.swapaxes(1, 2)
        self.v[:, :, self.length:end] = v.swapaxes(1, 2)
        self.length = end
        y = _inference.attend_after_arrays(self.xp, q.swapaxes(1, 2), self.k[:, :, :end],
                                           self.v[:, :, :end], self.device)
        return self.xp.ascontiguousarray(y.swapaxes(1, 2))


def attend_after(q: Tensor, k: Tensor, v: Tensor, past: int) -> Tensor:
    """Causal attention of T queries at positions past .. past + T - 1 over keys and values
    (..., past + T, D) that hold positions 0 .. past + T - 1."""
    T = q.shape[2]
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
    mask = None
    if T > 1:
        mask = narun.tensor(np.tril(np.ones((T, past + T), dtype=bool), k=past))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                cache: Any = None) -> Tensor:
        B, T, C = x.shape
        H = self.n_head
        qkv = self.qkv(x).reshape(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if rope is not None:
            cos, sin = rope
            q, k = F.apply_rotary_emb(q, cos, sin), F.apply_rotary_emb(k, cos, sin)
        if cache is not None:
            y = cache.attend(q, k, v)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return F.dropout(self.proj(y), self.dropout, self.training)


class MLPBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.w1 = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias)
            self.w3 = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias)
            self.w2 = nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.bias)
        else:
            self.fc = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias)
            self.proj = nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            y = self.w2(F.silu(self.w1(x)) * self.w3(x))
        else:
            y = self.proj(F.gelu(self.fc(x), approximate="tanh"))
        return F.dropout(y, self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = _norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = _norm(cfg)
        self.mlp = MLPBlock(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                cache: Any = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer language model."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.position == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = _norm(cfg)
        if not cfg.tie_weights:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's scheme: N(0, 0.02) for matrices, residual projections scaled by depth,
        # zero biases (Linear's own default drew them uniform), norm gains left at one.
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.ndim < 2:
                if name.endswith(".bias"):
                    nn.init.zeros_(p)
                continue
            std = residual_std if name.endswith(("attn.proj.weight", "mlp.proj.weight",
                                                 "mlp.w2.weight")) else 0.02
            nn.init.normal_(p, 0.0, std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Any, caches: list[Any] | None = None) -> Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T)."""
        idx = idx if isinstance(idx, Tensor) else narun.tensor(np.asarray(idx, dtype=np.int64))
        if idx.ndim != 2:
            raise ShapeError(f"GPT: expected token ids (B, T), got shape {idx.shape}")
        B, T = idx.shape
        offset = caches[0].length if caches else 0
        cfg = self.config
        if offset + T > cfg.block_size:
            raise ShapeError(f"GPT: {offset + T} positions exceed block_size "
                             f"{cfg.block_size}; crop the context or build a bigger model")
        x = self.embed(idx, offset)
        rope = self.rope_for(T, x, offset)
        if cfg.gradient_checkpointing and self.training and not caches:
            for block in self.h:  # each block's input kept, its insides recomputed
                x = checkpoint(block, x, rope)
            return self.head(x)
        for i, block in enumerate(self.h):
            x = block(x, rope, caches[i] if caches else None)
        return self.head(x)

    # The forward's three parts, which a pipeline's first, middle and last stages run.
    def embed(self, idx: Tensor, offset: int = 0) -> Tensor:
        """Token (and learned position) embeddings (B, T, C) of ids `idx` (B, T) that sit
        at positions offset .. offset + T - 1, after dropout."""
        x = self.wte(idx)
        if self.config.position == "learned":
            x = x + self.wpe(narun.arange(offset, offset + idx.shape[1], device=idx.device))
        return self.drop(x)

    def rope_for(self, T: int, like: Tensor, offset: int = 0) -> tuple[Tensor, Tensor] | None:
        """The rotary cos/sin tables the blocks take for T positions, or None (learned)."""
        cfg = self.config
        if cfg.position == "learned":
            return None
        return F.rotary_cos_sin(T, cfg.n_embd // cfg.n_head, base=cfg.rope_base,
                                offset=offset, dtype=like.dtype, device=like.device)

    def head(self, x: Tensor) -> Tensor:
        """Logits (B, T, vocab_size) of the last block's output."""
        x = self.ln_f(x)
        weight = self.wte.weight if self.config.tie_weights else self.lm_head.weight
        return F.linear(x, weight)

    def forward_at(self, idx: Tensor, positions: Any, caches: list[Any], rows: Any = None,
                   weights: _inference.InferenceWeights | None = None) -> Tensor:
        """Logits (B, len(rows), vocab_size) for token ids `idx` (B, T) whose column t sits
        at position `positions[t]`: the ragged batch of an inference engine, where the
        columns belong to different sequences. `caches` (one per layer) have an
        `attend_arrays(q, k, v)` that decides which keys each column's query sees, as
        `KVCache.attend_arrays` does for one sequence. `rows` picks the columns whose logits
        are wanted (default all), so a prefill chunk pays the head for its last token only.
        Inference only: the forward's own kernels run on raw arrays (`_inference`), so the
        logits are the forward's, but no graph is recorded, no dropout is applied and no
        positions are checked against block_size. `weights`, from
        `_inference.InferenceWeights.of(model)`, saves laying the weights out on every call
        (an engine makes it once).
        """
        ids = idx.data if isinstance(idx, Tensor) else self.wte.weight.xp.asarray(idx)
        weights = weights or _inference.InferenceWeights.of(self)
        return Tensor._wrap(_inference.forward_rows(weights, ids, positions, caches, rows))

    def loss(self, idx: Any, targets: Any) -> Tensor:
        """Mean next-token cross-entropy in nats (in float32 at least, whatever the model
        computes in)."""
        logits = at_least_float32(self.forward(idx))
        t = targets if isinstance(targets, Tensor) else narun.tensor(
            np.asarray(targets, dtype=np.int64))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1))

    @narun.no_grad()
    def generate(self, ids: Any, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None,
                 use_cache: bool = True) -> np.ndarray:
        """Sample `max_new_tokens` after `ids` (B, T); returns (B, T + max_new_tokens).

        temperature 0 picks the most likely token; top_k None means no limit. With
        `use_cache`, past keys and values are kept, so each new token costs one position
        instead of the whole context; the tokens are identical either way for the same seed.
        """
        ids = _check_prompt(ids)
        new = list(self.generate_stream(ids, max_new_tokens, temperature, top_k, seed,
                                        use_cache))
        return np.concatenate([ids, np.stack(new, axis=1)], axis=1) if new else ids

    def generate_stream(self, ids: Any, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, seed: int | None = None,
                        use_cache: bool = True) -> Iterator[np.ndarray]:
        """`generate`, one step at a time: yields each new token column (B,) as soon as it
        is sampled, so a caller can print it before the next one is computed. The tokens
        are those `generate` returns for the same arguments. Arguments are checked here,
        before the first token; closing the iterator early stops the sampling.

            >>> for col in model.generate_stream(tok.encode("Once")[None], 100):
            ...     print(tok.decode(col), end="", flush=True)
        """
        if int(max_new_tokens) < 0:
            raise ConfigError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        if not temperature >= 0.0:  # also refuses NaN
            raise ConfigError(f"generate: temperature must be >= 0 (0 = greedy), "
                              f"got {temperature}")
        if top_k is not None and int(top_k) < 1:
            raise ConfigError(f"generate: top_k must be >= 1 (or None for no limit), "
                              f"got {top_k}")
        return self._generate(_check_prompt(ids), int(max_new_tokens), temperature,
                              None if top_k is None else int(top_k), np.random.default_rng(seed),
                              use_cache)

    def _generate(self, ids: np.ndarray, n_new: int, temperature: float, top_k: int | None,
                  rng: np.random.Generator, use_cache: bool) -> Iterator[np.ndarray]:
        cfg = self.config
        caches: list[KVCache] | None = None
        fed = 0  # how many tokens of `ids` the caches hold
        was_training = self.training
        self.eval()
        try:
            for _ in range(n_new):
                if not use_cache:
                    logits = self.forward(ids[:, -cfg.block_size:])
                elif caches is None or fed + 1 > cfg.block_size:
                    # (Re)fill the caches from the cropped context, as the uncached path sees.
                    context = ids[:, -cfg.block_size:]
                    like = self.wte.weight
                    caches = [KVCache(ids.shape[0], cfg.n_head, cfg.block_size,
                                      cfg.n_embd // cfg.n_head, like) for _ in self.h]
                    logits = self.forward(context, caches)
                    fed = context.shape[1]
                else:
                    logits = self.forward(ids[:, -1:], caches)
                    fed += 1
                nxt = _sample(logits.numpy()[:, -1, :].astype(np.float64), temperature, top_k,
                              rng)
                ids = np.concatenate([ids, nxt[:, None]], axis=1)
                yield nxt
        finally:
            self.train(was_training)


def _check_prompt(ids: Any) -> np.ndarray:
    ids = np.atleast_2d(np.asarray(ids, dtype=np.int64))
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ShapeError(f"generate: ids must be (B, T) token ids with T >= 1, "
                         f"got shape {ids.shape}")
    return ids


def _sample(logits: np.ndarray, temperature: float, top_k: int | None,
            rng: np.random.Generator) -> np.ndarray:
    if temperature <= 0:
        return logits.argmax(axis=-1)
    return draw_tokens(sampling_probs(logits, temperature, top_k), rng)


def sampling_probs(logits: np.ndarray, temperature: float, top_k: int | None) -> np.ndarray:
    """The distribution (B, V) that `generate` samples from at temperature > 0:
    softmax(logits / temperature), restricted to the top_k logits of each row."""
    # the max is taken out before dividing: a tiny temperature (5e-324) turned the top
    # logits into inf, and inf - inf made every probability NaN; this way they stay 0,
    # and the others may overflow to -inf: probability 0, as meant
    with np.errstate(over="ignore"):
        logits = (logits - logits.max(axis=-1, keepdims=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p


def draw_tokens(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row of the distributions `p` (B, V), by inverse CDF of one uniform
    draw per row: a generator seeded alike gives the same tokens wherever it runs."""
    u = rng.random((p.shape[0], 1))
    return np.minimum((p.cumsum(axis=-1) < u).sum(axis=-1), p.shape[-1] - 1)


@register_model("gpt", GPTConfig, presets=sorted(PRESETS))
def _build(preset: str | None = "gpt2-tiny", **overrides: Any) -> GPT:
    return GPT(gpt_config(preset, **overrides))
