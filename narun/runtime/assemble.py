"""Reassembling the shards' checkpoint slices into one model and optimizer state.

Each shard writes `ps-RANK.safetensors`: per bucket its flat values (key `bK`) and, per
piece i of the bucket, the optimizer's array state (`bK/i/NAME`), with scalar state (Adam's
step count) in the metadata. The result is exactly what the single-process trainer saves,
so `narun generate/evaluate` and `--resume` work on distributed checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from narun import checkpoint as ckpt
from narun.errors import CheckpointError
from narun.runtime.buckets import Plan, join


def assemble(plan: Plan, files: Sequence[Path], model: Any, optimizer: Any
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(model state dict, optimizer state dict) from the shards' files. `model` and its
    local `optimizer` give the state dict's layout and hyperparameters (step its scheduler
    to the checkpoint's step first)."""
    flats: dict[str, np.ndarray] = {}
    states: dict[str, np.ndarray] = {}
    scalars: dict[str, list[dict[str, Any]]] = {}
    for path in files:
        arrays = ckpt.load(path)
        meta = ckpt.read_metadata(path)
        for key, value in arrays.items():
            (states if "/" in key else flats)[key] = value
        scalars.update(meta.get("scalars", {}))
    model_state = join(plan, flats)

    per_param: list[dict[str, Any]] = [{} for _ in plan.names]
    for b in plan.buckets:
        piece_scalars = scalars.get(b.key)
        if piece_scalars is None:
            raise CheckpointError(f"checkpoint slices hold no optimizer scalars for bucket "
                                  f"{b.key}; files: {[str(f) for f in files]}")
        for i, piece in enumerate(b.pieces):
            entry = per_param[piece.index]
            for name, value in piece_scalars[i].items():
                # In ps-async the pieces of one parameter may have taken different numbers
                # of steps; the smallest keeps Adam's bias correction conservative.
                entry[name] = min(entry[name], value) if name in entry else value
            prefix = f"{b.key}/{i}/"
            for key in [k for k in states if k.startswith(prefix)]:
                name = key[len(prefix):]
                full = entry.get(name)
                if not isinstance(full, np.ndarray):
                    full = entry[name] = np.zeros(plan.shapes[piece.index], np.float32)
                full.reshape(-1)[piece.start:piece.stop] = states[key]

    layout = optimizer.state_dict()
    # The optimizer numbers parameters across its groups in group order; the plan numbers
    # them in model order. Map one to the other through the parameter objects.
    model_index = {id(p): j for j, p in enumerate(model.parameters())}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    layout["state"] = {i: per_param[model_index[id(p)]] for i, p in enumerate(params)
                       if per_param[model_index[id(p)]]}
    return model_state, layout
