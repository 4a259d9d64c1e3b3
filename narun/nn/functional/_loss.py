"""Losses: cross_entropy (fused with log_softmax), nll_loss, mse_loss.

cross_entropy is the last op of every language-model step, so it is written for passes over
the (rows, classes) logits: forward reads the logits for the max, writes exp(x - max) once
into the buffer backward turns into the gradient in place, and never builds a one-hot
matrix; backward is one scaling pass plus one write per row at the target class.
"""

from __future__ import annotations

from typing import Any

from narun.errors import ConfigError, DTypeError, ShapeError
from narun.nn.functional._common import (
    check_reduction,
    raw,
    require_float,
    require_int,
    sum_last,
)
from narun.tensor import _backend
from narun.tensor._tensor import Tensor, check_same_device, make


def _class_last(op: str, x: Tensor, t: Any) -> Any:
    """The input viewed with the class dim last, (*target.shape, C), as torch lays it out:
    (C,) with a 0-d target, (N, C) with (N,), (N, C, d1, ...) with (N, d1, ...)."""
    xp = x.xp
    if x.ndim == 0:
        raise ShapeError(f"{op}: input must have a class dim, got a 0-d tensor")
    xm = x.data if x.ndim <= 2 else xp.moveaxis(x.data, 1, -1)
    if t.shape != xm.shape[:-1]:
        want = xm.shape[:-1]
        raise ShapeError(f"{op}: target of shape {t.shape} does not fit input of shape "
                         f"{x.shape}; expected target shape {want}")
    return xm


def _targets(op: str, xp: Any, t: Any, n_classes: int, ignore_index: int) -> tuple[Any, Any]:
    """(valid mask, targets with ignored entries replaced by class 0); range-checked."""
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= n_classes))
    if bad.any():
        first = int(t[bad].ravel()[0])
        raise IndexError(f"{op}: target {first} is out of bounds for {n_classes} classes "
                         f"(and is not ignore_index={ignore_index})")
    return valid, xp.where(valid, t, 0)


def _flat_targets(xp: Any, ts: Any, n_classes: int) -> Any:
    """Flat positions of each row's target in a C-contiguous (*ts.shape, C) array."""
    flat = xp.arange(ts.size) * n_classes
    flat += ts.ravel()
    return flat


def _class_weight(op: str, weight: Any, x: Tensor, n_classes: int) -> Any:
    if weight is None:
        return None
    w = raw(op, "weight", weight, x)
    if w.shape != (n_classes,):
        raise ShapeError(f"{op}: weight must have shape ({n_classes},) (one per class), "
                         f"got {w.shape}")
    return w.astype(x.dtype, copy=False)


def _reduce(xp: Any, per_row: Any, denom: Any, reduction: str) -> tuple[Any, Any]:
    """The reduced loss and, for 'mean', 1 / denom, the factor backward scales rows by.

    A mean over zero weight (every target ignored) is NaN as in torch, with a zero gradient.
    """
    if reduction == "none":
        return per_row, None
    total = per_row.sum()
    if reduction == "sum":
        return xp.asarray(total), None
    nonzero = denom != 0
    inv = xp.where(nonzero, 1.0 / xp.where(nonzero, denom, 1.0), 0.0).astype(per_row.dtype)
    return xp.where(nonzero, total * inv, xp.nan).astype(per_row.dtype), inv


