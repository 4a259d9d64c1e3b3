"""`narun.save` / `narun.load`: one state dict in one checksummed .safetensors file."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from narun.checkpoint._fs import atomic_write
from narun.checkpoint._store import state_arrays
from narun.checkpoint._tree import c_order
from narun.errors import CheckpointError

_KEY = "narun"  # the safetensors metadata entry holding narun's JSON
_FORMAT = "narun-state-dict"
_VERSION = 1


def save(obj: Any, path: str | os.PathLike[str],
         metadata: Mapping[str, Any] | None = None) -> Path:
    """Save a module's state_dict() (or a {name: array} dict) to a .safetensors file,
    atomically, with a SHA-256 over names, dtypes, shapes and bytes in the metadata entry
    "narun" (JSON), next to the optional JSON-serialisable `metadata` (e.g. a model config).

        >>> narun.save(model, "gpt.safetensors", metadata={"preset": "gpt2-tiny"})
        >>> model.load_state_dict(narun.load("gpt.safetensors"))
    """
    arrays = state_arrays(obj, "save")
    try:
        info = json.dumps({"format": _FORMAT, "format_version": _VERSION,
                           "sha256": _state_digest(arrays), "metadata": dict(metadata or {})})
    except TypeError as err:
        raise TypeError(f"save: metadata must be JSON-serialisable: {err}") from None
    p = Path(path)
    atomic_write(p, lambda tmp: safetensors.numpy.save_file(arrays, str(tmp), {_KEY: info}))
    return p


def load(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The state dict saved at `path` as NumPy arrays, after verifying its checksum.
    Any safetensors file loads; files not written by narun have no checksum to verify.
    A checkpoint directory (`runs/x/checkpoints/step-000500`) gives its model's weights,
    verified as load_checkpoint does; a run directory is refused, naming the file to pass.
    """
    if Path(path).is_dir():
        return _load_from_directory(Path(path))
    arrays, info, p = _read(path)
    if info is not None and info.get("sha256") != _state_digest(arrays):
        raise CheckpointError(f"{p}: checksum mismatch: the file is corrupted")
    return arrays


def _load_from_directory(p: Path) -> dict[str, np.ndarray]:
    from narun.checkpoint._store import latest_good, load_checkpoint

    if (p / "manifest.json").exists():
        return load_checkpoint(p).model
    newest = next((found for found in (latest_good(c) for c in (p / "checkpoints", p)
                                       if c.is_dir()) if found is not None), None)
    if newest is not None:
        raise CheckpointError(f"{p}: is a directory of checkpoints, not a file; pass one "
                              f"checkpoint, e.g. narun.load('{newest}') or "
                              f"narun.load('{newest / 'model.safetensors'}'), or use "
                              f"narun.models.load_trained('{p}') to get the model back")
    raise CheckpointError(f"{p}: is a directory, not a .safetensors file or a checkpoint "
                          f"(a step-NNNNNN directory with a manifest.json)")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `metadata` given to `save` (empty for files not written by narun)."""
    p = Path(path)
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise _unreadable(p, err) from None
    return _parse_info(p, meta).get("metadata", {}) if _KEY in meta else {}


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any] | None,
                                                  Path]:
    p = Path(path)
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise _unreadable(p, err) from None
    return arrays, (_parse_info(p, meta) if _KEY in meta else None), p


def _parse_info(p: Path, meta: Mapping[str, str]) -> dict[str, Any]:
    try:
        info = json.loads(meta[_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{p}: corrupted narun metadata: {err}") from None
    if not isinstance(info, dict) or info.get("format") != _FORMAT:
        raise CheckpointError(f"{p}: metadata entry {_KEY!r} is not a narun state dict header")
    if not isinstance(info.get("format_version"), int) or info["format_version"] > _VERSION:
        raise CheckpointError(f"{p}: format_version {info.get('format_version')!r} is not "
                              f"supported (this narun reads up to {_VERSION})")
    return info


def _unreadable(p: Path, err: Exception) -> CheckpointError:
    if not p.exists():
        return CheckpointError(f"{p}: no such file")
    return CheckpointError(f"{p}: not a readable safetensors file (truncated or corrupted?): "
                           f"{err}")


def _state_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over each array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = c_order(arrays[name])
        h.update(json.dumps([name, arr.dtype.str, list(arr.shape)]).encode())
        h.update(arr.reshape(-1).view(np.uint8) if arr.size else b"")
    return h.hexdigest()
