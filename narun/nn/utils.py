"""Gradient clipping, as torch.nn.utils: clip_grad_norm_ and clip_grad_value_."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from narun.errors import CheckpointError, ConfigError, GradError
from narun.tensor._tensor import Tensor

__all__ = ["clip_coefficient", "clip_grad_norm_", "clip_grad_value_", "load_buffers",
           "persistent_buffers", "zero_grads"]


def zero_grads(parameters: Iterable[Tensor], set_to_none: bool = True) -> None:
    """Drop each parameter's `.grad` (or fill it with zeros in place): Module and Optimizer."""
    for p in parameters:
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            p.grad.data.fill(0)


def _grads(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    return [p.grad for p in params if p.grad is not None]


def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
    """Scale all gradients in place so that their joint norm is at most `max_norm`.

    The norm is taken over all gradients together, as if concatenated into one vector.
    Returns that total norm (before clipping) as a 0-d tensor, as torch does. Gradients are
    scaled by max_norm / (total + 1e-6) only when that factor is below 1.
    """
    max_norm = float(max_norm)
    norm_type = float(norm_type)
    if norm_type <= 0 and norm_type != -math.inf:
        raise ConfigError(f"clip_grad_norm_: norm_type must be > 0 or inf, got {norm_type}")
    grads = _grads(parameters)
    if not grads:
        return Tensor._wrap(np.zeros((), dtype=np.float32))
    xp = grads[0].xp
    if norm_type == math.inf:
        total = max(float(xp.abs(g.data).max()) if g.data.size else 0.0 for g in grads)
    elif norm_type == -math.inf:
        total = min(float(xp.abs(g.data).min()) if g.data.size else math.inf for g in grads)
    else:
        acc = 0.0
        for g in grads:
            flat = g.data.reshape(-1)
            if norm_type == 2.0:
                if flat.dtype.itemsize < 4:  # BLAS has no half-precision dot
                    flat = flat.astype(xp.float32)
                acc += float(xp.dot(flat, flat))  # one BLAS pass, no |g|^2 temporary
            elif norm_type == 1.0:
                acc += float(xp.abs(flat).sum(dtype=xp.float64))
            else:
                acc += float((xp.abs(flat).astype(xp.float64) ** norm_type).sum())
        total = acc ** (1.0 / norm_type)
    if error_if_nonfinite and not math.isfinite(total):
        raise GradError(f"clip_grad_norm_: the total norm of order {norm_type} of the "
                        f"gradients is non-finite ({total}), so it cannot be clipped; pass "
                        "error_if_nonfinite=False to clip anyway")
    coef = clip_coefficient(total, max_norm)
    if coef != 1.0:
        with np.errstate(invalid="ignore"):
            for g in grads:
                g.data *= coef
    return Tensor._wrap(xp.asarray(total, dtype=grads[0].dtype))


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """The factor clip_grad_norm_ scales gradients by: max_norm / (total_norm + 1e-6) when
    that is below 1, else 1. Shared with the parameter servers, which know the total norm
    only from the pieces each shard holds."""
    coef = max_norm / (total_norm + 1e-6)
    # A non-finite total scales by 0 or nan, as torch does: inf * 0 is nan, on purpose.
    return coef if coef < 1.0 or math.isnan(coef) else 1.0


def clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float) -> None:
    """Clamp every gradient element to [-clip_value, clip_value], in place."""
    clip_value = float(clip_value)
    if clip_value < 0:
        raise ConfigError(f"clip_grad_value_: clip_value must be >= 0, got {clip_value}")
    for g in _grads(parameters):
        g.xp.clip(g.data, -clip_value, clip_value, out=g.data)


def persistent_buffers(module: Any) -> dict[str, Tensor]:
    """The buffers `module.state_dict()` holds (a BatchNorm's running statistics), by dotted
    name, sharing memory with the module: what a checkpoint keeps besides the parameters."""
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in module.state_dict().items() if k not in params}


def load_buffers(module: Any, values: dict[str, Any]) -> None:
    """Copy `values` (name -> array, named as `persistent_buffers` names them) into the
    module's buffers in place, on its device (`load_state_dict`'s shape and dtype checks
    apply); CheckpointError naming any value that is not one of its persistent buffers."""
    foreign = sorted(set(values) - persistent_buffers(module).keys())
    if foreign:
        raise CheckpointError(f"load_buffers: {', '.join(map(repr, foreign))} are not "
                              f"persistent buffers of {type(module).__name__}")
    module.load_state_dict(values, strict=False)
