"""GPT's inference forward on raw arrays: what `GPT.forward_at` runs for a serving engine.

The autograd ops check their arguments and wrap every result in a Tensor; at one token per
sequence that bookkeeping, not arithmetic, was most of a decode step (2.2 ms of a 1-stream
step for ~0.1 ms of matmuls, gpt2-tiny float32). Here the same forward kernels the ops use
(`layer_norm_rows`, `gelu_tanh_forward`, `rotate_forward`, `softmax_scores_`) run on the
arrays directly, with the step's tokens as rows (B * T, C), so the numbers are `GPT.forward`'s
up to the rounding of differently shaped matmuls. No graph is recorded and dropout is never
applied. The weights come from an `InferenceWeights` snapshot, laid out once for this use.

A cache given to `forward_rows` has `attend_arrays(q, k, v)`: q, k, v (B, T, H, D) arrays
(views into the fused qkv projection) -> the attention output (B, T, H, D), C-contiguous.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from narun import nn
from narun.nn.functional import _norm, _rope
from narun.nn.functional._attention import softmax_scores_
from narun.tensor import _backend
from narun.tensor._ops_elementwise import _sigmoid, gelu_tanh_forward


class _Linear(NamedTuple):
    wt: Any           # the weight transposed, (in, out) C-contiguous
    bias: Any         # (out,) or None


class _NormLayer(NamedTuple):
    layer: bool       # LayerNorm (else RMSNorm)
    weight: Any       # (D,) or None
    bias: Any         # (D,) or None
    eps: float


class _Block(NamedTuple):
    ln_1: _NormLayer
    qkv: _Linear
    proj: _Linear
    ln_2: _NormLayer
    mlp: tuple[_Linear, ...]  # (fc, proj), or (w1, w3, w2) for SwiGLU
    swiglu: bool


@dataclass(frozen=True)
class InferenceWeights:
    """A GPT's weights laid out once for inference: every linear's weight transposed into
    an (in, out) C-contiguous copy, because OpenBLAS multiplies a few rows by it ~1.3-1.5x
    faster than by the transposed view of the (out, in) weight (32 x 128 @ 128 x 384:
    42 vs 69 us, float32, 1 thread, this machine); and the modules' lookups done once, not
    ~120 times a step. A snapshot: a model whose weights change needs a new one."""

    config: Any
    xp: Any
    device: str
    wte: Any
    wpe: Any          # or None (rotary positions)
    blocks: tuple[_Block, ...]
    ln_f: _NormLayer
    head: _Linear

    @staticmethod
    def of(model: Any) -> InferenceWeights:
        wte = model.wte.weight
        xp = wte.xp
        cfg = model.config

        def linear(layer: Any) -> _Linear:
            return _Linear(xp.ascontiguousarray(_array(layer, "weight").T), _array(layer, "bias"))

        def norm(module: Any) -> _NormLayer:
            w, b = _array(module, "weight"), _array(module, "bias")
            w = None if w is None else w.reshape(-1)
            b = None if b is None else b.reshape(-1)
            layer = isinstance(module, nn.LayerNorm)
            eps = module.eps
            if not layer and eps is None:
                eps = float(xp.finfo(wte.dtype).eps)
            return _NormLayer(layer, w, b, eps)

        blocks = []
        for block in model.h:
            attn, mlp = block.attn, block.mlp
            swiglu = mlp.kind == "swiglu"
            layers = (mlp.w1, mlp.w3, mlp.w2) if swiglu else (mlp.fc, mlp.proj)
            blocks.append(_Block(norm(block.ln_1), linear(attn.qkv), linear(attn.proj),
                                 norm(block.ln_2), tuple(linear(m) for m in layers), swiglu))
        head = model.wte if cfg.tie_weights else model.lm_head
        return InferenceWeights(cfg, xp, wte.device, wte.data,
                                model.wpe.weight.data if cfg.position == "learned" else None,
                                tuple(blocks), norm(model.ln_f), linear(head))


def forward_rows(weights: InferenceWeights, ids: Any, positions: Any, caches: list[Any],
                 rows: Any = None) -> Any:
    """Logits (B, len(rows) or T, vocab) of token ids `ids` (B, T) at `positions` (T,)."""
    cfg, xp = weights.config, weights.xp
    B, T = ids.shape
    C, H = cfg.n_embd, cfg.n_head
    D = C // H
    pos = np.asarray(positions, dtype=np.int64)
    x = xp.take(weights.wte, ids.reshape(-1), axis=0)  # (B * T, C)
    rope = None
    if weights.wpe is not None:
        x = x.reshape(B, T, C)
        x += xp.take(weights.wpe, xp.asarray(pos), axis=0)
        x = x.reshape(B * T, C)
    else:
        cos, sin = _rope.rotary_cos_sin(int(pos.max()) + 1, D, base=cfg.rope_base,
                                        dtype=x.dtype, device=weights.device)
        dpos = xp.asarray(pos)
        rope = (cos.data[dpos][:, None, :], sin.data[dpos][:, None, :])  # (T, 1, D)
    last = len(weights.blocks) - 1
    R = T
    for i, (block, cache) in enumerate(zip(weights.blocks, caches, strict=True)):
        qkv = _linear(_norm_rows(xp, block.ln_1, x), block.qkv).reshape(B, T, 3, H, D)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if rope is not None:
            q = _rope.rotate_forward(xp, q, rope[0], rope[1], q.shape)
            k = _rope.rotate_forward(xp, k, rope[0], rope[1], k.shape)
        y = cache.attend_arrays(q, k, v).reshape(B * T, C)
        if i == last and rows is not None:
            # Every column's keys and values are in the cache now; past this point a column
            # only feeds its own logits, so the last block's projection and MLP run for the
            # wanted rows alone (a prefill chunk's other tokens skip 1/n_layer of their work)
            R = len(rows)
            x = x.reshape(B, T, C)[:, rows].reshape(B * R, C)
            y = y.reshape(B, T, C)[:, rows].reshape(B * R, C)
        x += _linear(y, block.proj)
        x += _mlp(xp, block, _norm_rows(xp, block.ln_2, x))
    h = _norm_rows(xp, weights.ln_f, x.reshape(B * R, C))
    return _linear(h, weights.head).reshape(B, R, weights.head.wt.shape[1])


def _array(module: Any, name: str) -> Any:
    """The array of `module`'s parameter `name`, or None where it has none (no bias)."""
    p = module._parameters.get(name)
    return None if p is None else p.data


