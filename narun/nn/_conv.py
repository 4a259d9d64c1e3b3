"""Conv2d over NCHW inputs, via narun.nn.functional.conv2d."""

from __future__ import annotations

from typing import Any

from narun.errors import ConfigError
from narun.nn import functional as F
from narun.nn import init
from narun.nn._linear import _empty, _positive
from narun.nn._module import Module
from narun.tensor._tensor import Tensor


def _pair(layer: str, name: str, v: int | tuple[int, int], minimum: int) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(n, int) and n >= minimum for n in pair):
        raise ConfigError(f"{layer}: {name} must be an int >= {minimum} or a pair of them, "
                          f"got {v!r}")
    return pair  # type: ignore[return-value]


class Conv2d(Module):
    """2-d convolution (cross-correlation, as torch's) with weight (out, in, kh, kw).

    `padding` is zeros: an int, a pair, "valid" (none) or "same" (output size = input size,
    stride 1).

    Initialised like torch: weight ~ kaiming_uniform(a=sqrt(5)), bias ~ U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) with fan_in = in_channels * kh * kw.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] | str = 0, dilation: int | tuple[int, int] = 1,
                 bias: bool = True, device: str | None = None, dtype: Any = None) -> None:
        super().__init__()
        _positive("Conv2d", in_channels=in_channels, out_channels=out_channels)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _pair("Conv2d", "kernel_size", kernel_size, 1)
        self.stride = _pair("Conv2d", "stride", stride, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ConfigError(f"Conv2d: padding must be an int, a pair, 'same' or 'valid', "
                                  f"got {padding!r}")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = _pair("Conv2d", "padding", padding, 0)
        self.dilation = _pair("Conv2d", "dilation", dilation, 1)
        self.weight = _empty((self.out_channels, self.in_channels) + self.kernel_size,
                             device, dtype)
        if bias:
            self.bias = _empty((self.out_channels,), device, dtype)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.default_layer_init_(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                        dilation=self.dilation)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        return s
