"""MLX as a third array module: the NumPy subset narun's ops use, over mlx.core.

The ops are written once against NumPy's API (CuPy mirrors it). MLX differs in ways the ops
cannot see past: its arrays report MLX dtypes, accept no NumPy dtypes, have no `out=`, no
`.copy()`, and a slice or reshape is a new array rather than a view. So an MLX tensor holds
an `MLXArray`, a thin ndarray-shaped wrapper around an `mx.array`, and this module stands
in for `numpy` as its `xp`. Differences are absorbed here, not in the ops.

MLX picks the device per operation (its default device), not per array, so "mlx:cpu" and
"mps" (MLX on Metal) name the process's MLX default device.
"""

from __future__ import annotations

import builtins
from typing import Any

import mlx.core as mx
import numpy as np

from narun.errors import DeviceError

_NP_TO_MX = {
    np.dtype(np.bool_): mx.bool_, np.dtype(np.float16): mx.float16,
    np.dtype(np.float32): mx.float32, np.dtype(np.float64): mx.float64,
    np.dtype(np.int8): mx.int8, np.dtype(np.int16): mx.int16, np.dtype(np.int32): mx.int32,
    np.dtype(np.int64): mx.int64, np.dtype(np.uint8): mx.uint8,
    np.dtype(np.uint16): mx.uint16, np.dtype(np.uint32): mx.uint32,
    np.dtype(np.uint64): mx.uint64,
}
# bfloat16: NumPy has none; ml_dtypes' (the extension JAX uses) is its NumPy-side dtype, so
# an MLX bfloat16 array reports one and its values come to the host as one. Imported here,
# with the adapter, so NumPy and CuPy runs never load it; without it MLX has no bfloat16
# here (no `bfloat16` attribute, which training.precision bf16 names).
try:
    import ml_dtypes
except ImportError:  # pragma: no cover - ml_dtypes comes with narun[mps]
    ml_dtypes = None
else:
    bfloat16 = ml_dtypes.bfloat16
    _NP_TO_MX[np.dtype(bfloat16)] = mx.bfloat16
_MX_TO_NP = {v: k for k, v in _NP_TO_MX.items()}


def _host(a: Any) -> np.ndarray:
    """An mx.array's values as a NumPy array: bfloat16 through float32 (MLX's buffer export
    has no bfloat16 format), exact, as every bfloat16 is a float32."""
    if a.dtype == mx.bfloat16:
        return np.array(a.astype(mx.float32)).astype(bfloat16)
    return np.array(a)


def _device(x: np.ndarray) -> Any:
    """A NumPy array as an mx.array of the same dtype (bfloat16 through float32)."""
    if x.dtype.kind == "V" and x.dtype.name == "bfloat16":
        return mx.array(x.astype(np.float32)).astype(mx.bfloat16)
    return mx.array(x, dtype=mx_dtype(x.dtype))


# NumPy's names the ops read off `xp` (xp.float32, xp.inf, ...): the NumPy objects, which
# every function here accepts as dtypes.
float16, float32, float64 = np.float16, np.float32, np.float64
int32, int64, bool_ = np.int32, np.int64, np.bool_
inf, nan, finfo = np.inf, np.nan, np.finfo


