"""Inverted dropout with a mask from narun's global generator."""

from __future__ import annotations

from typing import Any

import numpy as np

from narun.errors import ConfigError
from narun.nn.functional._common import require_float
from narun.tensor import _backend, _random
from narun.tensor._tensor import Tensor, make


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability `p` and scale the rest by 1 / (1 - p).

    The identity (the same tensor) when `training` is False or `p` is 0. The mask is
    `generator.random(x.shape, dtype=float32) >= p`, drawn from narun's global generator on
    the host, so `narun.manual_seed` makes it reproducible on every device.
    """
    require_float("dropout", "input", x)
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    xp = x.xp
    if p == 1.0:
        return make(xp.zeros_like(x.data), (x,), lambda g: (xp.zeros_like(g),), "dropout")
    draw = _random.generator().random(x.shape, dtype=np.float32)
    keep = draw >= p
    if x.dtype == np.float32:
        # The draw's own buffer becomes the scaled mask (0 or 1/(1-p)): applying it is one
        # pass forward and one backward, with no bool-to-float conversion in either.
        scaled = np.multiply(keep, np.float32(1.0 / (1.0 - p)), out=draw)
    else:
        scaled = keep.astype(x.dtype)
        scaled *= 1.0 / (1.0 - p)
    del draw
    mask = _backend.to_device(scaled, x.device)
    out = x.data * mask

    def backward(g: Any) -> tuple[Any]:
        return (g * mask,)

    return make(out, (x,), backward, "dropout")
