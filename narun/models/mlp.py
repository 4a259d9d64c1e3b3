"""A multi-layer perceptron: Linear layers with an activation between them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from narun import nn
from narun.errors import ConfigError
from narun.models._registry import register_model
from narun.tensor import Tensor

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _valid_sizes(sizes: object) -> bool:
    # int(n) would quietly turn 3.7 into 3 and a string "64" into 64: refuse both.
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (Sequence, np.ndarray)):
        return False
    return len(sizes) >= 2 and all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in sizes)


class MLP(nn.Module):
    """`MLP([784, 1024, 10], "relu")`: Linear(784, 1024) -> ReLU -> Linear(1024, 10)."""

    def __init__(self, sizes: Sequence[int], activation: str = "relu", bias: bool = True):
        super().__init__()
        if not _valid_sizes(sizes):
            raise ConfigError(f"model.sizes: need a list of at least two positive integers "
                              f"(input, ..., output), got {sizes!r}")
        if activation not in _ACTIVATIONS:
            raise ConfigError(f"model.activation: unknown {activation!r}; "
                              f"valid: {sorted(_ACTIVATIONS)}")
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(int(n_in), int(n_out), bias=bias))
            if i < len(sizes) - 2:
                layers.append(_ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)
        self.sizes = [int(n) for n in sizes]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register_model("mlp", {"sizes": list[int], "activation": str, "bias": bool})
def _build(sizes: Sequence[int] = (784, 256, 10), activation: str = "relu",
           bias: bool = True) -> MLP:
    return MLP(sizes, activation, bias)