def cross_entropy(input: Tensor, target: Any, weight: Any = None, *,  # noqa: A002 - torch name
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy between logits `input` and integer class `target`, as torch's.

    `input` is (C,), (N, C) or (N, C, d1, ...); `target` holds class indices of shape (),
    (N,) or (N, d1, ...). `weight` (C,) rescales each class (it is not differentiated).
    Targets equal to `ignore_index` add nothing, and `mean` divides by the summed weight of
    the others (their count without `weight`). `label_smoothing` mixes the one-hot target
    with the uniform distribution. Probability (soft) targets are not supported.

        >>> F.cross_entropy(logits, targets, ignore_index=-1, label_smoothing=0.1)
    """
    op = "cross_entropy"
    require_float(op, "input", input)
    check_reduction(op, reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ConfigError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    xp = input.xp
    t = raw(op, "target", target, input)
    if _backend.is_floating(t.dtype):
        raise DTypeError(f"{op}: target must hold integer class indices, got {t.dtype} "
                         "(probability targets are not supported)")
    require_int(op, "target", t)
    xm = _class_last(op, input, t)
    C = xm.shape[-1]
    valid, ts = _targets(op, xp, t, C, ignore_index)
    w = _class_weight(op, weight, input, C)
    eps = float(label_smoothing)
    dtype = input.dtype
    w_total = None if w is None else w.sum()

    m = xm.max(axis=-1, keepdims=True)
    e = xp.empty(xm.shape, dtype=dtype)
    xp.subtract(xm, m, out=e)
    xp.exp(e, out=e)
    s = sum_last(xp, e)
    lse = xp.log(s)
    lse += m[..., 0]
    nll = lse - xp.take_along_axis(xm, ts[..., None], axis=-1)[..., 0]
    wt = valid.astype(dtype) if w is None else w[ts] * valid
    per_row = nll * wt
    if eps:
        # sum_c w_c * -log p_c = W * logsumexp - x . w, without a log-probability matrix.
        if w is None:
            smooth = lse * C - sum_last(xp, xm)
        else:
            smooth = lse * w_total - xm @ w
        smooth *= valid
        per_row *= 1.0 - eps
        per_row += smooth * (eps / C)
    out, inv = _reduce(xp, per_row, wt.sum(), reduction)
    # backward takes `e` (exp(x - max), C-contiguous, owned by nobody else) and turns it into
    # the gradient in place; a second backward (retain_graph) recomputes it from the input.
    saved = [e]
    del e

    def backward(g: Any) -> tuple[Any]:
        if saved:
            grad = saved.pop()
        else:
            grad = xp.empty(xm.shape, dtype=dtype)
            xp.subtract(xm, m, out=grad)
            xp.exp(grad, out=grad)
        c = g * valid if inv is None else (g * inv) * valid  # d(loss)/d(per-row term)
        # d/dx = a * softmax - (1 - eps) c w_t onehot - (eps / C) c w,
        # a = c ((1 - eps) w_t + eps W / C), W = sum of weights (C without weights).
        if w is None:
            a = c
            at_target = c * (1.0 - eps) if eps else c
        else:
            at_target = c * w[ts]
            if eps:
                at_target *= 1.0 - eps
            a = at_target + c * (eps / C * w_total) if eps else at_target
        grad *= (a / s)[..., None]
        flat = grad.reshape(-1)
        flat[_flat_targets(xp, ts, C)] -= at_target.ravel()
        if flat.base is None:  # a copy, not a view (MLX): the update is only in `flat`
            grad = flat.reshape(grad.shape)
        if eps:
            if w is None:
                grad -= (c * (eps / C))[..., None]
            else:
                grad -= (c * (eps / C))[..., None] * w
        return (grad if input.ndim <= 2 else xp.moveaxis(grad, -1, 1),)

    return make(out, (input,), backward, "cross_entropy")


def nll_loss(input: Tensor, target: Any, weight: Any = None, *,  # noqa: A002 - torch name
             ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of log-probabilities `input` at class `target`, as torch's.

    Shapes, `weight`, `ignore_index` and `reduction` are as in `cross_entropy`, which is
    `nll_loss(log_softmax(x, 1), t)` fused; use that for logits.
    """
    op = "nll_loss"
    require_float(op, "input", input)
    check_reduction(op, reduction)
    xp = input.xp
    t = raw(op, "target", target, input)
    require_int(op, "target", t)
    xm = _class_last(op, input, t)
    C = xm.shape[-1]
    valid, ts = _targets(op, xp, t, C, ignore_index)
    w = _class_weight(op, weight, input, C)
    wt = valid.astype(input.dtype) if w is None else w[ts] * valid
    per_row = xp.take_along_axis(xm, ts[..., None], axis=-1)[..., 0] * wt
    per_row *= -1
    out, inv = _reduce(xp, per_row, wt.sum(), reduction)

    def backward(g: Any) -> tuple[Any]:
        grad = xp.zeros(xm.shape, dtype=input.dtype)
        c = g * wt if inv is None else (g * inv) * wt
        flat = grad.reshape(-1)
        flat[_flat_targets(xp, ts, C)] = -c.ravel()
        if flat.base is None:  # a copy, not a view (MLX): the update is only in `flat`
            grad = flat.reshape(grad.shape)
        return (grad if input.ndim <= 2 else xp.moveaxis(grad, -1, 1),)

    return make(out, (input,), backward, "nll_loss")


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:  # noqa: A002
    """Mean (or summed, or elementwise) squared error; shapes broadcast as in torch."""
    op = "mse_loss"
    require_float(op, "input", input)
    check_reduction(op, reduction)
    if not isinstance(target, Tensor):
        target = Tensor._wrap(raw(op, "target", target, input).astype(input.dtype, copy=False))
    check_same_device(op, input, target)
    xp = input.xp
    d = input.data - target.data
    if reduction == "none":
        out = d * d
    else:
        flat = d.reshape(-1)
        total = xp.dot(flat, flat)  # one read, no squared temporary
        out = xp.asarray(total / d.size if reduction == "mean" else total, dtype=d.dtype)

    def backward(g: Any) -> tuple[Any, Any]:
        scale = g * (2.0 / d.size) if reduction == "mean" else g * 2.0
        gi = d * scale
        return (gi if input.requires_grad else None,
                -gi if target.requires_grad else None)

    return make(out, (input, target), backward, "mse_loss")
