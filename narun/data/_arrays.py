"""Datasets of named arrays from .npy / .npz files, and a known-answer generator."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from narun.data._text import SPLITS, split_bounds
from narun.errors import ConfigError


class ArrayDataset:
    """Rows of named arrays that share their first dimension (e.g. `x` features, `y` labels).

    A `.npz` file gives one array per name; a `.npy` file gives one array named `x`.
    Files are read with `allow_pickle=False` (never pickle). The validation split is the
    last `round(n * val_fraction)` rows.

        >>> ds = ArrayDataset("blobs.npz", split="train", val_fraction=0.1)  # doctest: +SKIP
        >>> x, y = ds[np.array([0, 5, 7])]                                  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str], names: tuple[str, ...] | None = None,
                 val_fraction: float = 0.0, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"ArrayDataset: split must be one of {SPLITS}, got {split!r}")
        arrays = load_arrays(path)
        if names is not None:
            missing = [n for n in names if n not in arrays]
            if missing:
                raise ConfigError(
                    f"data.path: {str(path)!r} has no array named {missing[0]!r} "
                    f"(it has: {', '.join(sorted(arrays))})"
                )
            arrays = {n: arrays[n] for n in names}
        lengths = {n: (a.shape[0] if a.ndim else None) for n, a in arrays.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise ConfigError(
                f"data.path: arrays of {str(path)!r} must share their first dimension, got "
                + ", ".join(f"{n}: {a.shape}" for n, a in arrays.items())
            )
        n = next(iter(lengths.values()))
        train_end, _ = split_bounds(n, val_fraction)
        rows = slice(0, train_end) if split == "train" else slice(train_end, n)
        self.path = str(path)
        self.split = split
        self.names: tuple[str, ...] = tuple(arrays)
        self.arrays: dict[str, np.ndarray] = {k: a[rows] for k, a in arrays.items()}

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def __getitem__(self, index: Any) -> tuple[np.ndarray, ...]:
        """The rows at `index` (int, slice or index array) of every array, in `names` order."""
        return tuple(self.arrays[n][index] for n in self.names)

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, ...]:
        """Rows at `indices` (e.g. from a ShardedSampler), as fresh contiguous arrays."""
        idx = np.asarray(indices, dtype=np.int64)
        return tuple(np.ascontiguousarray(self.arrays[n][idx]) for n in self.names)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}={a.shape}:{a.dtype}" for n, a in self.arrays.items())
        return f"ArrayDataset({self.path!r}, split={self.split!r}, {shapes})"


def missing_arrays(path: str | os.PathLike[str]) -> ConfigError:
    """The error for an array dataset's file that is not there, naming what makes one."""
    p = Path(path)
    make = "; "
    if p.suffix == ".npz":
        maker = ("`narun data shapes {p}` writes labelled images there (configs/resnet.yaml's "
                 "data)" if "shape" in p.name else "`narun data blobs {p}` writes a "
                 "known-answer classification set there (configs/mlp.yaml's data)")
        make = f"; {maker.format(p=p)}, or "
    return ConfigError(f"data.path: no such file {str(p)!r}{make}set data.path to a .npz "
                       f"file with arrays x and y")


def class_prompts(path: str | os.PathLike[str]) -> np.ndarray:
    """The texts naming each class of an array dataset, (classes, P), for zero-shot
    classification (CLIP): its `prompts` array (row c: P texts naming class c, as `narun
    data shapes` writes), else its `classes` names, one prompt each. ConfigError if it has
    neither."""
    with np.load(Path(path), allow_pickle=False) as arrays:
        if "prompts" in arrays.files:
            return np.asarray(arrays["prompts"])
        if "classes" in arrays.files:
            return np.asarray(arrays["classes"])[:, None]
        raise ConfigError(f"data.path: {str(path)!r} has no array `prompts` or `classes` "
                          f"(texts naming each class), which zero-shot accuracy scores "
                          f"images against; `narun data shapes` writes both")


def load_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Named arrays of a .npz file, or {"x": array} for a .npy file (no pickled objects)."""
    p = Path(path)
    if not p.is_file():
        raise missing_arrays(p)
    try:
        loaded = np.load(p, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"x": loaded}
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        # object arrays would need pickle; anything else here is a malformed file
        raise ConfigError(f"data.path: cannot read {str(p)!r} as .npy/.npz: {err}") from None


def make_classification_npz(path: str | os.PathLike[str], n: int = 2048, dim: int = 16,
                            classes: int = 4, seed: int = 0, separation: float = 4.0) -> Path:
    """Write a known-answer classification set: Gaussian blobs, one per class.

    Class centres are `separation * N(0, I_dim)`; points are centre + N(0, I_dim). With the
    defaults the centres lie ~20 standard deviations apart, so the Bayes accuracy is
    essentially 100% and a small MLP (even a linear layer) must reach near 100%. Writes
    `x` (float32, (n, dim)) and `y` (int64, (n,)), rows in random order; returns the path.
    """
    for name, value, low in (("n", n, 1), ("dim", dim, 1), ("classes", classes, 2)):
        if value < low:
            raise ValueError(f"make_classification_npz: {name} must be >= {low}, got {value}")
    rng = np.random.default_rng(seed)
    centers = separation * rng.standard_normal((classes, dim))
    y = rng.permutation(np.arange(n) % classes).astype(np.int64)  # balanced classes
    x = (centers[y] + rng.standard_normal((n, dim))).astype(np.float32)
    p = Path(path)
    with open(p, "wb") as f:  # a file object keeps np.savez from appending ".npz"
        np.savez(f, x=x, y=y)
    return p
