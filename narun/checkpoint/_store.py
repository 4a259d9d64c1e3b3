"""Training checkpoints: a directory per step, written atomically, verified before use.

    runs/x/checkpoints/step-000500/
        model.safetensors       the module's state dict
        optimizer.safetensors   the optimizer state's arrays (present when it has any)
        extra.safetensors       arrays found in `extra` (e.g. a legacy RNG's key), if any
        manifest.json           written last: format_version, step, created, run_id (the
                                run's lineage, when given), files (sha256 and size of each),
                                optimizer and extra state as JSON with array references into
                                the files above, manifest_sha256

A checkpoint is written into `.step-000500.tmp-<host>-<pid>/`, every file and the directory
fsynced, then renamed into place, so a crash at any point leaves either no `step-*`
directory or a complete one.

A run's checkpoints share a `run_id` (kept across resumes): pruning only ever removes
checkpoints of the run that is saving, and "newest" means the newest written (`created`,
then step), not the highest step number, so two runs in one directory never delete or
shadow each other's checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import structlog
from safetensors import SafetensorError

from narun.checkpoint._fs import (
    file_digest,
    fsync_dir,
    fsync_file,
    is_stale_temp,
    remove_tree,
    temp_tag,
)
from narun.checkpoint._tree import c_order, decode, encode, to_numpy
from narun.errors import CheckpointError

FORMAT = "narun-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step-(\d+)")
_FILES = ("model.safetensors", "optimizer.safetensors", "extra.safetensors")

log = structlog.get_logger("narun.checkpoint")


@dataclass
class Checkpoint:
    """A verified checkpoint: arrays as NumPy, the rest as it was saved."""

    path: Path
    step: int
    model: dict[str, np.ndarray]
    optimizer: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(directory: str | os.PathLike[str], step: int, model_state: Any,
                    optimizer_state: Any = None, extra: Mapping[str, Any] | None = None, *,
                    keep: int | None = None, run_id: str | None = None) -> Path:
    """Write `directory/step-NNNNNN/` atomically and return its path.

    `model_state` is a flat {name: array} (or a module: its state_dict() is used);
    `optimizer_state` and `extra` are nested plain data with arrays anywhere (e.g. extra =
    {"config": ..., "rng": generator.bit_generator.state, "data": sampler.state_dict()}).
    `run_id` names the run's lineage in the manifest. With `keep`, that lineage's checkpoints
    beyond the newest `keep` written (this one among them) are removed afterwards; other
    runs' checkpoints are never touched. An existing checkpoint of the same step is replaced.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"save_checkpoint: step must be an integer >= 0, got {step!r}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{int(step):06d}"
    groups: dict[str, dict[str, np.ndarray]] = {f: {} for f in _FILES}
    groups["model.safetensors"] = state_arrays(model_state, "model_state")
    opt_tree = encode(optimizer_state, groups["optimizer.safetensors"])
    extra_tree = encode(dict(extra or {}), groups["extra.safetensors"])

    tmp = root / f".{name}.{temp_tag()}"
    remove_tree(tmp)
    tmp.mkdir()
    try:
        files = {}
        for fname, arrays in groups.items():
            if arrays or fname == "model.safetensors":
                fpath = tmp / fname
                safetensors.numpy.save_file(arrays, str(fpath))
                fsync_file(fpath)
                sha, size = file_digest(fpath)
                files[fname] = {"sha256": sha, "size": size}
        manifest: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
            "created": datetime.now(UTC).isoformat(timespec="microseconds"),
            **({"run_id": run_id} if run_id is not None else {}),
            "files": files, "optimizer": opt_tree, "extra": extra_tree,
        }
        manifest["manifest_sha256"] = _json_digest(manifest)
        mpath = tmp / MANIFEST
        mpath.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        fsync_file(mpath)
        fsync_dir(tmp)
        _publish(tmp, root / name)
    except BaseException:
        remove_tree(tmp)
        raise
    fsync_dir(root)
    if keep is not None:
        prune(root, keep, run_id=run_id, protect=root / name)
    return root / name


