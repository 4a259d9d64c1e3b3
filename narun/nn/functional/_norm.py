"""layer_norm and rms_norm over the trailing `normalized_shape` dims, fused forward/backward.

Both work on the input as rows (M, D). Forward keeps xhat (the normalized rows) and rstd;
backward uses the closed forms

    layer_norm: dx = rstd * (g w - mean(g w) - xhat * mean(g w xhat))
    rms_norm:   dx = rstd * (g w - xhat * mean(g w xhat))

where both row means are matrix-vector products (g @ w, (g * xhat) @ w), and the weight and
bias gradients are column sums over all leading dims at once.
"""

from __future__ import annotations

import math
from typing import Any

from narun.errors import ShapeError
from narun.nn.functional._common import require_float, sum_last, sum_rows
from narun.tensor._tensor import Tensor, check_same_device, make


def _normalized(op: str, x: Tensor, normalized_shape: Any, *params: Tensor | None) -> int:
    """Check shapes; the number D of elements each row normalizes over."""
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not ns or x.shape[x.ndim - len(ns):] != ns or len(ns) > x.ndim:
        raise ShapeError(f"{op}: normalized_shape {ns} must be a non-empty suffix of the "
                         f"input's shape {x.shape}")
    for name, p in zip(("weight", "bias"), params):
        if p is not None:
            require_float(op, name, p)
            if p.shape != ns:
                raise ShapeError(f"{op}: {name} has shape {p.shape}, expected "
                                 f"normalized_shape {ns}")
    check_same_device(op, x, *(p for p in params if p is not None))
    return math.prod(ns)


def _rowdot(a: Any, b: Any) -> Any:
    """Row-wise dot products of two (M, D) arrays, with no (M, D) temporary."""
    return (a[:, None, :] @ b[:, :, None])[:, 0, 0]


def _backward_rows(xp: Any, g2: Any, xhat: Any, rstd: Any, w: Any, x_shape: tuple[int, ...],
                   center: bool, want_x: bool, want_w: bool) -> tuple[Any, Any]:
    """(dx of shape x_shape, dweight (D,)) for layer_norm (center=True) or rms_norm.

    dx is allocated in x's shape and filled through a 2-d view, so the engine gets an array
    that owns its memory (a returned view would be copied once more for a leaf).
    """
    D = g2.shape[1]
    gx = gw = None
    t = None
    if w is not None and (want_x or want_w):
        t = g2 * xhat
        if want_w:
            gw = sum_rows(xp, t)
    if want_x:
        gx = xp.empty(x_shape, dtype=g2.dtype)
        dx = gx.reshape(g2.shape)
        if w is None:
            dx[...] = g2
            b = _rowdot(g2, xhat)
        else:
            xp.multiply(g2, w, out=dx)
            b = t @ w
        if center:
            a = g2 @ w if w is not None else sum_last(xp, g2)
            a *= 1.0 / D
            dx -= a[:, None]
        b *= 1.0 / D
        if t is None:
            t = xp.empty(g2.shape, dtype=g2.dtype)
        xp.multiply(xhat, b[:, None], out=t)
        dx -= t
        dx *= rstd[:, None]
        if dx.base is None:  # a copy, not a view (MLX): the result is only in `dx`
            gx = dx.reshape(x_shape)
    return gx, gw


def layer_norm_rows(xp: Any, x2: Any, w: Any, b: Any, eps: float) -> tuple[Any, Any, Any]:
    """layer_norm's forward on rows x2 (M, D) with weight and bias (D,) or None: the output
    (a new array), xhat and rstd (what backward keeps). Inference calls it on raw arrays."""
    M, D = x2.shape
    xhat = xp.empty((M, D), dtype=x2.dtype)
    mean = sum_last(xp, x2)
    mean *= 1.0 / D
    xp.subtract(x2, mean[:, None], out=xhat)
    var = _rowdot(xhat, xhat)
    var *= 1.0 / D
    var += eps
    rstd = xp.sqrt(var, out=var)
    xp.reciprocal(rstd, out=rstd)
    xhat *= rstd[:, None]
    if w is not None:
        y = xhat * w
        if b is not None:
            y += b
    else:
        y = xhat if b is None else xhat + b
    return y, xhat, rstd


def rms_norm_rows(xp: Any, x2: Any, w: Any, eps: float) -> tuple[Any, Any, Any]:
    """rms_norm's forward on rows x2 (M, D) with weight (D,) or None: output, xhat, rstd."""
    M, D = x2.shape
    ms = _rowdot(x2, x2)
    ms *= 1.0 / D
    ms += eps
    rstd = xp.sqrt(ms, out=ms)
    xp.reciprocal(rstd, out=rstd)
    xhat = xp.empty((M, D), dtype=x2.dtype)
    xp.multiply(x2, rstd[:, None], out=xhat)
    y = xhat if w is None else xhat * w
    return y, xhat, rstd


def layer_norm(x: Tensor, normalized_shape: int | tuple[int, ...], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing `normalized_shape` dims.

    The variance is the biased one, as in torch.nn.functional.layer_norm.
    """
    op = "layer_norm"
    require_float(op, "input", x)
    D = _normalized(op, x, normalized_shape, weight, bias)
    xp = x.xp
    x2 = x.data.reshape(-1, D)
    M = x2.shape[0]
    w = None if weight is None else weight.data.reshape(D)
    y, xhat, rstd = layer_norm_rows(xp, x2, w, None if bias is None else bias.data.reshape(D),
                                    eps)
    parents = tuple(p for p in (x, weight, bias) if p is not None)

    def backward(g: Any) -> tuple[Any, ...]:
        g2 = g.reshape(M, D)
        gx, gw = _backward_rows(xp, g2, xhat, rstd, w, x.shape, True, x.requires_grad,
                                weight is not None and weight.requires_grad)
        out = [gx]
        if weight is not None:
            out.append(None if gw is None else gw.reshape(weight.shape))
        if bias is not None:
            out.append(sum_rows(xp, g2).reshape(bias.shape) if bias.requires_grad else None)
        return tuple(out)

    return make(y.reshape(x.shape), parents, backward, "layer_norm")


def rms_norm(x: Tensor, normalized_shape: int | tuple[int, ...], weight: Tensor | None = None,
             eps: float | None = None) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the trailing `normalized_shape` dims.

    `eps=None` uses the machine epsilon of x's dtype, as torch.nn.functional.rms_norm.
    """
    op = "rms_norm"
    require_float(op, "input", x)
    D = _normalized(op, x, normalized_shape, weight)
    xp = x.xp
    if eps is None:
        eps = float(xp.finfo(x.dtype).eps)
    x2 = x.data.reshape(-1, D)
    M = x2.shape[0]
    w = None if weight is None else weight.data.reshape(D)
    y, xhat, rstd = rms_norm_rows(xp, x2, w, eps)
    parents = (x,) if weight is None else (x, weight)

    def backward(g: Any) -> tuple[Any, ...]:
        gx, gw = _backward_rows(xp, g.reshape(M, D), xhat, rstd, w, x.shape, False,
                                x.requires_grad, weight is not None and weight.requires_grad)
        return (gx,) if weight is None else (gx, None if gw is None else gw.reshape(weight.shape))

    return make(y.reshape(x.shape), parents, backward, "rms_norm")
