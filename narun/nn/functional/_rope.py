"""Rotary position embedding (RoPE), rotate-half convention (GPT-NeoX, Llama in HF).

Layout: x is (B, H, T, D) (heads before time, as scaled_dot_product_attention takes it);
cos and sin are (T, D) tables from `rotary_cos_sin`, broadcast over the leading dims. Each
pair (x[i], x[i + D/2]) is rotated by the angle pos * base^(-2i/D):

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from narun.errors import ConfigError, ShapeError
from narun.nn.functional._common import raw, require_float
from narun.tensor import _backend
from narun.tensor._tensor import Tensor, check_same_device, make

_tables: dict[tuple[Any, ...], tuple[Any, Any]] = {}
_tables_lock = threading.Lock()


def rotary_cos_sin(seq_len: int, head_dim: int, base: float = 10000.0, offset: int = 0,
                   dtype: Any = None, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """cos and sin tables (seq_len, head_dim) for positions offset .. offset + seq_len - 1.

    The same values as HF's rotary embedding (each half of the last dim repeats the angles
    pos * base^(-2i/head_dim)), computed in float64 and cast to `dtype` (default float32).
    Tables are cached per (head_dim, base, dtype, device) and grown by doubling, so the
    per-token calls of KV-cached generation (offset = tokens so far) return slices of one
    table. The returned tensors are read-only views; do not write into them.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ConfigError(f"rotary_cos_sin: head_dim must be a positive even number, "
                          f"got {head_dim}")
    if seq_len < 0 or offset < 0:
        raise ConfigError(f"rotary_cos_sin: seq_len and offset must be non-negative, got "
                          f"seq_len={seq_len}, offset={offset}")
    dtype = _backend.as_dtype(dtype or _backend.DEFAULT_DTYPE)
    device = _backend.normalize_device(device)
    end = offset + seq_len
    key = (head_dim, float(base), dtype.str, device)
    with _tables_lock:
        cos, sin = _tables.get(key, (None, None))
        if cos is None or cos.shape[0] < end:
            cap = max(end, 2 * (0 if cos is None else cos.shape[0]), 16)
            inv_freq = float(base) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
            angles = np.outer(np.arange(cap, dtype=np.float64), inv_freq)
            angles = np.concatenate([angles, angles], axis=1)
            cos, sin = (f(angles).astype(dtype) for f in (np.cos, np.sin))
            for a in (cos, sin):
                a.flags.writeable = False
            cos, sin = _backend.to_device(cos, device), _backend.to_device(sin, device)
            _tables[key] = (cos, sin)
    return Tensor._wrap(cos[offset:end]), Tensor._wrap(sin[offset:end])


def _halves(a: Any, h: int) -> tuple[Any, Any]:
    return a[..., :h], a[..., h:]


def rotate_forward(xp: Any, X: Any, c: Any, s: Any, shape: tuple[int, ...]) -> Any:
    """apply_rotary_emb's forward on arrays: X * c + rotate_half(X) * s, a new C-contiguous
    array of the broadcast `shape`; inference calls it on raw arrays. X is often a view into
    a fused qkv projection: it is read strided once, into a copy the passes then stream."""
    X = xp.ascontiguousarray(X)
    out = xp.empty(shape, dtype=X.dtype)
    xp.multiply(X, c, out=out)
    h = X.shape[-1] // 2
    return _add_swapped(xp, out, X, xp.concatenate([-s[..., :h], s[..., h:]], axis=-1))


def _add_swapped(xp: Any, out: Any, a: Any, signed: Any) -> Any:
    """out += a with its last axis's halves swapped, times `signed`, in one product: seen
    as (..., 2, D/2), the swap is a reversed view, so nothing is copied and no pass runs on
    half-width rows (rotate_half(a) * s is swap(a) * (-s1, s2); the same value, as a - b is
    a + (-b) in floating point). Returns `out` (or, where reshape copies, as in MLX, the
    updated copy)."""
    h = a.shape[-1] // 2
    out2 = out.reshape(out.shape[:-1] + (2, h))
    out2 += xp.multiply(a.reshape(a.shape[:-1] + (2, h))[..., ::-1, :],
                        signed.reshape(signed.shape[:-1] + (2, h)))
    return out if out2.base is not None else out2.reshape(out.shape)


def apply_rotary_emb(x: Tensor, cos: Any, sin: Any) -> Tensor:
    """x * cos + rotate_half(x) * sin for x (..., T, D) and cos, sin broadcastable to it.

    The backward is exact (the op is linear in x): g * cos + rotate_half^T(g * sin), with
    rotate_half^T(y) = cat(y[..., D/2:], -y[..., :D/2]). cos and sin get gradients too when
    they are tensors that require grad.
    """
    op = "apply_rotary_emb"
    require_float(op, "input", x)
    D = x.shape[-1] if x.ndim else 0
    if x.ndim < 2 or D % 2:
        raise ShapeError(f"{op}: input must be (..., T, D) with D even, got {x.shape}")
    c, s = raw(op, "cos", cos, x), raw(op, "sin", sin, x)
    try:
        shape = np.broadcast_shapes(x.shape, c.shape, s.shape)
    except ValueError as e:
        raise ShapeError(f"{op}: cos {c.shape} and sin {s.shape} do not broadcast to the "
                         f"input's shape {x.shape}") from e
    if c.shape[-1] != D or s.shape[-1] != D:
        raise ShapeError(f"{op}: cos {c.shape} and sin {s.shape} must end in D={D}")
    xp, h = x.xp, D // 2
    X = x.data
    x1, x2 = _halves(X, h)
    out = rotate_forward(xp, X, c, s, shape)
    tensors = [(v, isinstance(v, Tensor) and v.requires_grad) for v in (cos, sin)]
    parents = (x,) + tuple(v for v, needs in tensors if needs)
    check_same_device(op, *parents)

    def backward(g: Any) -> tuple[Any, ...]:
        g1, g2 = _halves(g, h)
        grads = []
        if x.requires_grad:  # g * c + rotate_half^T(g * s) = g * c + swap(g) * (s2, -s1)
            gx = _add_swapped(xp, g * c, g, xp.concatenate([s[..., h:], -s[..., :h]], axis=-1))
            grads.append(gx)
        else:
            grads.append(None)
        if tensors[0][1]:
            grads.append(g * X)
        if tensors[1][1]:
            gs = xp.empty(g.shape, dtype=g.dtype)
            lo, hi = gs[..., :h], gs[..., h:]
            xp.multiply(g1, x2, out=lo)
            lo *= -1
            xp.multiply(g2, x1, out=hi)
            if lo.base is None:  # copies, not views (MLX): join them
                gs = xp.concatenate([lo, hi], axis=-1)
            grads.append(gs)
        return tuple(grads)

    return make(out, parents, backward, "apply_rotary_emb")
