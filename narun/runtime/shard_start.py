"""What a parameter-server shard starts from, without building the job.

A shard holds a slice of the parameters and of the optimizer state. Building the model, the
dataset and the whole optimizer to cut that slice out would cost every shard the whole
model's memory (and, resuming, the whole checkpoint's). A shard needs only:

- the parameters' names and shapes in model order (the bucket plan is cut from them), and
  the starting values of its slice;
- the optimizer's class, groups and hyperparameters, and the LR schedule. `JobOutline`
  builds them with narun.train's own make_optimizer / make_scheduler over shape-only
  stand-ins (zero-strided arrays: no memory), so they are the single-process trainer's;
- resuming, its slice of the checkpoint's weights and optimizer state, read as byte ranges
  of the checkpoint's files (narun.checkpoint.read_range), and the optimizer's
  hyperparameters and the scheduler's position, from the checkpoint's manifest.

Names, shapes and the values of a fresh start come from the coordinator's initial-state
file, `out_dir/.coordinator/init-HOST-PID.safetensors` (`write_init_state`). The coordinator
builds the whole job anyway (it evaluates and checkpoints), writes the file once per run
before any process starts, and removes it when the run ends. Its metadata lists the
parameters' names and shapes in model order (a safetensors header is sorted by dtype and
name instead); when the job starts fresh it also holds their seeded initial values, which a
rollback before the first checkpoint starts from again. A file left by a coordinator that
was killed is removed by the next one writing in that out_dir on this host.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from narun.checkpoint import TensorInfo, read_header, read_manifest, read_range
from narun.checkpoint._fs import temp_tag, writer_is_gone
from narun.checkpoint._tree import c_order, decode, to_numpy
from narun.config import JobConfig
from narun.errors import CheckpointError
from narun.runtime.buckets import BUCKET_BYTES, Piece, Plan, job_plan
from narun.tensor._tensor import Tensor
from narun.train import make_optimizer, make_scheduler, resume_schedule

INIT_DIR = ".coordinator"  # under training.out_dir; not .shards/ (checkpoint staging)
_KEY = "narun.init_state"  # the safetensors metadata entry holding the layout (JSON)
_FORMAT = "narun-init-state"
_VERSION = 1
_INIT_FILE = re.compile(r"init-(\w+)-(\d+)\.safetensors")


def write_init_state(model: Any, out_dir: str | os.PathLike[str], *, values: bool) -> Path:
    """Write the initial-state file of `model` under `out_dir` and return its path: the
    parameters' names and shapes in model order (named_parameters: a tied weight once)
    and, with `values`, their values. First removes such files that coordinators of this
    host left behind when they were killed."""
    root = Path(out_dir) / INIT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        m = _INIT_FILE.fullmatch(entry.name)
        if m is not None and writer_is_gone(m.group(1), int(m.group(2))):
            entry.unlink(missing_ok=True)
    named = list(model.named_parameters())
    layout = {"format": _FORMAT, "format_version": _VERSION,
              "names": [n for n, _ in named], "shapes": [list(p.shape) for _, p in named]}
    arrays = {n: c_order(to_numpy(p.data)) for n, p in named} if values else {}
    path = root / f"{temp_tag('init')}.safetensors"
    # No fsync, no rename: the file outlives no crash of its writer (the job dies with the
    # coordinator), and nobody reads it before this returns.
    safetensors.numpy.save_file(arrays, str(path), {_KEY: json.dumps(layout)})
    return path


def remove_init_state(path: str | os.PathLike[str]) -> None:
    """Remove an initial-state file, and its directory once empty (the run has ended)."""
    p = Path(path)
    p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: another running job's file
        p.parent.rmdir()


@dataclass
class JobOutline:
    """The job as a shard needs it: the parameters' names and shapes (model order), the
    optimizer and LR scheduler over shape-only stand-ins of them (`params`), the step the
    job starts at, and where the starting values (and, resuming, optimizer state) of any
    flat range of a parameter are read from."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    params: list[Tensor]
    optimizer: Any
    scheduler: Any
    start: int
    values_file: Path  # the init file (fresh) or the checkpoint's model.safetensors
    _values: dict[str, TensorInfo] = field(repr=False)
    state_file: Path | None = None  # the checkpoint's optimizer.safetensors, if any
    _state: dict[str, TensorInfo] = field(default_factory=dict, repr=False)
    # per parameter (model order): its optimizer state as the manifest has it, arrays as
    # {"__array__": key} references into state_file
    _state_trees: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def plan(self, num_shards: int, bucket_bytes: int = BUCKET_BYTES,
             stage_names: list[list[str]] | None = None) -> Plan:
        """The job's bucket plan: `num_shards` ranges of the flat parameters, or, for a
        data-parallel pipeline, a shard per stage (`stage_names`: each stage's parameters)."""
        return job_plan(zip(self.names, self.shapes), num_shards, bucket_bytes, stage_names)

    def read_values(self, piece: Piece, out: np.ndarray) -> np.ndarray:
        """The starting values of `piece` (a flat range of one parameter) into `out`."""
        return _read_f32(self.values_file, self._values, self.names[piece.index],
                         piece.start, piece.stop, out)

    def read_state(self, piece: Piece) -> dict[str, Any]:
        """The optimizer state of `piece`, as the parameter's state restored into the job's
        optimizer and cut to the piece's range (arrays float32, scalars plain numbers);
        empty on a fresh start or for a parameter without state."""
        tree = self._state_trees[piece.index] if self._state_trees else {}
        name, shape = self.names[piece.index], self.shapes[piece.index]
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if not (isinstance(value, dict) and "__array__" in value):
                value = decode(value, {}, str(self.state_file))
                out[key] = value.item() if isinstance(value, np.generic) else value
                continue
            ref = value["__array__"]
            info = self._state.get(ref)
            if self.state_file is None or info is None:
                raise CheckpointError(f"{self.state_file or self.values_file.parent}: the "
                                      f"manifest refers to optimizer array {ref!r}, which is "
                                      f"missing")
            if info.shape == ():
                out[key] = read_range(self.state_file, ref, header=self._state)[0].item()
            elif info.shape != shape:
                raise CheckpointError(f"{self.state_file}: optimizer state {key!r} of "
                                      f"parameter {name!r} has shape {info.shape}, the "
                                      f"parameter has shape {shape}")
            else:
                out[key] = _read_f32(self.state_file, self._state, ref, piece.start,
                                     piece.stop, np.empty(piece.size, np.float32))
        return out