def _linear(x2: Any, layer: _Linear) -> Any:
    out = x2 @ layer.wt
    if layer.bias is not None:
        out += layer.bias
    return out


def _norm_rows(xp: Any, norm: _NormLayer, x2: Any) -> Any:
    if norm.layer:
        return _norm.layer_norm_rows(xp, x2, norm.weight, norm.bias, norm.eps)[0]
    return _norm.rms_norm_rows(xp, x2, norm.weight, norm.eps)[0]


def _mlp(xp: Any, block: _Block, h: Any) -> Any:
    if block.swiglu:
        w1, w3, w2 = block.mlp
        a = _linear(h, w1)
        u = a * _sigmoid(xp, a)  # silu, as F.silu computes it
        u *= _linear(h, w3)
        return _linear(u, w2)
    fc, proj = block.mlp
    return _linear(gelu_tanh_forward(xp, _linear(h, fc))[0], proj)


@functools.lru_cache(maxsize=256)
def _future(device: str, T: int, S: int) -> Any:
    """For T queries at the last T of S positions: True where a key lies in a query's
    future (key j > S - T + i)."""
    mask = np.triu(np.ones((T, S), dtype=bool), k=S - T + 1)
    mask.flags.writeable = False
    return _backend.to_device(mask, device)


def attend_after_arrays(xp: Any, q: Any, k: Any, v: Any, device: str) -> Any:
    """`attend_after` on arrays: T queries q (..., T, D) at the last T positions of the keys
    and values k, v (..., S, D), each seeing the keys up to its own position."""
    T, S = q.shape[-2], k.shape[-2]
    s = xp.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.swapaxes(-1, -2))
    if T > 1:
        xp.copyto(s, -xp.inf, where=_future(device, T, S))
    return xp.matmul(softmax_scores_(xp, s, T > 1), v)
