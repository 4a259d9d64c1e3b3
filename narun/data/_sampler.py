"""Seeded samplers that shard batches over ranks, without overlap or loss, and resume exactly.

Both samplers define the *global* batch of a step from the seed alone, then give rank r of
`world_size` its contiguous share of it. So the union of all ranks' batches at a step is the
same set of samples whatever the number of ranks (ps-sync == one process on the global
batch), and a run resumed with a different number of trainers continues the same sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"sampler: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_shard(batch_size: int, rank: int, world_size: int) -> None:
    if rank >= world_size:
        raise ValueError(f"sampler: rank must be < world_size={world_size}, got rank={rank}")
    if batch_size % world_size:
        raise ValueError(
            f"sampler: the global batch_size={batch_size} must be divisible by "
            f"world_size={world_size}, so every rank gets batch_size / world_size samples"
        )


def _share(n: int, rank: int, world_size: int) -> slice:
    """Rank's contiguous part of n items: sizes differ by at most one, earlier ranks larger."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class ShardedSampler:
    """Epochs of seeded permutations of `range(num_samples)`, cut into global batches of
    `batch_size`; rank r of `world_size` yields its share of each global batch.

    Epoch e uses the permutation of `np.random.default_rng([seed, e])` (or the identity with
    `shuffle=False`); all ranks compute the same one, so shards are disjoint and, with
    `drop_last=False`, together cover every index exactly once per epoch. The last global
    batch of an epoch then holds `num_samples % batch_size` indices split as evenly as
    possible: a rank may get fewer (even zero), so weight a rank's loss by its batch length.
    With `drop_last=True` that incomplete batch is skipped.

    The position is (epoch, index): the number of batches already taken in the epoch.
    `state_dict()` after a batch, restored with `load_state_dict()`, resumes with exactly
    the batches that would have come next.

        >>> s = ShardedSampler(10, batch_size=4, rank=1, world_size=2, seed=0)
        >>> len(s), [b.tolist() for b in s]
        (3, [[2, 7], [9, 0], [1]])
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False) -> None:
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.rank = _check_int("rank", rank, 0)
        self.world_size = _check_int("world_size", world_size, 1)
        self.seed = _check_int("seed", seed, 0)
        _check_shard(self.batch_size, self.rank, self.world_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.num_samples < self.batch_size:
            raise ValueError(
                f"sampler: drop_last with num_samples={num_samples} < batch_size={batch_size} "
                f"leaves no batch at all"
            )
        self.epoch = 0
        self.index = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def local_batch_size(self) -> int:
        """Samples per full batch on this rank: batch_size / world_size."""
        return self.batch_size // self.world_size

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def permutation(self, epoch: int) -> np.ndarray:
        """The global order of sample indices in `epoch` (identical on every rank)."""
        if epoch != self._perm_epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._perm = rng.permutation(self.num_samples).astype(np.int64)
            else:
                self._perm = np.arange(self.num_samples, dtype=np.int64)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, epoch: int, index: int) -> np.ndarray:
        """All ranks' indices of batch `index` in `epoch`, in rank order."""
        start = index * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size]

    def next_batch(self) -> np.ndarray:
        """This rank's indices of the next batch; rolls over into the next epoch (endless)."""
        if self.index >= len(self):
            self.epoch += 1
            self.index = 0
        glob = self.global_batch(self.epoch, self.index)
        self.index += 1
        return glob[_share(len(glob), self.rank, self.world_size)].copy()

    def __iter__(self) -> Iterator[np.ndarray]:
        """The remaining batches of the current epoch; afterwards the position is the start
        of the next epoch, so `for epoch ...: for batch in sampler:` walks epoch by epoch."""
        if self.index >= len(self):
            self.epoch += 1
            self.index = 0
        while self.index < len(self):
            yield self.next_batch()
        self.epoch += 1
        self.index = 0

    def seek(self, batches: int) -> None:
        """Jump to the position after `batches` global batches from the start of epoch 0,
        so that a process joining a job midway takes the batch of its step."""
        self.epoch, self.index = divmod(_check_int("batches", batches, 0), len(self))

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of `epoch`."""
        self.epoch = _check_int("epoch", epoch, 0)
        self.index = 0

    def state_dict(self) -> dict[str, Any]:
        """The position plus what defines the sequence (checked when loading). Rank and
        world_size are not part of it: positions count global batches."""
        return {"epoch": self.epoch, "index": self.index, "num_samples": self.num_samples,
                "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_samples", "batch_size", "seed", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler: cannot resume: saved {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r} (the batch sequence would differ)"
                )
        epoch = _check_int("epoch", state["epoch"], 0)
        index = _check_int("index", state["index"], 0)
        if index > len(self):
            raise ValueError(f"sampler: saved index={index} exceeds {len(self)} batches/epoch")
        self.epoch, self.index = epoch, index

    def __repr__(self) -> str:
        return (f"ShardedSampler(num_samples={self.num_samples}, batch_size={self.batch_size}, "
                f"rank={self.rank}, world_size={self.world_size}, seed={self.seed}, "
                f"epoch={self.epoch}, index={self.index})")


class WindowSampler:
    """Random window offsets for text: step s's global batch is `batch_size` offsets drawn
    from `np.random.default_rng([seed, s])`; rank r takes its contiguous share.

    Stateless by design: the batch of a step is a pure function of (seed, step, rank,
    world_size), so resuming at step s reproduces every later batch bit for bit with no RNG
    state to checkpoint, and a restarted trainer rejoining at the current step needs only
    the step number. The cost is one tiny Generator per step (microseconds). Offsets are
    drawn with replacement, as in the usual random-window GPT training loops.

        >>> ws = WindowSampler(num_windows=len(ds), batch_size=16, seed=0)  # doctest: +SKIP
        >>> x, y = ds.batch(ws.offsets(step))                             # doctest: +SKIP
    """

    def __init__(self, num_windows: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        self.num_windows = _check_int("num_windows", num_windows, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.rank = _check_int("rank", rank, 0)
        self.world_size = _check_int("world_size", world_size, 1)
        self.seed = _check_int("seed", seed, 0)
        _check_shard(self.batch_size, self.rank, self.world_size)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def global_offsets(self, step: int) -> np.ndarray:
        """All ranks' offsets of `step`, in rank order."""
        rng = np.random.default_rng([self.seed, _check_int("step", step, 0)])
        return rng.integers(0, self.num_windows, size=self.batch_size, dtype=np.int64)

    def offsets(self, step: int) -> np.ndarray:
        """This rank's window offsets at `step` (local_batch_size of them)."""
        return self.global_offsets(step)[_share(self.batch_size, self.rank, self.world_size)]

    def __repr__(self) -> str:
        return (f"WindowSampler(num_windows={self.num_windows}, batch_size={self.batch_size}, "
                f"rank={self.rank}, world_size={self.world_size}, seed={self.seed})")