def job_outline(cfg: JobConfig, init_state: str | os.PathLike[str],
                resume: str | os.PathLike[str] | None = None) -> JobOutline:
    """The outline of the job `cfg` from the coordinator's initial-state file, starting
    fresh, or from checkpoint `resume`. Reads headers and the manifest only; values and
    state are read per piece. The checkpoint is not hashed here: the coordinator verified
    it whole before starting the shards (hashing it once per shard would read it all)."""
    init = Path(init_state)
    names, shapes, init_values = _read_layout(init)
    params = [_stand_in(s) for s in shapes]
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    if resume is None:
        if not init_values:
            raise CheckpointError(f"{init}: holds no initial values (the job started from a "
                                  f"checkpoint), and no checkpoint to resume from was given")
        _check_values(init, init_values, names, shapes)
        return JobOutline(names, shapes, params, optimizer, scheduler, 0, init, init_values)

    ckpt = Path(resume)
    manifest = read_manifest(ckpt)
    files = {}
    for fname, info in manifest["files"].items():
        fpath = ckpt / fname
        size = fpath.stat().st_size if fpath.is_file() else None
        if size != info["size"]:
            raise CheckpointError(f"{fpath}: expected {info['size']} bytes, found "
                                  f"{'no file' if size is None else size} (replaced or "
                                  f"truncated since the coordinator verified it)")
        files[fname] = fpath
    if "model.safetensors" not in files:
        raise CheckpointError(f"{ckpt / 'manifest.json'}: lists no model.safetensors")
    values_file = files["model.safetensors"]
    values = read_header(values_file)[0]
    _check_values(values_file, values, names, shapes)
    state_file = files.get("optimizer.safetensors")
    state = read_header(state_file)[0] if state_file is not None else {}

    source = str(ckpt / "manifest.json")
    opt_tree = manifest["optimizer"]
    groups = decode(opt_tree["param_groups"], {}, source)
    # The hyperparameters (lr, initial_lr, betas...) as restore() leaves them: the saved ones.
    optimizer.load_state_dict({"state": {}, "param_groups": groups})
    extra = {"scheduler": decode(manifest["extra"]["scheduler"], {}, source),
             "config": decode(manifest["extra"].get("config", {}), {}, source)}
    scheduler = resume_schedule(scheduler, optimizer, cfg, extra, int(manifest["step"]),
                                str(ckpt))
    trees: list[dict[str, Any]] = [{} for _ in names]
    model_index = {id(p): j for j, p in enumerate(params)}
    of_index = {int(i): model_index[id(p)] for saved, group in zip(groups, optimizer.param_groups)
                for i, p in zip(saved["params"], group["params"])}
    saved_state = opt_tree["state"]
    pairs = saved_state["__dict__"] if "__dict__" in saved_state else saved_state.items()
    for raw, entry in pairs:
        i = int(decode(raw, {}, source))
        if i not in of_index:
            raise CheckpointError(f"{source}: optimizer state for parameter {i}, which no "
                                  f"param group lists (there are {len(of_index)} parameters)")
        trees[of_index[i]] = entry
    return JobOutline(names, shapes, params, optimizer, scheduler, int(manifest["step"]),
                      values_file, values, state_file, state, trees)


