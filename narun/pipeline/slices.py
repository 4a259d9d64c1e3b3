"""A stage's slice of a checkpoint, and one ordinary checkpoint assembled from every stage's.

A slice is a safetensors file of the stage's parameters by their model names, and of each
one's optimizer arrays as `NAME/KEY` (Adam's moments), with the scalar state (its step
count) in the metadata. The tied embedding is in both end stages' slices, identical (both
took the same steps); the first one read is kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from narun import checkpoint as ckpt
from narun.errors import CheckpointError
from narun.tensor import Tensor


def slice_path(staging: str | Path, step: int, stage: int) -> Path:
    """Where stage `stage` writes its slice of step `step` under the job's staging
    directory (on the stage's host)."""
    return Path(staging) / f"step-{step:06d}" / f"stage-{stage}.safetensors"


def write_slice(path: Path, step: int, params: Mapping[str, Tensor], optimizer: Any) -> None:
    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, p in params.items():
        arrays[name] = np.ascontiguousarray(p.data)
        state = optimizer.state.get(p, {})
        scalars[name] = {k: _plain(v) for k, v in state.items() if not _is_array(v)}
        for key, value in state.items():
            if _is_array(value):
                arrays[f"{name}/{key}"] = np.ascontiguousarray(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save(arrays, path, {"step": step, "scalars": scalars})


def assemble_slices(files: Sequence[Path], model: Any, optimizer: Any
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(model state dict, optimizer state dict) from every stage's slice. `model` and its
    whole `optimizer` give the layout and hyperparameters."""
    values: dict[str, np.ndarray] = {}
    states: dict[str, dict[str, Any]] = {}
    for path in files:
        arrays = ckpt.load(path)
        scalars = ckpt.read_metadata(path).get("scalars", {})
        for key, value in arrays.items():
            name, _, part = key.partition("/")
            if not part:
                values.setdefault(name, value)
            elif name not in states or part not in states[name]:
                states.setdefault(name, {})[part] = value
        for name, entry in scalars.items():
            for key, value in entry.items():
                states.setdefault(name, {}).setdefault(key, value)
    names = [name for name, _ in model.named_parameters()]
    missing = sorted(set(names) - set(values))
    if missing:
        raise CheckpointError(f"the stages' slices hold no values for {missing}; files: "
                              f"{[str(f) for f in files]}")
    layout = optimizer.state_dict()
    index_of = {id(p): i for i, p in enumerate(
        p for group in optimizer.param_groups for p in group["params"])}
    layout["state"] = {index_of[id(p)]: states[name]
                       for name, p in model.named_parameters() if states.get(name)}
    return {name: values[name] for name in names}, layout


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and getattr(value, "ndim", 0) > 0


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
