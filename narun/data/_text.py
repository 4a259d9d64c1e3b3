"""Byte-level text datasets: a corpus as one uint8 array, split, cut into windows."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from narun.data._tokenizer import ByteTokenizer
from narun.errors import ConfigError

SPLITS = ("train", "val")


@functools.lru_cache(maxsize=1)
def default_corpus() -> bytes:
    """The English documentation text that ships inside CPython (`pydoc_data.topics`):
    the topic texts concatenated in sorted key order, so the corpus is the same on every run
    of a given Python version and nothing is downloaded (about 0.45 MB on 3.11)."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics)).encode("utf-8")


def load_corpus(path: str | os.PathLike[str] | None = None) -> np.ndarray:
    """The bytes of `path` (any file: bytes are tokens) or of the default corpus, as uint8."""
    if path is None:
        return np.frombuffer(default_corpus(), dtype=np.uint8)
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"data.path: no such file {str(p)!r}") from None
    except IsADirectoryError:
        raise ConfigError(f"data.path: {str(p)!r} is a directory, expected a text file") from None
    return np.frombuffer(raw, dtype=np.uint8)


def split_bounds(n: int, val_fraction: float) -> tuple[int, int]:
    """(train_end, n): train is tokens [0, train_end), validation is the tail [train_end, n)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be >= 0 and < 1, got {val_fraction!r}")
    n_val = int(round(n * val_fraction))
    return n - n_val, n


class TextDataset:
    """One split of a byte-level corpus, sampled as (x, y) windows of `seq_len` tokens.

    `x[b, t]` is token `o_b + t` and `y[b, t]` is token `o_b + t + 1` (the next byte), for a
    window offset `o_b` in `[0, len(self))`. The split is contiguous (train = head,
    val = tail), so no window of one split sees a token of the other.

        >>> ds = TextDataset(seq_len=64)
        >>> x, y = ds.sample_batch(8, np.random.default_rng(0))
        >>> x.shape, x.dtype, bool((x[:, 1:] == y[:, :-1]).all())
        ((8, 64), dtype('int64'), True)
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, seq_len: int = 128,
                 val_fraction: float = 0.05, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"TextDataset: split must be one of {SPLITS}, got {split!r}")
        if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ConfigError(f"data.seq_len: must be a positive integer, got {seq_len!r}")
        corpus = load_corpus(path)
        train_end, n = split_bounds(len(corpus), val_fraction)
        self.path = None if path is None else str(path)
        self.seq_len = int(seq_len)
        self.val_fraction = float(val_fraction)
        self.split = split
        self.tokenizer = ByteTokenizer()
        self.data: np.ndarray = corpus[:train_end] if split == "train" else corpus[train_end:n]
        if len(self.data) < self.seq_len + 1:
            where = "the default corpus" if path is None else repr(self.path)
            raise ConfigError(
                f"data.seq_len: split {split!r} of {where} has {len(self.data)} tokens "
                f"(val_fraction={val_fraction}), fewer than seq_len + 1 = {self.seq_len + 1}; "
                f"lower data.seq_len or change data.val_fraction"
            )
        # (num_windows, T + 1) view without copying; rows are the candidate windows.
        self._windows = sliding_window_view(self.data, self.seq_len + 1)

    @classmethod
    def splits(cls, path: str | os.PathLike[str] | None = None, seq_len: int = 128,
               val_fraction: float = 0.05) -> tuple[TextDataset, TextDataset]:
        """(train, val) datasets of one corpus."""
        return (cls(path, seq_len, val_fraction, "train"), cls(path, seq_len, val_fraction, "val"))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def num_tokens(self) -> int:
        return int(len(self.data))

    def __len__(self) -> int:
        """Number of distinct window offsets."""
        return int(len(self.data) - self.seq_len)

    def batch(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The windows starting at `offsets` as C-contiguous int64 (x, y), each (B, seq_len)."""
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 1:
            raise ValueError(f"TextDataset.batch: offsets must be 1-D, got shape {offsets.shape}")
        if offsets.size and (offsets.min() < 0 or offsets.max() >= len(self)):
            raise IndexError(
                f"TextDataset.batch: offsets must lie in [0, {len(self)}), got "
                f"[{int(offsets.min())}, {int(offsets.max())}]"
            )
        rows = self._windows[offsets].astype(np.int64)  # one gather + one widening pass
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def sample_batch(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                               np.ndarray]:
        """`batch_size` windows at offsets drawn uniformly (with replacement) from `rng`."""
        return self.batch(rng.integers(0, len(self), size=batch_size))

    def iter_eval_batches(self, batch_size: int, max_batches: int | None = None
                          ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Deterministic, non-overlapping windows in order (offsets 0, T, 2T, ...), so every
        token of the split after the first is predicted exactly once, up to the last full
        window; the last batch may be smaller than `batch_size`."""
        if batch_size < 1:
            raise ValueError(f"iter_eval_batches: batch_size must be >= 1, got {batch_size}")
        offsets = np.arange(0, len(self), self.seq_len, dtype=np.int64)
        for i, start in enumerate(range(0, len(offsets), batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            yield self.batch(offsets[start:start + batch_size])

    def __repr__(self) -> str:
        src = "pydoc_data.topics" if self.path is None else self.path
        return (f"TextDataset({src!r}, split={self.split!r}, tokens={self.num_tokens}, "
                f"seq_len={self.seq_len})")
