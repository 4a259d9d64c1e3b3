"""Batch normalization over the batch and spatial axes (torch.nn.functional.batch_norm).

Training normalizes with the batch's own mean and biased variance per channel, and moves
the running statistics toward them (the variance unbiased, n / (n - 1), as torch keeps it);
eval normalizes with the running statistics. The backward is the closed form, one pass
over the gradient for its two channel sums.
"""

from __future__ import annotations

from typing import Any

from narun.errors import ShapeError
from narun.nn.functional._common import require_float
from narun.tensor._tensor import Tensor, check_same_device, make


def batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """x (N, C, ...) normalized per channel C. With `training` (or no running statistics)
    the batch's statistics are used and, when given, the running ones updated in place."""
    op = "batch_norm"
    require_float(op, "input", x)
    if x.ndim < 2:
        raise ShapeError(f"{op}: expected (N, C, ...), got shape {x.shape}")
    C = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (C,):
            raise ShapeError(f"{op}: {name} has shape {t.shape}, expected ({C},) for "
                             f"{C} channels")
    parents = tuple(t for t in (x, weight, bias) if t is not None)
    check_same_device(op, *parents)
    xp, X = x.xp, x.data
    axes = (0, *range(2, x.ndim))
    shape = (1, C) + (1,) * (x.ndim - 2)
    use_batch = training or running_mean is None or running_var is None
    if use_batch:
        n = X.size // C
        if n < 2 and training:
            raise ShapeError(f"{op}: training needs more than one value per channel, got "
                             f"input of shape {x.shape}")
        mean = X.mean(axis=axes)
        centered = X - mean.reshape(shape)
        var = (centered * centered).mean(axis=axes)
        if training and running_mean is not None and running_var is not None:
            running_mean.data *= 1.0 - momentum
            running_mean.data += momentum * mean
            running_var.data *= 1.0 - momentum
            running_var.data += momentum * var * (n / (n - 1))
    else:
        mean, var = running_mean.data, running_var.data  # type: ignore[union-attr]
        centered = X - mean.reshape(shape)
    invstd = 1.0 / xp.sqrt(var + eps)
    xhat = centered * invstd.reshape(shape)
    out = xhat * weight.data.reshape(shape) if weight is not None else xhat.copy()
    if bias is not None:
        out += bias.data.reshape(shape)

    def backward(g: Any) -> tuple[Any, ...]:
        gxhat = g * weight.data.reshape(shape) if weight is not None else g
        grads: list[Any] = []
        if x.requires_grad:
            if use_batch:  # the batch statistics depend on x too
                m = X.size // C
                s1 = gxhat.sum(axis=axes).reshape(shape)
                s2 = (gxhat * xhat).sum(axis=axes).reshape(shape)
                gx = (gxhat - s1 / m - xhat * (s2 / m)) * invstd.reshape(shape)
            else:
                gx = gxhat * invstd.reshape(shape)
            grads.append(gx)
        else:
            grads.append(None)
        if weight is not None:
            grads.append((g * xhat).sum(axis=axes) if weight.requires_grad else None)
        if bias is not None:
            grads.append(g.sum(axis=axes) if bias.requires_grad else None)
        return tuple(grads)

    return make(out, parents, backward, "batch_norm")
