"""scaled_dot_product_attention, fused: one score buffer, softmax in place, closed-form backward.

Forward: s = (q * scale) @ k^T, masked, softmax in place -> p, out = p @ v.
Backward, from the saved p and out (FlashAttention's identity rowsum(dP * P) = rowsum(g * out)
saves a pass over the (L, S) scores):
    dv = p^T g;  dp = g v^T;  ds = p * (dp - rowsum(g * out))
    dq = ds k * scale;  dk = ds^T q * scale
Every matmul operand is a plain or transposed view of a C-contiguous (or row-strided) array, so
NumPy hands each batch matrix to BLAS.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from narun.errors import ConfigError, DTypeError, ShapeError
from narun.nn.functional._common import raw, require_float, sum_last
from narun.tensor import _backend, _random
from narun.tensor._tensor import Tensor, check_same_device, make


@functools.lru_cache(maxsize=64)
def _causal_block(device: str, L: int, S: int) -> Any:
    """Positions a query may NOT see under is_causal: j > i (top-left aligned, as torch)."""
    mask = np.triu(np.ones((L, S), dtype=bool), k=1)
    mask.flags.writeable = False
    return _backend.to_device(mask, device)


def _t(a: Any) -> Any:
    return a.swapaxes(-1, -2)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Any = None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) v, as torch.nn.functional.scaled_dot_product_attention.

    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev); batch dims broadcast.
    `attn_mask` broadcasts to (..., L, S): bool (True = may attend) or float (added to the
    scores; differentiable when it requires grad). `is_causal` masks j > i. `scale` defaults
    to 1/sqrt(E). A query that may attend nowhere gets zeros, as torch. `dropout_p` > 0
    drops attention weights with narun's global generator (pass 0.0 in eval).
    """
    op = "scaled_dot_product_attention"
    for name, t in (("query", q), ("key", k), ("value", v)):
        require_float(op, name, t)
        if t.ndim < 2:
            raise ShapeError(f"{op}: {name} needs at least 2 dims (..., seq, features), "
                             f"got shape {t.shape}")
    check_same_device(op, q, k, v)
    L, E = q.shape[-2:]
    S = k.shape[-2]
    if k.shape[-1] != E or v.shape[-2] != S:
        raise ShapeError(f"{op}: query {q.shape}, key {k.shape} and value {v.shape} must be "
                         "(..., L, E), (..., S, E) and (..., S, Ev)")
    if not 0.0 <= dropout_p < 1.0:
        raise ConfigError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise ConfigError(f"{op}: pass either attn_mask or is_causal=True, not both")
    xp, dtype = q.xp, q.dtype
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)

    try:
        batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError as e:
        raise ShapeError(f"{op}: batch dims of query {q.shape}, key {k.shape} and value "
                         f"{v.shape} do not broadcast") from e
    scores_shape = batch + (L, S)

    mask = mask_t = None
    if attn_mask is not None:
        mask = raw(op, "attn_mask", attn_mask, q)
        if mask.dtype.kind != "b" and not _backend.is_floating(mask.dtype):
            raise DTypeError(f"{op}: attn_mask must be bool or floating point, got {mask.dtype}")
        try:
            fits = np.broadcast_shapes(scores_shape, mask.shape) == scores_shape
        except ValueError:
            fits = False
        if not fits:
            raise ShapeError(f"{op}: attn_mask of shape {mask.shape} does not broadcast to "
                             f"the scores' shape {scores_shape} (batch + (L, S))")
        if _backend.is_floating(mask.dtype):
            mask = mask.astype(dtype, copy=False)
        if isinstance(attn_mask, Tensor) and attn_mask.requires_grad:
            mask_t = attn_mask

    qs = q.data * scale  # scaling q (L x E) is cheaper than scaling the (L x S) scores
    s = xp.matmul(qs, _t(k.data))
    masked = is_causal or mask is not None
    if is_causal:
        xp.copyto(s, -xp.inf, where=_causal_block(q.device, L, S))
    elif mask is not None and mask.dtype.kind == "b":
        xp.copyto(s, -xp.inf, where=~mask)
    elif mask is not None:
        s += mask

    p = softmax_scores_(xp, s, masked)

    keep = None
    pd = p
    if dropout_p > 0.0:
        # Drawn on the host from narun's one generator, so a seed gives the same mask on
        # every device.
        draw = _random.generator().random(p.shape, dtype=np.float32)
        keep = _backend.to_device(draw >= dropout_p, q.device)
        pd = p * keep
        pd *= 1.0 / (1.0 - dropout_p)
    out = xp.matmul(pd, v.data)
    parents = (q, k, v) if mask_t is None else (q, k, v, mask_t)

    def backward(g: Any) -> tuple[Any, ...]:
        dv = xp.matmul(_t(pd), g) if v.requires_grad else None
        dp = xp.matmul(g, _t(v.data))
        delta = _rowdot_last(xp, g, out)
        if keep is not None:
            dp *= keep
            dp *= 1.0 / (1.0 - dropout_p)
        dp -= delta[..., None]
        dp *= p  # now ds, the gradient of the masked, scaled scores
        dq = dk = None
        if q.requires_grad:
            dq = xp.matmul(dp, k.data)
            dq *= scale
        if k.requires_grad:
            dk = xp.matmul(_t(dp), qs)
        grads = (dq, dk, dv)
        return grads if mask_t is None else grads + (dp,)

    return make(out, parents, backward, "scaled_dot_product_attention")


def softmax_scores_(xp: Any, s: Any, masked: bool) -> Any:
    """Softmax over the last axis of the scores `s`, in place; returns s. With `masked`, a
    row of all -inf gets zeros (torch's safe softmax), not NaN. Inference calls it too."""
    m = s.max(axis=-1, keepdims=True)
    if masked:
        m[m == -xp.inf] = 0.0
    s -= m
    p = xp.exp(s, out=s)
    den = sum_last(xp, p)[..., None]
    if masked:
        den[den == 0] = 1.0
    p *= xp.reciprocal(den, out=den)
    return p


def _rowdot_last(xp: Any, a: Any, b: Any) -> Any:
    """sum(a * b, -1) for stacks of matrices, as a batched matrix product (no temporary)."""
    return xp.matmul(a[..., None, :], b[..., :, None])[..., 0, 0]