def mx_dtype(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    try:
        return _NP_TO_MX[np.dtype(dtype)]
    except (KeyError, TypeError) as e:
        raise TypeError(f"MLX has no dtype for {dtype!r}") from e


# ---- devices -------------------------------------------------------------------------------
def device_name() -> str:
    return "mps" if mx.default_device() == mx.gpu else "mlx:cpu"


def use(device: str) -> None:
    """Make `device` ("mps" or "mlx:cpu") MLX's default device for this process."""
    if device == "mps":
        if not mx.metal.is_available():
            raise DeviceError("device 'mps' needs MLX with Metal (Apple silicon); this "
                              "machine has none; use 'mlx:cpu' for MLX on the CPU")
        mx.set_default_device(mx.gpu)
    else:
        mx.set_default_device(mx.cpu)


def evaluate(arrays: Any) -> None:
    mx.eval([a.a for a in arrays if isinstance(a, MLXArray)])


# ---- the array -----------------------------------------------------------------------------
class _Flags:
    # MLX exposes no memory layout and its slices are copies: reporting every array as
    # non-contiguous sends layout-dependent code (flat-slice loops that write through
    # views, such as the optimizers' blocks) down its whole-array path.
    c_contiguous = False
    writeable = True


_FLAGS = _Flags()


def _u(x: Any) -> Any:
    """The mx value for an operand: wrappers unwrap, NumPy arrays convert with their dtype,
    NumPy scalars become Python scalars (weakly typed, as Python numbers are to NumPy)."""
    if isinstance(x, MLXArray):
        return x.a
    if isinstance(x, np.ndarray):
        return _device(x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (list, tuple)) and x and not builtins.all(
            isinstance(i, (int, float, bool)) for i in x):
        return type(x)(_u(i) for i in x)
    return x


def _index(index: Any) -> Any:
    if isinstance(index, tuple):
        parts: list[Any] = []
        for i in index:
            j = _index(i)
            parts.extend(j if isinstance(i, (MLXArray, np.ndarray, list))
                         and isinstance(j, tuple) else (j,))
        return tuple(parts)
    if isinstance(index, MLXArray):
        index = index.a if index.a.dtype != mx.bool_ else np.array(index.a)
    if isinstance(index, (np.ndarray, list)):
        index = np.asarray(index)
        if index.dtype == np.bool_:
            # MLX has no boolean indexing (its shape depends on the data): the mask's
            # positions, as NumPy would pick them.
            return tuple(mx.array(i) for i in np.nonzero(index))
        return mx.array(index)
    return index


def _w(x: Any) -> Any:
    if isinstance(x, mx.array):
        return MLXArray(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_w(i) for i in x)
    return x


def _axes(args: tuple[Any, ...]) -> Any:
    return list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(
        args)


class MLXArray:
    """An mx.array behind the slice of ndarray's interface the ops use. In-place operators
    rebind `.a` to a new mx.array, so every alias of this object sees the update (as with
    an ndarray) while arrays derived from it earlier keep their values (as MLX's do)."""

    __slots__ = ("a",)
    __array_ufunc__ = None  # ndarray (op) MLXArray defers to our reflected operators
    base = None  # no views: nothing else can see an in-place update of this object
    flags = _FLAGS

    def __init__(self, a: Any) -> None:
        self.a = a

    # properties
    shape = property(lambda self: tuple(self.a.shape))
    ndim = property(lambda self: self.a.ndim)
    size = property(lambda self: self.a.size)
    dtype = property(lambda self: _MX_TO_NP[self.a.dtype])
    itemsize = property(lambda self: self.a.itemsize)
    nbytes = property(lambda self: self.a.nbytes)
    T = property(lambda self: MLXArray(self.a.T))

    @property
    def strides(self) -> tuple[int, ...]:
        """Row-major byte strides: what mx.as_strided (in elements) reads the array as."""
        out, step = [], self.a.itemsize
        for n in reversed(self.a.shape):
            out.append(step)
            step *= n
        return tuple(reversed(out))

    # conversion
    def get(self) -> np.ndarray:
        """The values as a NumPy array (CuPy's name for it, which narun's code calls)."""
        return _host(self.a)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = _host(self.a)
        return out if dtype is None else out.astype(dtype)

    def item(self) -> Any:
        return self.a.item()

    def tolist(self) -> Any:
        return self.a.tolist()

    def __float__(self) -> float:
        return float(self.a.item())

    def __int__(self) -> int:
        return int(self.a.item())

    def __bool__(self) -> bool:
        return bool(self.a.item())

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"MLXArray({_host(self.a)!r})"

    def astype(self, dtype: Any, copy: bool = True, **_: Any) -> MLXArray:
        d = mx_dtype(dtype)
        if d == self.a.dtype and not copy:
            return self
        return MLXArray(self.a.astype(d))

    def copy(self, order: str = "C") -> MLXArray:
        return MLXArray(mx.array(self.a))

    # shape
    def reshape(self, *shape: Any, **_: Any) -> MLXArray:
        return MLXArray(self.a.reshape(_axes(shape)))

    def ravel(self) -> MLXArray:
        return MLXArray(self.a.reshape(-1))

    def flatten(self) -> MLXArray:
        return MLXArray(self.a.reshape(-1))

    def transpose(self, *axes: Any) -> MLXArray:
        return MLXArray(self.a.transpose(*(_axes(axes) if axes else ())))

    def swapaxes(self, a: int, b: int) -> MLXArray:
        return MLXArray(self.a.swapaxes(a, b))

    def squeeze(self, axis: Any = None) -> MLXArray:
        return MLXArray(self.a.squeeze(axis))

    # reductions
    def sum(self, axis: Any = None, dtype: Any = None, keepdims: bool = False) -> MLXArray:
        a = self.a if dtype is None else self.a.astype(mx_dtype(dtype))
        return MLXArray(mx.sum(a, axis=_axis(axis), keepdims=keepdims))

    def mean(self, axis: Any = None, keepdims: bool = False, **_: Any) -> MLXArray:
        return MLXArray(mx.mean(self.a, axis=_axis(axis), keepdims=keepdims))

    def max(self, axis: Any = None, keepdims: bool = False) -> MLXArray:
        return MLXArray(mx.max(self.a, axis=_axis(axis), keepdims=keepdims))

    def min(self, axis: Any = None, keepdims: bool = False) -> MLXArray:
        return MLXArray(mx.min(self.a, axis=_axis(axis), keepdims=keepdims))

    def argmax(self, axis: Any = None, keepdims: bool = False) -> MLXArray:
        return argmax(self, axis, keepdims=keepdims)

    def argmin(self, axis: Any = None, keepdims: bool = False) -> MLXArray:
        return argmin(self, axis, keepdims=keepdims)

    def all(self, axis: Any = None) -> MLXArray:
        return MLXArray(mx.all(self.a, axis=_axis(axis)))

    def any(self, axis: Any = None) -> MLXArray:
        return MLXArray(mx.any(self.a, axis=_axis(axis)))

    def fill(self, value: Any) -> None:
        self.a = mx.full(self.a.shape, value, dtype=self.a.dtype)

    # indexing
    def __getitem__(self, index: Any) -> MLXArray:
        return MLXArray(self.a[_index(index)])

    def __setitem__(self, index: Any, value: Any) -> None:
        a = mx.array(self.a)  # never mutate an mx.array another wrapper may hold
        a[_index(index)] = _u(value)
        self.a = a


def _axis(axis: Any) -> Any:
    return list(axis) if isinstance(axis, tuple) else axis


def _binary(fn: Any) -> tuple[Any, Any, Any]:
    def op(self: MLXArray, other: Any) -> Any:
        return MLXArray(fn(self.a, _u(other)))

    def rop(self: MLXArray, other: Any) -> Any:
        return MLXArray(fn(_u(other), self.a))

    def iop(self: MLXArray, other: Any) -> MLXArray:
        r = fn(self.a, _u(other))
        self.a = r if r.dtype == self.a.dtype else r.astype(self.a.dtype)
        return self

    return op, rop, iop


def _floating(x: Any) -> bool:
    return isinstance(x, mx.array) and mx.issubdtype(x.dtype, mx.floating)


def _numpy_promotion(fn: Any, divides: bool = False) -> Any:
    """`fn` with NumPy's result type where an integer array meets a Python float (or, for
    division, an integer): NumPy computes in float64, MLX in float32. float64 wherever MLX
    has it (its CPU), so integer tensors compute alike on cpu and mlx:cpu."""
    def op(a: Any, b: Any) -> Any:
        if (not _floating(a) and not _floating(b) and mx.default_device() == mx.cpu
                and (divides or isinstance(a, float) or isinstance(b, float))):
            a = mx.array(a).astype(mx.float64)
        return fn(a, b)

    return op


for _name, _fn in {"add": _numpy_promotion(mx.add), "sub": _numpy_promotion(mx.subtract),
                   "mul": _numpy_promotion(mx.multiply),
                   "truediv": _numpy_promotion(mx.divide, divides=True),
                   "floordiv": _numpy_promotion(mx.floor_divide),
                   "mod": _numpy_promotion(mx.remainder), "pow": _numpy_promotion(mx.power),
                   "matmul": mx.matmul, "and": mx.bitwise_and,
                   "or": mx.bitwise_or, "xor": mx.bitwise_xor}.items():
    _op, _rop, _iop = _binary(_fn)
    setattr(MLXArray, f"__{_name}__", _op)
    setattr(MLXArray, f"__r{_name}__", _rop)
    setattr(MLXArray, f"__i{_name}__", _iop)
for _name, _fn in {"eq": mx.equal, "ne": mx.not_equal, "lt": mx.less, "le": mx.less_equal,
                   "gt": mx.greater, "ge": mx.greater_equal}.items():
    setattr(MLXArray, f"__{_name}__", _binary(_numpy_promotion(_fn))[0])
MLXArray.__hash__ = None  # type: ignore[assignment]  # elementwise ==, as ndarray
MLXArray.__neg__ = lambda self: MLXArray(-self.a)  # type: ignore[attr-defined]
MLXArray.__abs__ = lambda self: MLXArray(mx.abs(self.a))  # type: ignore[attr-defined]
MLXArray.__invert__ = lambda self: MLXArray(  # type: ignore[attr-defined]
    mx.logical_not(self.a) if self.a.dtype == mx.bool_ else mx.bitwise_invert(self.a))


# ---- module functions ----------------------------------------------------------------------
def _result(r: Any, out: Any, dtype: Any) -> Any:
    if dtype is not None:
        r = r.astype(mx_dtype(dtype))
    if out is None:
        return _w(r)
    # out= only ever names a whole array object here: MLX has no views to write through.
    out.a = r if r.dtype == out.a.dtype else r.astype(out.a.dtype)
    return out


_PROMOTED = {"add", "subtract", "multiply", "divide", "true_divide", "floor_divide",
             "remainder", "power", "equal", "not_equal", "less", "less_equal", "greater",
             "greater_equal"}


def _function(name: str) -> Any:
    fn = getattr(mx, name, None)
    if fn is None or not callable(fn) or name.startswith("_"):
        raise AttributeError(f"narun's MLX adapter has no {name!r}")
    if name in _PROMOTED:
        fn = _numpy_promotion(fn, divides=name in ("divide", "true_divide"))

    def call(*args: Any, out: Any = None, dtype: Any = None, **kw: Any) -> Any:
        if "axis" in kw:
            kw["axis"] = _axis(kw["axis"])
        return _result(fn(*(_u(a) for a in args), **kw), out, dtype)

    call.__name__ = name
    return call


def __getattr__(name: str) -> Any:
    """NumPy functions that mx.core has under the same name and meaning (exp, where,
    maximum, ...): operands unwrapped, `out=` and `dtype=` emulated, results wrapped."""
    call = globals()[name] = _function(name)
    return call


def asarray(x: Any, dtype: Any = None, **_: Any) -> MLXArray:
    if isinstance(x, MLXArray):
        return x if dtype is None else x.astype(dtype, copy=False)
    if isinstance(x, mx.array) and dtype is None:  # an executor's transfer: wrapped as is
        return MLXArray(x)
    arr = np.asarray(x, dtype=dtype)
    return MLXArray(_device(arr))


def array(x: Any, dtype: Any = None, copy: bool = True, **_: Any) -> MLXArray:
    if isinstance(x, MLXArray):
        return x.astype(x.dtype if dtype is None else dtype, copy=True)
    return asarray(x, dtype)


def ascontiguousarray(x: Any, dtype: Any = None) -> MLXArray:
    return asarray(x, dtype)


def zeros(shape: Any, dtype: Any = np.float64, **_: Any) -> MLXArray:
    return MLXArray(mx.zeros(shape, dtype=mx_dtype(dtype)))


empty = zeros  # MLX has no uninitialised arrays


def ones(shape: Any, dtype: Any = np.float64, **_: Any) -> MLXArray:
    return MLXArray(mx.ones(shape, dtype=mx_dtype(dtype)))


def full(shape: Any, fill_value: Any, dtype: Any = None, **_: Any) -> MLXArray:
    return MLXArray(mx.full(shape, _u(fill_value), dtype=mx_dtype(dtype)))


def zeros_like(x: Any, dtype: Any = None, **_: Any) -> MLXArray:
    return MLXArray(mx.zeros(x.shape, dtype=mx_dtype(dtype) or _u(x).dtype))


empty_like = zeros_like


def ones_like(x: Any, dtype: Any = None, **_: Any) -> MLXArray:
    return MLXArray(mx.ones(x.shape, dtype=mx_dtype(dtype) or _u(x).dtype))


def arange(start: Any, stop: Any = None, step: Any = 1, dtype: Any = None) -> MLXArray:
    arr = np.arange(start, stop, step, dtype=dtype)  # NumPy's dtype rules, then MLX
    return asarray(arr)


def argmax(x: Any, axis: Any = None, keepdims: bool = False) -> MLXArray:
    # MLX returns uint32 indices; NumPy (and torch) int64.
    return MLXArray(mx.argmax(_u(x), axis=axis, keepdims=keepdims).astype(mx.int64))


def argmin(x: Any, axis: Any = None, keepdims: bool = False) -> MLXArray:
    return MLXArray(mx.argmin(_u(x), axis=axis, keepdims=keepdims).astype(mx.int64))


def argsort(x: Any, axis: int = -1, **_: Any) -> MLXArray:
    return MLXArray(mx.argsort(_u(x), axis=axis).astype(mx.int64))


def put_along_axis(arr: MLXArray, indices: Any, values: Any, axis: int) -> None:
    arr.a = mx.put_along_axis(arr.a, _u(indices), _u(values).astype(arr.a.dtype)
                              if isinstance(values, MLXArray) else _u(values), axis=axis)


def copyto(dst: MLXArray, src: Any, where: Any = None, **_: Any) -> None:
    src = mx.broadcast_to(mx.array(_u(src)), dst.a.shape).astype(dst.a.dtype)
    dst.a = src if where is None else mx.where(_u(where), src, dst.a)


def repeat(a: Any, repeats: Any, axis: Any = None) -> MLXArray:
    if isinstance(repeats, int):
        return MLXArray(mx.repeat(_u(a), repeats, axis=axis))
    # Per-element counts make a data-dependent shape, which MLX has no op for.
    return asarray(np.repeat(np.asarray(a), np.asarray(repeats), axis=axis))


def append(a: Any, values: Any, axis: Any = None) -> MLXArray:
    a, v = mx.array(_u(a)), mx.array(_u(values))
    if axis is None:
        a, v, axis = a.reshape(-1), v.reshape(-1).astype(a.dtype), 0
    return MLXArray(mx.concatenate([a, v], axis=axis))


def dot(a: Any, b: Any) -> MLXArray:
    return MLXArray(mx.matmul(_u(a), _u(b)))


class _StrideTricks:
    @staticmethod
    def as_strided(x: Any, shape: Any, strides: Any, **_: Any) -> MLXArray:
        # NumPy's strides are bytes over x's memory; MLX's are elements over its row-major
        # data, which is what MLXArray.strides describes.
        size = x.a.itemsize
        return MLXArray(mx.as_strided(x.a, tuple(shape), tuple(s // size for s in strides)))


class _Lib:
    stride_tricks = _StrideTricks()


lib = _Lib()


def flatnonzero(x: Any) -> MLXArray:  # data-dependent shape: MLX has no nonzero
    return asarray(np.flatnonzero(np.asarray(x)))


class _AddAt:
    """np.add.at: scatter-add where repeated indices accumulate."""

    _add = staticmethod(_function("add"))

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self._add(*args, **kw)

    @staticmethod
    def at(arr: MLXArray, index: Any, values: Any) -> None:
        arr.a = arr.a.at[_index(index)].add(_u(values))


add = _AddAt()
