"""Shape and indexing ops: views, permutations, indexing, joins and splits, where."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

from narun.errors import ShapeError
from narun.tensor._autograd import IndexGrad
from narun.tensor._ops_reduce import normalize_dims
from narun.tensor._tensor import Tensor, as_tensor_like, check_same_device, make


def _shape_arg(shape: tuple[Any, ...]) -> tuple[int, ...]:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return tuple(int(n) for n in shape)


def reshape(a: Tensor, *shape: Any) -> Tensor:
    shape_ = _shape_arg(shape)
    src = a.shape
    try:
        out = a.data.reshape(shape_)
    except ValueError as e:
        raise ShapeError(f"reshape: cannot view shape {src} ({a.data.size} elements) "
                         f"as {shape_}") from e
    return make(out, (a,), lambda g: (g.reshape(src),), "reshape")


view = reshape


def flatten(a: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    if a.ndim == 0:
        return reshape(a, 1)
    s, e = start_dim % a.ndim, end_dim % a.ndim
    if s > e:
        raise ShapeError(f"flatten: start_dim {start_dim} comes after end_dim {end_dim}")
    n = 1
    for d in a.shape[s:e + 1]:
        n *= d
    return reshape(a, a.shape[:s] + (n,) + a.shape[e + 1:])


def permute(a: Tensor, *dims: Any) -> Tensor:
    dims_ = _shape_arg(dims)
    if sorted(d % builtins.max(a.ndim, 1) for d in dims_) != list(range(a.ndim)):
        raise ShapeError(f"permute: {dims_} is not a permutation of the {a.ndim} dims "
                         f"of shape {a.shape}")
    dims_ = tuple(d % a.ndim for d in dims_)
    inverse = [0] * len(dims_)
    for i, d in enumerate(dims_):
        inverse[d] = i
    return make(a.data.transpose(dims_), (a,), lambda g: (g.transpose(inverse),), "permute")


def transpose(a: Tensor, dim0: int, dim1: int) -> Tensor:
    if a.ndim < 2 and dim0 in (0, -1) and dim1 in (0, -1):
        return a
    dims = list(range(a.ndim))
    d0, d1 = normalize_dims("transpose", dim0, a.ndim)[0], normalize_dims(
        "transpose", dim1, a.ndim)[0]
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return permute(a, *dims)


def squeeze(a: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
    if dim is None:
        new = tuple(n for n in a.shape if n != 1)
    else:
        axes = normalize_dims("squeeze", dim, a.ndim)
        new = tuple(n for i, n in enumerate(a.shape) if not (i in axes and n == 1))
    return reshape(a, new)


def unsqueeze(a: Tensor, dim: int) -> Tensor:
    if not -a.ndim - 1 <= dim <= a.ndim:
        raise ShapeError(f"unsqueeze: dim {dim} is out of range for {a.ndim} dims")
    dim = dim % (a.ndim + 1)
    return reshape(a, a.shape[:dim] + (1,) + a.shape[dim:])


def expand(a: Tensor, *sizes: Any) -> Tensor:
    sizes_ = _shape_arg(sizes)
    if len(sizes_) < a.ndim:
        raise ShapeError(f"expand: {sizes_} has fewer dims than the tensor's shape {a.shape}")
    lead = len(sizes_) - a.ndim
    target = tuple(a.shape[i - lead] if (n == -1 and i >= lead) else n
                   for i, n in enumerate(sizes_))
    try:
        out = a.xp.broadcast_to(a.data, target)
    except ValueError as e:
        raise ShapeError(f"expand: cannot expand shape {a.shape} to {sizes_}") from e
    return make(out, (a,), lambda g: (g,), "expand")  # the engine sums the broadcast axes


def contiguous(a: Tensor) -> Tensor:
    if a.data.flags.c_contiguous:
        return a
    return make(a.xp.ascontiguousarray(a.data), (a,), lambda g: (g,), "contiguous")


# ---- indexing ------------------------------------------------------------------------------
def _index_arrays(index: Any, a: Tensor) -> Any:
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    if isinstance(index, list):
        return a.xp.asarray(index)
    return index


def _is_basic(index: Any) -> bool:
    """Ints, slices, None and Ellipsis only: each element is picked at most once."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in parts)


