"""Hypothesis strategies for valid messages, built from the schemas themselves."""

from __future__ import annotations

from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import strategies as st

from protocol import SCHEMAS, WIRE_DTYPES, BFloat16Array, Field, Kind, Message, message
from protocol.messages import NONFINITE_FLOATS, REPLY_FIELDS

MAX_ID = (1 << 64) - 1
ints = st.integers(-(1 << 63), MAX_ID)
floats = st.floats(allow_nan=True, allow_infinity=True)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
names = st.text(max_size=12)
plain = st.recursive(
    st.none() | st.booleans() | ints | floats | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12,
)
plain_maps = st.dictionaries(names, plain, max_size=5)


@st.composite
def tensors(draw: st.DrawFn, dtype: str | None = None) -> np.ndarray | BFloat16Array:
    """Any wire dtype; mostly small shapes (0-d and empty included), sometimes >= 64 KiB so
    the tensor travels as its own frame; sometimes strided or big-endian input."""
    name = dtype or draw(st.sampled_from(list(WIRE_DTYPES)))
    np_dtype = WIRE_DTYPES[name]
    if draw(st.integers(0, 9)) == 0:
        shape = (draw(st.integers(65536 // np_dtype.itemsize, 70000 // np_dtype.itemsize)),)
    else:
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    arr = draw(hnp.arrays(np_dtype, shape))
    if name == "bfloat16":
        return BFloat16Array(arr)
    layout = draw(st.sampled_from(["plain", "big_endian", "strided"]))
    if layout == "big_endian":
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    elif layout == "strided" and arr.ndim >= 1:
        arr = np.repeat(arr, 2, axis=-1)[..., ::2]  # same values, not C-contiguous
    return arr


def field_values(f: Field, path: str = "") -> st.SearchStrategy[Any]:
    """Valid values of field ``f`` (``path``: "type.field", for the fields that allow NaN)."""
    if f.kind is Kind.INT:
        return ints
    if f.kind is Kind.FLOAT:
        return floats if path in NONFINITE_FLOATS else finite_floats
    if f.kind is Kind.BOOL:
        return st.booleans()
    if f.kind is Kind.STR:
        return st.sampled_from(f.choices) if f.choices else st.text(max_size=40)
    if f.kind is Kind.TENSOR:
        return tensors()
    if f.kind is Kind.TENSORS:
        return st.dictionaries(names, tensors(), max_size=3)
    if f.kind is Kind.INTS:
        return st.lists(ints, max_size=5)
    if f.kind is Kind.STRS:
        return st.lists(st.text(max_size=12), max_size=5)
    if f.kind is Kind.MAP:
        return plain_maps
    if f.kind is Kind.MAPS:
        return st.lists(plain_maps, max_size=3)
    raise AssertionError(f"no strategy for {f.kind}")


@st.composite
def messages(draw: st.DrawFn, type_: str) -> Message:
    spec = SCHEMAS[type_]
    reply = draw(st.booleans())  # optional fields: a request's none, a reply's all of them
    fields = {f.name: draw(field_values(f, path)) for f, path in zip(spec.fields, spec.paths)
              if not f.optional or (reply if type_ in REPLY_FIELDS else draw(st.booleans()))}
    return message(type_, draw(st.integers(0, MAX_ID)), **fields)
