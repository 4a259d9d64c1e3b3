"""A multi-layer perceptron: Linear layers with an activation between them."""

from __future__ import annotations

from collections.abc import Sequence

from narun import nn
from narun.errors import ConfigError
from narun.models._registry import register_model
from narun.tensor import Tensor

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """`MLP([784, 1024, 10], "relu")`: Linear(784, 1024) -> ReLU -> Linear(1024, 10)."""

    def __init__(self, sizes: Sequence[int], activation: str = "relu", bias: bool = True):
        super().__init__()
        if len(sizes) < 2 or any(int(n) <= 0 for n in sizes):
            raise ConfigError(f"model.sizes: need at least two positive sizes, got {sizes}")
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