def _read_layout(path: Path) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...],
                                      dict[str, TensorInfo]]:
    infos, meta = read_header(path)
    try:
        layout = json.loads(meta[_KEY])
        if layout["format"] != _FORMAT or layout["format_version"] > _VERSION:
            raise ValueError(f"format {layout['format']!r} version "
                             f"{layout['format_version']!r}")
        names = tuple(str(n) for n in layout["names"])
        shapes = tuple(tuple(int(d) for d in s) for s in layout["shapes"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a narun initial-state file this narun reads "
                              f"({type(err).__name__}: {err})") from None
    if len(names) != len(shapes):
        raise CheckpointError(f"{path}: lists {len(names)} names and {len(shapes)} shapes")
    return names, shapes, infos


def _check_values(path: Path, infos: dict[str, TensorInfo], names: tuple[str, ...],
                  shapes: tuple[tuple[int, ...], ...]) -> None:
    """Every parameter is in the file with its shape: name what is not, all at once."""
    problems = []
    for name, shape in zip(names, shapes):
        info = infos.get(name)
        if info is None:
            problems.append(f"no {name!r}")
        elif info.shape != shape:
            problems.append(f"{name!r} has shape {info.shape}, the model {shape}")
    if problems:
        raise CheckpointError(f"{path} does not fit the model (model.* config changed since "
                              f"it was written?): {'; '.join(problems)}")


def _read_f32(path: Path, header: dict[str, TensorInfo], name: str, start: int, stop: int,
              out: np.ndarray) -> np.ndarray:
    if header[name].dtype == np.float32:
        return read_range(path, name, start, stop, out=out, header=header)
    out[...] = read_range(path, name, start, stop, header=header)  # cast, as restore() does
    return out


def _stand_in(shape: tuple[int, ...]) -> Tensor:
    """A parameter of `shape` holding no memory: the optimizer's groups and the scheduler
    look at shapes and identities only."""
    return Tensor._wrap(np.broadcast_to(np.zeros((), np.float32), shape))
