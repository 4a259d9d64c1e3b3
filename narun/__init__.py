"""narun: a distributed training runtime with its own autograd engine.

    >>> import narun
    >>> x = narun.tensor([1.0, 2.0, 3.0], requires_grad=True)
    >>> (x * x).sum().backward()
    >>> x.grad
    tensor([2., 4., 6.])
"""

import numpy as _np

from narun._process import tune_on_import as _tune_on_import

_tune_on_import()  # freed memory stays for the next step's temporaries (NARUN_TUNE_MALLOC=0: off)

from narun.tensor import (  # noqa: E402
    Tensor,
    arange,
    cat,
    empty,
    enable_grad,
    from_numpy,
    full,
    get_default_dtype,
    get_rng_state,
    is_grad_enabled,
    manual_seed,
    matmul,
    no_grad,
    ones,
    ones_like,
    rand,
    randint,
    randn,
    set_default_dtype,
    set_rng_state,
    stack,
    tensor,
    where,
    zeros,
    zeros_like,
)

float16 = _np.dtype(_np.float16)
float32 = _np.dtype(_np.float32)
float64 = _np.dtype(_np.float64)
int32 = _np.dtype(_np.int32)
int64 = _np.dtype(_np.int64)
bool_ = _np.dtype(_np.bool_)

from narun import nn, optim  # noqa: E402  (after the tensor API they are built on)
from narun.checkpoint import load, save  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Tensor", "arange", "bool_", "cat", "empty", "enable_grad", "float16", "float32",
    "float64", "from_numpy", "full", "get_default_dtype", "get_rng_state", "int32", "int64",
    "is_grad_enabled", "load", "manual_seed", "matmul", "nn", "no_grad", "ones", "ones_like",
    "optim", "rand", "randint", "randn", "save", "set_default_dtype", "set_rng_state", "stack",
    "tensor", "where", "zeros", "zeros_like",
]
