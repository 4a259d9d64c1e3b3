"""Checkpoints: safetensors arrays plus a JSON manifest; atomic, checksummed, resumable.

    >>> path = save_checkpoint("runs/x/checkpoints", step, model.state_dict(),   # doctest: +SKIP
    ...                        opt.state_dict(), extra={"data": sampler.state_dict()}, keep=3)
    >>> ckpt = load_checkpoint(latest_good("runs/x/checkpoints"))                 # doctest: +SKIP

`save` / `load` (re-exported as `narun.save` / `narun.load`) write and read one state dict
as one .safetensors file; `read_range` reads part of one tensor of such a file without the
rest. Nothing is ever pickled.
"""

from narun.checkpoint._file import load, read_metadata, save
from narun.checkpoint._range import TensorInfo, read_header, read_range
from narun.checkpoint._store import (
    FORMAT_VERSION,
    Checkpoint,
    find_checkpoint,
    latest_good,
    list_checkpoints,
    load_checkpoint,
    prune,
    read_manifest,
    run_id_of,
    save_checkpoint,
    verify_checkpoint,
)
from narun.errors import CheckpointError

__all__ = [
    "FORMAT_VERSION", "Checkpoint", "CheckpointError", "TensorInfo", "find_checkpoint",
    "latest_good",
    "list_checkpoints", "load", "load_checkpoint", "prune", "read_header", "read_manifest",
    "read_metadata", "read_range", "run_id_of", "save", "save_checkpoint", "verify_checkpoint",
]
