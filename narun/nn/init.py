"""Parameter initialisation, with PyTorch's names, fans, gains and distributions.

Every function fills `tensor.data` in place and returns the tensor. Random draws come from
narun's global generator (`narun.manual_seed(s)` makes a model reproducible) unless a
`generator` (a `numpy.random.Generator`) is passed. Values are drawn on the host and then
copied to the tensor's device, so a seed gives the same model on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from narun.errors import ConfigError, DTypeError, ShapeError
from narun.tensor import _backend, _random
from narun.tensor._tensor import Tensor

__all__ = [
    "calculate_fan_in_and_fan_out", "calculate_gain", "constant_", "default_layer_init_",
    "kaiming_normal_",
    "kaiming_uniform_", "normal_", "ones_", "trunc_normal_", "uniform_", "xavier_normal_",
    "xavier_uniform_", "zeros_",
]

_LINEAR_FNS = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
               "conv_transpose2d", "conv_transpose3d", "sigmoid")


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended gain for a nonlinearity (torch.nn.init.calculate_gain's table).

    linear/conv/sigmoid: 1, tanh: 5/3, relu: sqrt(2), leaky_relu: sqrt(2 / (1 + slope^2))
    (slope `param`, default 0.01), selu: 3/4.
    """
    if nonlinearity in _LINEAR_FNS:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, (int, float)) and not isinstance(param, bool):
            slope = float(param)
        else:
            raise ConfigError(f"calculate_gain: negative_slope {param!r} is not a number")
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ConfigError(f"calculate_gain: unsupported nonlinearity {nonlinearity!r}; expected "
                      f"one of {', '.join(_LINEAR_FNS)}, tanh, relu, leaky_relu, selu")


