"""Activation modules and Dropout: thin Module wrappers over the functional ops."""

from __future__ import annotations

from narun.errors import ConfigError
from narun.nn import functional as F
from narun.nn._module import Module
from narun.tensor import _ops_elementwise as E
from narun.tensor._tensor import Tensor


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return E.relu(x)


class GELU(Module):
    """GELU, exact (`approximate="none"`) or GPT-2's tanh form (`approximate="tanh"`)."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ConfigError(f"GELU: approximate must be 'none' or 'tanh', got "
                              f"{approximate!r}")
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return E.gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class SiLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return E.silu(x)


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        return E.tanh(x)


class Sigmoid(Module):
    def forward(self, x: Tensor) -> Tensor:
        return E.sigmoid(x)


class Dropout(Module):
    """Zeroes each element with probability `p` in training mode, scaling the rest by
    1/(1-p); the identity in eval mode. Masks come from narun's global generator."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