def verify_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the checkpoint at `path`, after checking its own checksum and the
    size and SHA-256 of every file it lists; CheckpointError naming the bad file otherwise."""
    p = Path(path)
    manifest = read_manifest(p)
    for fname, info in manifest["files"].items():
        fpath = p / fname
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: missing (listed in {MANIFEST})")
        sha, size = file_digest(fpath)
        if size != info["size"]:
            raise CheckpointError(f"{fpath}: truncated or overwritten: expected {info['size']} "
                                  f"bytes, got {size}")
        if sha != info["sha256"]:
            raise CheckpointError(f"{fpath}: checksum mismatch: expected sha256 "
                                  f"{info['sha256'][:16]}..., got {sha[:16]}...; corrupted")
    return manifest


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the checkpoint at `path`, after checking the manifest alone (format,
    version, its own checksum, its step and file names), without hashing the files it lists:
    for a reader of a few byte ranges of a checkpoint that was verified whole already."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    mpath = p / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: missing: the checkpoint is incomplete (its write did "
                              f"not finish) or {p} is not a checkpoint directory")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{mpath}: unreadable ({err}); truncated or corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: not a narun checkpoint manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: format_version {version!r} is not supported "
                              f"(this narun reads up to {FORMAT_VERSION})")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if manifest.get("manifest_sha256") != _json_digest(body):
        raise CheckpointError(f"{mpath}: checksum mismatch: the manifest is corrupted")
    m = _STEP_DIR.fullmatch(p.name)
    if m is not None and int(m.group(1)) != manifest.get("step"):
        raise CheckpointError(f"{mpath}: records step {manifest.get('step')!r} but the "
                              f"directory is named {p.name}")
    for fname in manifest["files"]:
        if Path(fname).name != fname:
            raise CheckpointError(f"{mpath}: file name {fname!r} points outside the checkpoint")
    return manifest


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint directory after verifying every checksum (see verify_checkpoint)."""
    p = Path(path)
    manifest = verify_checkpoint(p)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for fname in manifest["files"]:
        try:
            groups[fname] = safetensors.numpy.load_file(str(p / fname))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{p / fname}: unreadable: {err}") from None
    return Checkpoint(
        path=p, step=int(manifest["step"]), model=groups.get("model.safetensors", {}),
        optimizer=decode(manifest["optimizer"], groups.get("optimizer.safetensors", {}),
                         str(p / "optimizer.safetensors")),
        extra=decode(manifest["extra"], groups.get("extra.safetensors", {}),
                     str(p / "extra.safetensors")),
        manifest=manifest,
    )


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints (a `step-N` directory with a manifest) in `directory`, oldest
    written first (by the manifest's `created`, then step; one whose manifest cannot be
    read has no known age and sorts as the newest, so `latest_good` reports skipping it).
    Cheap: only manifests are read; `latest_good` verifies."""
    return [p for _, p in _by_age(directory) if (p / MANIFEST).is_file()]


def run_id_of(path: str | os.PathLike[str]) -> str | None:
    """The `run_id` a checkpoint's manifest records (None: unlabelled, or unreadable)."""
    try:
        value = read_manifest(path).get("run_id")
    except CheckpointError:
        return None
    return value if isinstance(value, str) else None


def latest_good(directory: str | os.PathLike[str], run_id: str | None = None) -> Path | None:
    """The newest written checkpoint in `directory` that verifies (of the run `run_id` when
    given), or None if there is none. Each newer one skipped is logged as a warning (event
    `checkpoint_skipped`) with the reason."""
    for _, p in reversed(_by_age(directory)):
        if run_id is not None and run_id_of(p) != run_id:
            continue
        try:
            verify_checkpoint(p)
        except CheckpointError as err:
            log.warning("checkpoint_skipped", path=str(p), reason=str(err))
            continue
        return p
    return None


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint as a user names one: a step directory as given, or the newest good
    checkpoint (see latest_good) of a run directory (its checkpoints/) or of a checkpoints
    directory; CheckpointError saying what was expected otherwise."""
    p = Path(path)
    if (p / MANIFEST).exists():
        return p
    for candidate in (p / "checkpoints", p):
        if candidate.is_dir():
            found = latest_good(candidate)
            if found is not None:
                return found
    raise CheckpointError(f"{path}: no checkpoint here (expected a step-NNNNNN directory with "
                          "a manifest.json, or a run directory that holds checkpoints/)")


def prune(directory: str | os.PathLike[str], keep: int, *, run_id: str | None = None,
          protect: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove all but the newest `keep` written checkpoints of the run `run_id` (None: the
    unlabelled ones), and temp directories left by writers of this host that died; returns
    what was removed. Checkpoints of other runs, and `protect` (the one just written), are
    never removed. A checkpoint counts towards `keep` whether or not it would verify
    (pruning does not hash)."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"prune: keep must be an integer >= 1, got {keep!r}")
    root = Path(directory)
    mine = [p for p in list_checkpoints(root) if run_id_of(p) == run_id]
    kept = Path(protect) if protect is not None else None
    removed = [p for p in mine[:-keep] if p != kept]
    if root.is_dir():
        removed += [e for e in root.iterdir() if e.name.startswith(".step-")
                    and e.is_dir() and is_stale_temp(e.name)]
    for p in removed:
        remove_tree(p)
    if removed:
        fsync_dir(root)
    return removed


def state_arrays(state: Any, what: str) -> dict[str, np.ndarray]:
    """{name: contiguous NumPy array} of a flat state dict, or of a module's state_dict()."""
    if not isinstance(state, Mapping) and callable(getattr(state, "state_dict", None)):
        state = state.state_dict()
    if not isinstance(state, Mapping):
        raise TypeError(f"{what}: expected a module or a dict of arrays, "
                        f"got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        arr = to_numpy(value)
        if not isinstance(key, str) or arr is None:
            raise TypeError(f"{what}[{key!r}]: expected a str key and an array value, "
                            f"got {type(key).__name__} -> {type(value).__name__}")
        out[key] = c_order(arr)
    return out


def _step_dirs(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.fullmatch(entry.name)
        if m is not None and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def _by_age(directory: str | os.PathLike[str]) -> list[tuple[tuple[str, int], Path]]:
    """Step directories, oldest written first: by the manifest's `created` (ISO 8601 UTC,
    so it sorts as text), then by step; an unreadable manifest sorts as the newest ("~")."""
    found = []
    for step, p in _step_dirs(directory):
        try:
            created = str(read_manifest(p).get("created", ""))
        except CheckpointError:
            created = "~"
        found.append(((created, step), p))
    return sorted(found, key=lambda item: item[0])


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp directory into place (replacing an older one of that step)."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.with_name(f".{final.name}.{temp_tag('old')}")
    remove_tree(old)
    os.rename(final, old)
    os.rename(tmp, final)
    remove_tree(old)


def _json_digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()
