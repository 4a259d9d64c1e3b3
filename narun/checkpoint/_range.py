"""Reading a flat range of one tensor of a .safetensors file, and nothing else of it.

A .safetensors file is an 8-byte little-endian header length N, N bytes of JSON (per tensor:
dtype, shape, data_offsets [begin, end) relative to the end of the header; plus an optional
`__metadata__` map of strings), then the raw little-endian, C-ordered data. Elements
[start, stop) of a tensor are therefore one contiguous byte range of the file: a parameter
server shard reads its slice of a checkpoint with one seek and one read per piece, so its
memory and I/O follow the slice, not the model.

    >>> info, meta = read_header("model.safetensors")              # doctest: +SKIP
    >>> read_range("model.safetensors", "wte.weight", 1000, 2000)   # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from narun.errors import CheckpointError

# The safetensors dtypes NumPy has (BF16 and the F8 types have no NumPy dtype).
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_MAX_HEADER = 100_000_000  # the bound the safetensors format itself sets


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's data lies in its file: bytes [begin, end), absolute offsets."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """({tensor name: TensorInfo}, the `__metadata__` map) of a .safetensors file, after
    checking that every tensor's bytes lie inside the file and fit its dtype and shape.
    Reads the header only."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{p}: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{p}: header length {n} does not fit a file of {size} "
                                      f"bytes (truncated or not a safetensors file)")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such file") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{p}: the safetensors header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos = {}
    for name, entry in header.items():
        infos[name] = _info(p, name, entry, base, size)
    return infos, meta


def read_range(path: str | os.PathLike[str], name: str, start: int = 0,
               stop: int | None = None, *, out: np.ndarray | None = None,
               header: Mapping[str, TensorInfo] | None = None) -> np.ndarray:
    """Elements [start, stop) of tensor `name`, flattened in C order (stop None: to the
    end), read from the file without touching the other bytes of it.

    Returns a new 1-D array of the tensor's dtype, or fills `out` (a C-contiguous array of
    stop - start elements of that dtype, e.g. a view into a larger buffer) and returns it.
    `header` (read_header's first value for this file) saves reading the header again when
    reading many ranges of one file.
    """
    p = Path(path)
    infos = read_header(p)[0] if header is None else header
    info = infos.get(name)
    if info is None:
        shown = ", ".join(sorted(infos)[:8]) + (", ..." if len(infos) > 8 else "")
        raise CheckpointError(f"{p}: no tensor {name!r} (it holds {len(infos)}: {shown})")
    stop = info.size if stop is None else stop
    if not 0 <= start <= stop <= info.size:
        raise ValueError(f"read_range: [{start}, {stop}) is not a range of {p}'s tensor "
                         f"{name!r}, which has {info.size} elements (shape {info.shape})")
    count = stop - start
    if out is None:
        out = np.empty(count, info.dtype)
    elif out.dtype != info.dtype or out.size != count or not out.flags.c_contiguous \
            or not out.flags.writeable:
        raise ValueError(f"read_range: out must be a writeable C-contiguous {info.dtype} "
                         f"array of {count} elements for {name!r}[{start}:{stop}], got "
                         f"{out.dtype} of shape {out.shape}")
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(p, "rb", buffering=0) as f:
        f.seek(info.begin + start * info.dtype.itemsize)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{p}: ended while reading {name!r}[{start}:{stop}] "
                                      f"(truncated while open?)")
            done += got
    return out


def _info(p: Path, name: str, entry: object, base: int, size: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"{p}: header entry {name!r} lacks dtype, shape or data_offsets")
    code = entry["dtype"]
    if code not in _DTYPES:
        raise CheckpointError(f"{p}: tensor {name!r} has dtype {code!r}, which NumPy cannot "
                              f"hold (readable: {', '.join(_DTYPES)})")
    dtype = np.dtype(_DTYPES[code])
    shape = entry["shape"]
    offsets = entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"{p}: tensor {name!r} has a malformed shape {shape!r} or "
                              f"data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end or end - begin != nbytes or base + end > size:
        raise CheckpointError(f"{p}: tensor {name!r} ({code} {shape}, {nbytes} bytes) has "
                              f"data_offsets [{begin}, {end}), which do not fit it or a file "
                              f"of {size} bytes (truncated?)")
    return TensorInfo(dtype, tuple(shape), base + begin, base + end)
