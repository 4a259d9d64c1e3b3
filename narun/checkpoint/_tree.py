"""Nested state (dicts, lists, numbers, strings, arrays) <-> JSON plus a dict of arrays.

Arrays are replaced by `{"__array__": key}` references into a safetensors file; what JSON
cannot say exactly is tagged: non-string dict keys (`{"__dict__": [[k, v], ...]}`, e.g. an
optimizer's integer parameter ids), tuples (`{"__tuple__": [...]}`) and NumPy scalars
(`{"__scalar__": dtype, "value": v}`). Python ints of any size (RNG states) and floats
(repr is exact) survive JSON as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from narun.errors import CheckpointError

_MARKERS = ("__array__", "__dict__", "__tuple__", "__scalar__")


def to_numpy(value: Any) -> np.ndarray | None:
    """A host NumPy array of an array-like (NumPy, narun Tensor, CuPy, MLX), else None."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, np.generic) or not hasattr(value, "__array__"):
        return None
    if hasattr(value, "__cuda_array_interface__") and hasattr(value, "get"):
        return value.get()  # CuPy: explicit device -> host copy
    numpy = getattr(value, "numpy", None)
    return np.asarray(numpy() if callable(numpy) else value)


def c_order(arr: np.ndarray) -> np.ndarray:
    """`arr` in C order, copied only if needed (np.ascontiguousarray would turn 0-d into 1-d)."""
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def encode(obj: Any, arrays: dict[str, np.ndarray], path: str = "") -> Any:
    """JSON-ready form of `obj`; arrays go into `arrays` under keys derived from `path`."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in "biuf":
            raise CheckpointError(f"{path or '<root>'}: cannot store a {obj.dtype} scalar")
        return {"__scalar__": obj.dtype.str, "value": obj.item()}
    arr = to_numpy(obj)
    if arr is not None:
        if arr.dtype.kind not in "biufc":
            raise CheckpointError(
                f"{path or '<root>'}: cannot store an array of dtype {arr.dtype} (numbers only)")
        key = path or "root"
        if key in arrays:  # paths collide only when keys contain "/"
            key = f"{key}#{len(arrays)}"
        arrays[key] = c_order(arr)
        return {"__array__": key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: encode(v, arrays, f"{path}/{k}" if path else k) for k, v in obj.items()}
        return {"__dict__": [[encode(k, arrays, path),
                              encode(v, arrays, f"{path}/{k}" if path else str(k))]
                             for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, arrays, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, arrays, f"{path}/{i}") for i, v in enumerate(obj)]
    raise CheckpointError(
        f"{path or '<root>'}: cannot store a {type(obj).__name__} in a checkpoint "
        f"(arrays, numbers, strings, None, lists, tuples and dicts only)"
    )


def decode(obj: Any, arrays: Mapping[str, np.ndarray], source: str) -> Any:
    """Inverse of `encode`; `source` names the file in errors."""
    if isinstance(obj, list):
        return [decode(v, arrays, source) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__array__" in obj:
        key = obj["__array__"]
        if key not in arrays:
            raise CheckpointError(f"{source}: manifest refers to array {key!r}, which is missing")
        return arrays[key]
    if "__scalar__" in obj:
        return np.dtype(obj["__scalar__"]).type(obj["value"])
    if "__tuple__" in obj:
        return tuple(decode(v, arrays, source) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {decode(k, arrays, source): decode(v, arrays, source) for k, v in obj["__dict__"]}
    return {k: decode(v, arrays, source) for k, v in obj.items()}

