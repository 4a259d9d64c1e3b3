"""The tensor dtypes allowed on the wire, and bfloat16 carried as its raw 16-bit patterns.

NumPy has no bfloat16, so a bfloat16 tensor is a ``BFloat16Array``: a uint16 array of bit
patterns plus the dtype tag. Every multi-byte dtype travels little-endian.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from narun.errors import ProtocolError

#: wire name -> the NumPy dtype of the bytes on the wire (explicitly little-endian).
WIRE_DTYPES: MappingProxyType[str, np.dtype] = MappingProxyType({
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
})

# (kind, itemsize) -> wire name; byte order is ignored here because the encoder converts.
_NAME_BY_KIND = {
    (dt.kind, dt.itemsize): name for name, dt in WIRE_DTYPES.items() if name != "bfloat16"
}
# the common case, wire-layout dtypes, in one dict lookup (1.1 us -> 0.2 us per tensor)
_NAME_BY_DTYPE = {dt: name for name, dt in WIRE_DTYPES.items() if name != "bfloat16"}


@dataclass(frozen=True, eq=False)
class BFloat16Array:
    """A bfloat16 tensor held as its bit patterns (``bits``: a uint16 array of any shape).

    >>> b = BFloat16Array.from_float32(np.array([1.0, 3.140625], np.float32))
    >>> b.to_float32()
    array([1.      , 3.140625], dtype=float32)
    """

    bits: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.bits, np.ndarray) or self.bits.dtype.kind != "u" \
                or self.bits.dtype.itemsize != 2:
            got = getattr(self.bits, "dtype", type(self.bits).__name__)
            raise ProtocolError(f"BFloat16Array.bits: expected a uint16 ndarray, got {got}")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    @classmethod
    def from_float32(cls, values: Any) -> BFloat16Array:
        """Round float32 values to bfloat16 (nearest, ties to even; NaN stays a quiet NaN)."""
        x = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = (x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        nan = np.isnan(x.view(np.float32))
        quiet = (x >> np.uint32(16)) | np.uint32(0x0040)
        return cls(np.where(nan, quiet, rounded).astype(np.uint16))

    def to_float32(self) -> np.ndarray:
        """The exact float32 values (every bfloat16 is a float32 with 16 zero low bits)."""
        return (self.bits.astype(np.uint32) << np.uint32(16)).view(np.float32)

    def __repr__(self) -> str:
        return f"BFloat16Array(shape={self.shape}, values={self.to_float32()!r})"


def wire_dtype_name(dtype: np.dtype, where: str) -> str:
    """The wire name of a NumPy dtype, or ProtocolError naming ``where`` and the allowed set."""
    name = _NAME_BY_KIND.get((dtype.kind, dtype.itemsize))
    if name is None or dtype.fields is not None or dtype.subdtype is not None:
        raise ProtocolError(
            f"{where}: dtype {dtype} is not allowed on the wire; allowed: "
            + ", ".join(WIRE_DTYPES)
        )
    return name


def _on_device(value: Any) -> bool:
    # CuPy (and anything like it) exposes this; .get() is its explicit device -> host copy.
    return hasattr(value, "__cuda_array_interface__") and callable(getattr(value, "get", None))


def tensor_dtype(value: Any, where: str) -> str:
    """The wire dtype name of a tensor value, checking it without copying anything."""
    if type(value) is np.ndarray:
        name = _NAME_BY_DTYPE.get(value.dtype)
        if name is not None:
            return name
    if isinstance(value, BFloat16Array):
        return "bfloat16"
    if isinstance(value, (np.ndarray, np.generic)) or _on_device(value):
        return wire_dtype_name(np.dtype(value.dtype), where)
    raise ProtocolError(f"{where}: expected a NumPy array, CuPy array or BFloat16Array, "
                        f"got {type(value).__name__}")


def to_wire_array(value: Any, name: str) -> np.ndarray:
    """A C-contiguous little-endian host array of ``value`` (from ``tensor_dtype``).

    No copy for a C-contiguous little-endian NumPy array; a device array is copied to the
    host (explicitly, here), a strided or big-endian one is copied into wire layout.
    """
    dtype = WIRE_DTYPES[name]
    if type(value) is np.ndarray and value.dtype == dtype and value.flags.c_contiguous:
        return value
    if isinstance(value, BFloat16Array):
        value = value.bits
    elif _on_device(value):
        value = value.get()
    arr = np.asarray(value, dtype=dtype)
    # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")