def getitem(a: Tensor, index: Any) -> Tensor:
    index = _index_arrays(index, a)
    try:
        out = a.data[index]
    except IndexError as e:
        raise IndexError(f"index {index!r} is out of range for shape {a.shape}: {e}") from e
    xp, shape, dtype = a.xp, a.shape, a.dtype
    if _is_basic(index):
        return make(out, (a,), lambda g: (IndexGrad(index, g),), "getitem")

    def backward(g: Any) -> tuple[Any]:
        # Advanced indices may repeat an element: add.at sums the repeats.
        gx = xp.zeros(shape, dtype=dtype)
        if hasattr(xp, "add") and hasattr(xp.add, "at"):
            xp.add.at(gx, index, g)
        else:
            gx[index] += g
        return (gx,)

    return make(out, (a,), backward, "index")


# ---- joins and splits ----------------------------------------------------------------------
def cat(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    if not tensors:
        raise ShapeError("cat: needs at least one tensor")
    check_same_device("cat", *tensors)
    axis = normalize_dims("cat", dim, tensors[0].ndim)[0]
    try:
        out = tensors[0].xp.concatenate([t.data for t in tensors], axis=axis)
    except ValueError as e:
        shapes = [t.shape for t in tensors]
        raise ShapeError(f"cat: shapes {shapes} differ outside dim {dim}") from e
    bounds = [0]
    for t in tensors:
        bounds.append(bounds[-1] + t.shape[axis])

    def backward(g: Any) -> tuple[Any, ...]:
        lead = (slice(None),) * axis
        return tuple(g[lead + (slice(bounds[i], bounds[i + 1]),)]
                     for i in range(len(tensors)))

    return make(out, tuple(tensors), backward, "cat")


def stack(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    if not tensors:
        raise ShapeError("stack: needs at least one tensor")
    shapes = {t.shape for t in tensors}
    if len(shapes) != 1:
        raise ShapeError(f"stack: all tensors need one shape, got {sorted(shapes)}")
    return cat([unsqueeze(t, dim) for t in tensors], dim)


def split(a: Tensor, split_size_or_sections: int | Sequence[int],
          dim: int = 0) -> tuple[Tensor, ...]:
    """Pieces of `a` along `dim`: equal pieces of an int size (last one smaller), or sizes."""
    axis = normalize_dims("split", dim, a.ndim)[0]
    n = a.shape[axis]
    if isinstance(split_size_or_sections, int):
        if split_size_or_sections <= 0:
            raise ShapeError(f"split: size must be positive, got {split_size_or_sections}")
        sizes = [builtins.min(split_size_or_sections, n - s)
                 for s in range(0, n, split_size_or_sections)]
    else:
        sizes = list(split_size_or_sections)
        if builtins.sum(sizes) != n:
            raise ShapeError(f"split: sizes {sizes} add up to {builtins.sum(sizes)}, "
                             f"dim {dim} has {n}")
    lead = (slice(None),) * axis
    out, start = [], 0
    for size in sizes:
        out.append(getitem(a, lead + (slice(start, start + size),)))
        start += size
    return tuple(out)


def chunk(a: Tensor, chunks: int, dim: int = 0) -> tuple[Tensor, ...]:
    n = a.shape[normalize_dims("chunk", dim, a.ndim)[0]]
    return split(a, -(-n // chunks), dim)


def where(condition: Any, a: Any, b: Any) -> Tensor:
    like = a if isinstance(a, Tensor) else b
    cond = condition.data if isinstance(condition, Tensor) else like.xp.asarray(condition)
    a, b = as_tensor_like(a, like), as_tensor_like(b, like)
    check_same_device("where", a, b)
    xp = a.xp
    out = xp.where(cond, a.data, b.data)

    def backward(g: Any) -> tuple[Any, Any]:
        return (xp.where(cond, g, 0) if a.requires_grad else None,
                xp.where(cond, 0, g) if b.requires_grad else None)

    return make(out, (a, b), backward, "where")


def masked_fill(a: Tensor, mask: Any, value: float) -> Tensor:
    m = mask.data if isinstance(mask, Tensor) else a.xp.asarray(mask)
    xp = a.xp
    out = xp.where(m, xp.asarray(value, dtype=a.dtype), a.data)
    return make(out, (a,), lambda g: (xp.where(m, 0, g),), "masked_fill")
