"""Binds the op functions to Tensor as methods and Python operators (one place, no cycles)."""

from __future__ import annotations

from typing import Any

from narun.tensor import _ops_elementwise as E
from narun.tensor import _ops_matmul as M
from narun.tensor import _ops_reduce as R
from narun.tensor import _ops_shape as S
from narun.tensor._tensor import Tensor


def _reflected(fn: Any) -> Any:
    return lambda self, other: fn(other, self)


def _inplace_forbidden(name: str) -> Any:
    def method(self: Tensor, other: Any) -> Tensor:
        raise TypeError(f"in-place {name} on a tensor is not supported (it would break "
                        f"autograd); write t = t {name.strip('=')} x, or change t.data "
                        f"under narun.no_grad()")
    return method


def _install() -> None:
    T = Tensor
    T.__add__, T.__radd__ = E.add, _reflected(E.add)
    T.__sub__, T.__rsub__ = E.sub, _reflected(E.sub)
    T.__mul__, T.__rmul__ = E.mul, _reflected(E.mul)
    T.__truediv__, T.__rtruediv__ = E.div, _reflected(E.div)
    T.__floordiv__, T.__rfloordiv__ = E.floor_divide, _reflected(E.floor_divide)
    T.__mod__, T.__rmod__ = E.remainder, _reflected(E.remainder)
    T.__pow__, T.__rpow__ = E.pow, _reflected(E.pow)
    T.__matmul__, T.__rmatmul__ = M.matmul, _reflected(M.matmul)
    T.__neg__, T.__abs__ = E.neg, E.abs
    T.__pos__ = lambda self: self  # as torch.positive: the tensor itself
    T.__and__, T.__rand__ = E.bitwise_and, _reflected(E.bitwise_and)
    T.__or__, T.__ror__ = E.bitwise_or, _reflected(E.bitwise_or)
    T.__xor__, T.__rxor__ = E.bitwise_xor, _reflected(E.bitwise_xor)
    T.__invert__ = E.bitwise_not
    T.__eq__, T.__ne__ = E.eq, E.ne  # type: ignore[assignment]
    T.__lt__, T.__le__, T.__gt__, T.__ge__ = E.lt, E.le, E.gt, E.ge
    T.__getitem__ = S.getitem
    inplace = {"+=": "__iadd__", "-=": "__isub__", "*=": "__imul__", "/=": "__itruediv__",
               "//=": "__ifloordiv__", "%=": "__imod__"}
    for name, dunder in inplace.items():
        setattr(T, dunder, _inplace_forbidden(name))

    methods = {
        "add": E.add, "sub": E.sub, "mul": E.mul, "div": E.div, "pow": E.pow,
        "floor_divide": E.floor_divide, "remainder": E.remainder,
        "neg": E.neg, "exp": E.exp, "log": E.log, "sqrt": E.sqrt, "rsqrt": E.rsqrt,
        "abs": E.abs, "tanh": E.tanh, "sigmoid": E.sigmoid, "relu": E.relu,
        "silu": E.silu, "gelu": E.gelu, "clamp": E.clamp, "maximum": E.maximum,
        "minimum": E.minimum, "eq": E.eq, "ne": E.ne, "lt": E.lt, "le": E.le, "gt": E.gt,
        "ge": E.ge, "bitwise_and": E.bitwise_and, "bitwise_or": E.bitwise_or,
        "bitwise_xor": E.bitwise_xor, "bitwise_not": E.bitwise_not,
        "matmul": M.matmul,
        "sum": R.sum, "mean": R.mean, "var": R.var, "max": R.max, "min": R.min,
        "argmax": R.argmax, "argmin": R.argmin,
        "reshape": S.reshape, "view": S.view, "flatten": S.flatten, "permute": S.permute,
        "transpose": S.transpose, "squeeze": S.squeeze, "unsqueeze": S.unsqueeze,
        "expand": S.expand, "contiguous": S.contiguous, "split": S.split, "chunk": S.chunk,
        "masked_fill": S.masked_fill,
    }
    for name, fn in methods.items():
        setattr(T, name, fn)
    T.T = property(lambda self: S.permute(self, *reversed(range(self.ndim))))
    T.mT = property(lambda self: S.transpose(self, -2, -1))
    T.clip = E.clamp


_install()
