"""Linear, Embedding and Identity."""

from __future__ import annotations

from typing import Any

import numpy as np

from narun.errors import ConfigError
from narun.nn import functional as F
from narun.nn import init
from narun.nn._module import Module, Parameter
from narun.tensor import _backend
from narun.tensor._ops_matmul import linear
from narun.tensor._tensor import Tensor


def _empty(shape: tuple[int, ...], device: str | None, dtype: Any) -> Parameter:
    xp = _backend.module_for_device(device or "cpu")
    return Parameter(xp.empty(shape, dtype=_backend.as_dtype(dtype or _backend.DEFAULT_DTYPE)))


def _positive(layer: str, **sizes: Any) -> None:
    for name, n in sizes.items():
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ConfigError(f"{layer}: {name} must be a non-negative int, got {n!r}")


class Identity(Module):
    """Returns its input unchanged (a placeholder that keeps a model's structure)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return x


class Linear(Module):
    """y = x @ weight.T + bias, weight (out_features, in_features), as torch.nn.Linear.

    Initialised like torch: weight ~ kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)),
    bias ~ U(-1/sqrt(in), 1/sqrt(in)).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: str | None = None, dtype: Any = None) -> None:
        super().__init__()
        _positive("Linear", in_features=in_features, out_features=out_features)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight = _empty((self.out_features, self.in_features), device, dtype)
        if bias:
            self.bias = _empty((self.out_features,), device, dtype)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.default_layer_init_(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Embedding(Module):
    """A lookup table: row `i` of `weight` (num_embeddings, embedding_dim) for index `i`.

    weight ~ N(0, 1) as torch's; the `padding_idx` row starts at zero and gets no gradient.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 padding_idx: int | None = None, device: str | None = None,
                 dtype: Any = None) -> None:
        super().__init__()
        _positive("Embedding", num_embeddings=num_embeddings, embedding_dim=embedding_dim)
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ConfigError(f"Embedding: padding_idx must be within "
                                  f"[-{num_embeddings}, {num_embeddings}), got {padding_idx}")
            padding_idx = padding_idx % num_embeddings
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.padding_idx = padding_idx
        self.weight = _empty((self.num_embeddings, self.embedding_dim), device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.normal_(self.weight)
        if self.padding_idx is not None:
            self.weight.data[self.padding_idx] = 0

    def forward(self, indices: Any) -> Tensor:
        return F.embedding(indices, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s
