"""matmul (batched, broadcasting, PyTorch's 1-d rules) and linear (x @ W^T + b).

Both flatten leading dims into one GEMM wherever the right operand is a plain matrix: one
large BLAS call beats NumPy looping over a stack of small ones, and the weight gradient
comes out of one GEMM instead of a batch of them summed afterwards.
"""

from __future__ import annotations

from typing import Any

from narun.errors import ShapeError
from narun.tensor._tensor import Tensor, check_same_device, make


def _mm(xp: Any, a: Any, b: Any) -> Any:
    """a @ b, as one GEMM over the flattened leading dims when b is a matrix."""
    if b.ndim == 2 and a.ndim > 2:
        return xp.matmul(a.reshape(-1, a.shape[-1]), b).reshape(a.shape[:-1] + (b.shape[1],))
    return xp.matmul(a, b)


def _t(x: Any) -> Any:
    return x.swapaxes(-1, -2)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    check_same_device("matmul", a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError(f"matmul: both operands need at least 1 dim, got shapes "
                         f"{a.shape} and {b.shape}; use * for scalars")
    if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
        raise ShapeError(f"matmul: inner dims differ: {a.shape} @ {b.shape}")
    xp = a.xp
    A = a.data if a.ndim > 1 else a.data[None, :]
    B = b.data if b.ndim > 1 else b.data[:, None]
    try:
        out2 = _mm(xp, A, B)
    except ValueError as e:
        raise ShapeError(f"matmul: batch dims do not broadcast: {a.shape} @ {b.shape}") from e
    out = out2
    if a.ndim == 1:
        out = out.squeeze(-2)
    if b.ndim == 1:
        out = out.squeeze(-1)
    shape2 = out2.shape

    def backward(g: Any) -> tuple[Any, Any]:
        G = g.reshape(shape2)
        ga = gb = None
        if a.requires_grad:
            ga = _mm(xp, G, _t(B))  # engine sums broadcast batch dims; 1-d: leading (1,)
        if b.requires_grad:
            if B.ndim == 2 and A.ndim > 2:
                gb = A.reshape(-1, A.shape[-1]).T @ G.reshape(-1, G.shape[-1])
            else:
                gb = xp.matmul(_t(A), G)
            if b.ndim == 1:
                gb = gb[..., 0]
        return ga, gb

    return make(out, (a, b), backward, "matmul")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ weight.T + bias, weight of shape (out_features, in_features), as torch's."""
    parents = (x, weight) if bias is None else (x, weight, bias)
    check_same_device("linear", *parents)
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ShapeError(f"linear: input of shape {x.shape} does not fit weight of shape "
                         f"{weight.shape} (expected input [..., {weight.shape[-1]}])")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ShapeError(f"linear: bias shape {bias.shape}, expected ({weight.shape[0]},)")
    W = weight.data
    rows = 1
    for n in x.shape[:-1]:
        rows *= n
    x2 = x.data.reshape(rows, x.shape[-1])  # explicit rows: -1 is ambiguous for empty inputs
    out2 = x2 @ W.T
    if bias is not None:
        out2 += bias.data
    out = out2.reshape(x.shape[:-1] + (W.shape[0],))

    def backward(g: Any) -> tuple[Any, ...]:
        g2 = g.reshape(rows, W.shape[0])
        gx = (g2 @ W).reshape(x.shape) if x.requires_grad else None
        gw = g2.T @ x2 if weight.requires_grad else None
        if bias is None:
            return gx, gw
        return gx, gw, (g2.sum(axis=0) if bias.requires_grad else None)

    return make(out, parents, backward, "linear")
