"""BatchNorm2d: per-channel normalization with running statistics, as torch's.

In training mode each batch is normalized by its own statistics and the running mean and
variance move toward them by `momentum`; in eval mode the running statistics are used, so
a model's outputs no longer depend on what else is in the batch. The running statistics
are buffers, not parameters: the parameter servers do not hold them. In ps-sync and
ps-async each trainer keeps its own and trainer 0 reports them with each step, for the
coordinator to evaluate and checkpoint with (workers/trainer.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from narun.errors import ConfigError
from narun.nn import functional as F
from narun.nn import init
from narun.nn._linear import _empty
from narun.nn._module import Module
from narun.tensor import _backend
from narun.tensor._tensor import Tensor


class BatchNorm2d(Module):
    """Normalize (N, C, H, W) per channel C; weight starts at ones, bias at zeros."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, device: str | None = None, dtype: Any = None) -> None:
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) \
                or num_features < 1:
            raise ConfigError(f"BatchNorm2d: num_features must be an int >= 1, got "
                              f"{num_features!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"BatchNorm2d: momentum must be in [0, 1], got {momentum}")
        self.num_features, self.eps, self.momentum = num_features, float(eps), float(momentum)
        if affine:
            self.weight = _empty((num_features,), device, dtype)
            self.bias = _empty((num_features,), device, dtype)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        xp = _backend.module_for_device(device or "cpu")
        dt = _backend.as_dtype(dtype or _backend.DEFAULT_DTYPE)
        self.register_buffer("running_mean", Tensor._wrap(xp.zeros(num_features, dtype=dt)))
        self.register_buffer("running_var", Tensor._wrap(xp.ones(num_features, dtype=dt)))
        self.register_buffer("num_batches_tracked", Tensor._wrap(xp.zeros((), dtype=np.int64)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            init.ones_(self.weight)
            init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ConfigError(f"BatchNorm2d: expected (N, C, H, W), got shape {x.shape}")
        if self.training:
            self.num_batches_tracked.data += 1
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