def calculate_fan_in_and_fan_out(tensor: Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight: dim 1 and dim 0, times the receptive field (dims 2+)."""
    shape = tensor.shape
    if len(shape) < 2:
        raise ShapeError(f"fan in and fan out need a tensor with at least 2 dims, got shape "
                         f"{shape}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def _fan(tensor: Tensor, mode: str) -> int:
    if mode not in ("fan_in", "fan_out"):
        raise ConfigError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def _check(tensor: Any, fn: str, need_float: bool) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{fn} expects a narun Tensor (or Parameter), got "
                        f"{type(tensor).__name__}")
    if need_float and not _backend.is_floating(tensor.dtype):
        raise DTypeError(f"{fn} draws floating-point values; the tensor is {tensor.dtype}")


def _fill_random(tensor: Tensor, draw: Callable[[np.random.Generator, np.ndarray], None],
                 generator: np.random.Generator | None) -> Tensor:
    """Run `draw(gen, host)` into a float32/float64 host array, then into `tensor.data`.

    A C-contiguous float32/float64 NumPy tensor is drawn into directly (no copy).
    """
    gen = _random.generator() if generator is None else generator
    arr = tensor.data
    direct = (isinstance(arr, np.ndarray) and arr.dtype in (np.float32, np.float64)
              and arr.flags.c_contiguous and arr.flags.writeable)
    host = arr if direct else np.empty(arr.shape, dtype=np.float64 if arr.dtype == np.float64
                                       else np.float32)
    if host.size:
        draw(gen, host)
    if not direct:
        tensor.xp.copyto(arr, _backend.to_device(host, tensor.device), casting="unsafe")
    return tensor


def uniform_(tensor: Tensor, a: float = 0.0, b: float = 1.0,
             generator: np.random.Generator | None = None) -> Tensor:
    """Fill with U(a, b)."""
    _check(tensor, "uniform_", True)
    if not a <= b:
        raise ConfigError(f"uniform_: expected a <= b, got a={a}, b={b}")
    lo, width = float(a), float(b) - float(a)

    def draw(gen: np.random.Generator, host: np.ndarray) -> None:
        gen.random(dtype=host.dtype, out=host)
        host *= width
        host += lo

    return _fill_random(tensor, draw, generator)


def normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0,
            generator: np.random.Generator | None = None) -> Tensor:
    """Fill with N(mean, std^2)."""
    _check(tensor, "normal_", True)
    if std < 0:
        raise ConfigError(f"normal_: std must be >= 0, got {std}")
    mu, sigma = float(mean), float(std)

    def draw(gen: np.random.Generator, host: np.ndarray) -> None:
        gen.standard_normal(dtype=host.dtype, out=host)
        host *= sigma
        host += mu

    return _fill_random(tensor, draw, generator)


def _phi_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def trunc_normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                  b: float = 2.0, generator: np.random.Generator | None = None) -> Tensor:
    """Fill with N(mean, std^2) restricted to [a, b] (a and b are absolute values).

    Exact rejection sampling: candidates come from the normal itself, or, for a narrow
    interval, uniformly from [a, b] accepted with the normal's density ratio; whichever
    accepts more. An interval holding almost none of the density is refused.
    """
    _check(tensor, "trunc_normal_", True)
    if not std > 0:
        raise ConfigError(f"trunc_normal_: std must be > 0, got {std}")
    if not a < b:
        raise ConfigError(f"trunc_normal_: expected a < b, got a={a}, b={b}")
    mu, sigma = float(mean), float(std)
    lo, hi = (a - mu) / sigma, (b - mu) / sigma  # standardised bounds
    mass = _phi_cdf(hi) - _phi_cdf(lo)
    nearest = 0.0 if lo <= 0.0 <= hi else min(abs(lo), abs(hi))
    accept_uniform = 0.0
    if math.isfinite(hi - lo):
        peak = math.exp(-0.5 * nearest * nearest) / math.sqrt(2 * math.pi)
        accept_uniform = mass / ((hi - lo) * peak)
    use_uniform = accept_uniform > mass
    rate = max(mass, accept_uniform)
    if rate < 1e-3:
        raise ConfigError(f"trunc_normal_: [{a}, {b}] holds too little of N({mean}, {std}^2) "
                          f"to sample from (acceptance {rate:.2e}); move the bounds toward "
                          "the mean")

    def draw(gen: np.random.Generator, host: np.ndarray) -> None:
        flat = np.empty(host.size, dtype=np.float64)
        todo = np.arange(host.size)
        while todo.size:
            n = int(todo.size / rate * 1.1) + 16
            if use_uniform:
                x = gen.uniform(lo, hi, n)
                u = gen.random(n)
                keep = x[u <= np.exp(0.5 * (nearest * nearest - x * x))]
            else:
                x = gen.standard_normal(n)
                keep = x[(x >= lo) & (x <= hi)]
            take = min(keep.size, todo.size)
            flat[todo[:take]] = keep[:take]
            todo = todo[take:]
        flat *= sigma
        flat += mu
        np.clip(flat, a, b, out=flat)  # float rounding of mu + sigma*x must not leave [a, b]
        host.reshape(-1)[...] = flat

    return _fill_random(tensor, draw, generator)


def constant_(tensor: Tensor, val: float) -> Tensor:
    """Fill with `val`."""
    _check(tensor, "constant_", False)
    tensor.data.fill(val)
    return tensor


def zeros_(tensor: Tensor) -> Tensor:
    return constant_(tensor, 0)


def ones_(tensor: Tensor) -> Tensor:
    return constant_(tensor, 1)


def xavier_uniform_(tensor: Tensor, gain: float = 1.0,
                    generator: np.random.Generator | None = None) -> Tensor:
    """U(-r, r) with r = gain * sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio, 2010)."""
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -bound, bound, generator)


def xavier_normal_(tensor: Tensor, gain: float = 1.0,
                   generator: np.random.Generator | None = None) -> Tensor:
    """N(0, s^2) with s = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), generator)


def kaiming_uniform_(tensor: Tensor, a: float = 0.0, mode: str = "fan_in",
                     nonlinearity: str = "leaky_relu",
                     generator: np.random.Generator | None = None) -> Tensor:
    """U(-r, r) with r = gain * sqrt(3 / fan) (He et al., 2015); `a` is leaky_relu's slope."""
    _check(tensor, "kaiming_uniform_", True)
    if 0 in tensor.shape:
        return tensor
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))
    bound = math.sqrt(3.0) * std
    return uniform_(tensor, -bound, bound, generator)


def kaiming_normal_(tensor: Tensor, a: float = 0.0, mode: str = "fan_in",
                    nonlinearity: str = "leaky_relu",
                    generator: np.random.Generator | None = None) -> Tensor:
    """N(0, s^2) with s = gain / sqrt(fan)."""
    _check(tensor, "kaiming_normal_", True)
    if 0 in tensor.shape:
        return tensor
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))
    return normal_(tensor, 0.0, std, generator)


def default_layer_init_(weight: Tensor, bias: Tensor | None) -> None:
    """What torch's Linear and Conv layers do by default: kaiming_uniform_(a=sqrt(5)) on the
    weight, and the bias uniform in +-1/sqrt(fan_in) (zeros when fan_in is 0)."""
    kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        uniform_(bias, -bound, bound)
