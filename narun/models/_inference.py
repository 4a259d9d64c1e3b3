"""GPT's inference forward on raw arrays: what `GPT.forward_at` runs for a serving engine.

The autograd ops check their arguments and wrap every result in a Tensor; at one token per
sequence that bookkeeping, not arithmetic, was most of a decode step (2.2 ms of a 1-stream
step for ~0.1 ms of matmuls, gpt2-tiny float32). Here the same forward kernels the ops use
(`layer_norm_rows`, `gelu_tanh_forward`, `rotate_forward`, `softmax_scores_`) run on the
arrays directly, with the step's tokens as rows (B * T, C), so the numbers are `GPT.forward`'s
up to the rounding of differently shaped matmuls. No graph is recorded and dropout is never
applied.

A cache given to `forward_rows` has `attend_arrays(q, k, v)`: q, k, v (B, T, H, D) arrays
(views into the fused qkv projection) -> the attention output (B, T, H, D), C-contiguous.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from narun import nn
from narun.nn.functional import _norm, _rope
from narun.nn.functional._attention import softmax_scores_
from narun.tensor import _backend
from narun.tensor._ops_elementwise import _sigmoid, gelu_tanh_forward


def forward_rows(model: Any, ids: Any, positions: Any, caches: list[Any],
                 rows: Any = None) -> Any:
    """Logits (B, len(rows) or T, vocab) of token ids `ids` (B, T) at `positions` (T,)."""
    cfg = model.config
    wte = model.wte.weight
    xp, W = wte.xp, wte.data
    B, T = ids.shape
    C, H = cfg.n_embd, cfg.n_head
    D = C // H
    pos = np.asarray(positions, dtype=np.int64)
    x = xp.take(W, ids.reshape(-1), axis=0)  # (B * T, C)
    rope = None
    if cfg.position == "learned":
        x = x.reshape(B, T, C)
        x += xp.take(model.wpe.weight.data, xp.asarray(pos), axis=0)
        x = x.reshape(B * T, C)
    else:
        cos, sin = _rope.rotary_cos_sin(int(pos.max()) + 1, D, base=cfg.rope_base,
                                        dtype=x.dtype, device=wte.device)
        dpos = xp.asarray(pos)
        rope = (cos.data[dpos][:, None, :], sin.data[dpos][:, None, :])  # (T, 1, D)
    for block, cache in zip(model.h, caches, strict=True):
        # Children and parameters straight from the modules' tables: Module.__getattr__ (a
        # miss of the normal lookup, then three dicts) made ~120 lookups cost ~130 us a step.
        parts = block._modules
        attn = parts["attn"]._modules
        qkv = _linear(xp, _norm_rows(xp, parts["ln_1"], x), attn["qkv"]).reshape(B, T, 3, H, D)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if rope is not None:
            q = _rope.rotate_forward(xp, q, rope[0], rope[1], q.shape)
            k = _rope.rotate_forward(xp, k, rope[0], rope[1], k.shape)
        y = cache.attend_arrays(q, k, v).reshape(B * T, C)
        x += _linear(xp, y, attn["proj"])
        x += _mlp(xp, parts["mlp"], _norm_rows(xp, parts["ln_2"], x))
    x = x.reshape(B, T, C)
    if rows is not None:
        x = x[:, rows]
    R = x.shape[1]
    head = wte if cfg.tie_weights else model.lm_head.weight
    h = _norm_rows(xp, model.ln_f, x.reshape(B * R, C))
    return (h @ head.data.T).reshape(B, R, head.shape[0])


def _array(module: Any, name: str) -> Any:
    """The array of `module`'s parameter `name`, or None where it has none (no bias)."""
    p = module._parameters.get(name)
    return None if p is None else p.data


def _linear(xp: Any, x2: Any, layer: Any) -> Any:
    out = x2 @ _array(layer, "weight").T
    b = _array(layer, "bias")
    if b is not None:
        out += b
    return out


def _norm_rows(xp: Any, norm: Any, x2: Any) -> Any:
    w = _array(norm, "weight")
    w = None if w is None else w.reshape(-1)
    if isinstance(norm, nn.LayerNorm):
        b = _array(norm, "bias")
        return _norm.layer_norm_rows(xp, x2, w, None if b is None else b.reshape(-1), norm.eps)[0]
    eps = float(xp.finfo(x2.dtype).eps) if norm.eps is None else norm.eps
    return _norm.rms_norm_rows(xp, x2, w, eps)[0]


def _mlp(xp: Any, mlp: Any, h: Any) -> Any:
    layers = mlp._modules
    if mlp.kind == "swiglu":
        a = _linear(xp, h, layers["w1"])
        u = a * _sigmoid(xp, a)  # silu, as F.silu computes it
        u *= _linear(xp, h, layers["w3"])
        return _linear(xp, u, layers["w2"])
    return _linear(xp, gelu_tanh_forward(xp, _linear(xp, h, layers["fc"]))[0], layers["proj"])


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
