"""Tensors with autograd: the engine every narun process runs.

`narun.tensor(...)` makes a tensor; ops record how each result was made, and
`loss.backward()` fills `.grad` of the leaves. The array module (NumPy or CuPy) follows the
inputs, so one implementation of each op serves every device.
"""

from narun.tensor import (
    _backend,
    _methods,  # noqa: F401  (binds operators and methods to Tensor)
)
from narun.tensor._autograd import enable_grad, is_grad_enabled, no_grad
from narun.tensor._backend import (
    get_array_module,
    get_default_dtype,
    set_default_dtype,
)
from narun.tensor._factory import (
    arange,
    empty,
    from_numpy,
    full,
    ones,
    ones_like,
    rand,
    randint,
    randn,
    tensor,
    zeros,
    zeros_like,
)
from narun.tensor._ops_elementwise import (
    abs,
    add,
    clamp,
    div,
    erf,
    exp,
    floor_divide,
    gelu,
    log,
    maximum,
    minimum,
    mul,
    neg,
    pow,
    relu,
    remainder,
    rsqrt,
    sigmoid,
    silu,
    sqrt,
    sub,
    tanh,
)
from narun.tensor._ops_matmul import linear, matmul
from narun.tensor._ops_reduce import argmax, argmin, max, mean, min, sum, var
from narun.tensor._ops_shape import (
    cat,
    chunk,
    contiguous,
    expand,
    flatten,
    getitem,
    masked_fill,
    permute,
    reshape,
    split,
    squeeze,
    stack,
    transpose,
    unsqueeze,
    view,
    where,
)
from narun.tensor._random import get_rng_state, manual_seed, set_rng_state
from narun.tensor._tensor import Tensor

__all__ = [
    "DEFAULT_DTYPE", "Tensor", "abs", "add", "arange", "argmax", "argmin", "cat", "chunk",
    "clamp", "contiguous", "div", "empty", "enable_grad", "erf", "exp", "expand", "flatten",
    "floor_divide", "from_numpy", "full", "gelu", "get_array_module", "get_default_dtype",
    "get_rng_state", "getitem",
    "is_grad_enabled", "linear", "log", "manual_seed", "masked_fill", "matmul", "max",
    "maximum", "mean", "min", "minimum", "mul", "neg", "no_grad", "ones", "ones_like",
    "permute", "pow", "rand", "randint", "randn", "relu", "remainder", "reshape", "rsqrt",
    "set_default_dtype", "set_rng_state", "sigmoid", "silu", "split", "sqrt", "squeeze",
    "stack", "sub", "sum", "tanh", "tensor", "transpose", "unsqueeze", "var", "view", "where",
    "zeros", "zeros_like",
]


def __getattr__(name: str) -> object:
    # DEFAULT_DTYPE is read when asked for, so it follows set_default_dtype
    if name == "DEFAULT_DTYPE":
        return _backend.DEFAULT_DTYPE
    raise AttributeError(f"module 'narun.tensor' has no attribute {name!r}")
