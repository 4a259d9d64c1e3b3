"""Flat parameter buckets and their assignment to parameter-server shards.

All parameters, in model order, are viewed as one flat float32 vector. It is cut into
buckets of about `bucket_bytes` (the unit a trainer pushes and a shard updates), and the
buckets are dealt to shards by key range: shard k holds the contiguous run of buckets
[k*B/K, (k+1)*B/K), so one shard holds one contiguous range of the flat vector and a tensor
larger than a bucket is split across shards. Every process computes the same plan from the
same (name, shape) list, so the plan itself never travels.

    >>> plan = make_plan([("w", (4, 3)), ("b", (3,))], num_shards=2, bucket_bytes=24)
    >>> [b.key for b in plan.buckets], [b.shard for b in plan.buckets]
    (['b0', 'b1', 'b2'], [0, 0, 1])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from narun.errors import ConfigError, ShapeError

#: Default bucket size: PyTorch DDP found 1-25 MB buckets within a few % of each other;
#: 4 MB keeps several buckets in flight per shard for models of a few tens of MB.
BUCKET_BYTES = 4 << 20


@dataclass(frozen=True)
class Piece:
    """The part of parameter `name` (flat range [start, stop) of it) that lies in a bucket,
    at [offset, offset + stop - start) of the bucket."""

    name: str
    index: int  # the parameter's position in model order
    start: int
    stop: int
    offset: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Bucket:
    key: str
    index: int
    shard: int
    start: int  # flat range of the whole parameter vector
    stop: int
    pieces: tuple[Piece, ...]

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Plan:
    """Buckets in flat order, and the shapes of the parameters they cut."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    buckets: tuple[Bucket, ...]
    num_shards: int
    by_key: dict[str, Bucket] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_key", {b.key: b for b in self.buckets})

    def shard_buckets(self, shard: int) -> list[Bucket]:
        return [b for b in self.buckets if b.shard == shard]

    def buckets_of(self) -> list[list[int]]:
        """For each parameter (model order), the indices of the buckets holding part of it."""
        out: list[list[int]] = [[] for _ in self.names]
        for b in self.buckets:
            for p in b.pieces:
                out[p.index].append(b.index)
        return out

    @property
    def total(self) -> int:
        return self.buckets[-1].stop if self.buckets else 0


def make_plan(named_shapes: Iterable[tuple[str, Sequence[int]]], num_shards: int,
              bucket_bytes: int = BUCKET_BYTES, itemsize: int = 4) -> Plan:
    """Cut the parameters into about `bucket_bytes` buckets, at least one per shard."""
    if num_shards < 1:
        raise ConfigError(f"runtime.ps_shards: expected >= 1, got {num_shards}")
    if bucket_bytes < itemsize:
        raise ConfigError(f"bucket_bytes: expected >= {itemsize}, got {bucket_bytes}")
    items = [(str(n), tuple(int(d) for d in s)) for n, s in named_shapes]
    sizes = [math.prod(s) for _, s in items]
    total = sum(sizes)
    if total < num_shards:
        raise ConfigError(f"runtime.ps_shards: {num_shards} shards for a model of {total} "
                          f"parameters; use at most {max(total, 1)}")
    count = max(num_shards, math.ceil(total * itemsize / bucket_bytes))
    bounds = [total * i // count for i in range(count + 1)]  # equal-sized, in elements
    starts = np.cumsum([0, *sizes])
    buckets = []
    for i in range(count):
        lo, hi = bounds[i], bounds[i + 1]
        pieces = []
        for j, (name, _) in enumerate(items):
            a, b = max(lo, int(starts[j])), min(hi, int(starts[j + 1]))
            if a < b:
                pieces.append(Piece(name, j, a - int(starts[j]), b - int(starts[j]), a - lo))
        buckets.append(Bucket(f"b{i}", i, i * num_shards // count, lo, hi, tuple(pieces)))
    return Plan(tuple(n for n, _ in items), tuple(s for _, s in items), tuple(buckets),
                num_shards)


def make_stage_plan(named_shapes: Iterable[tuple[str, Sequence[int]]],
                    stage_names: Sequence[Sequence[str]],
                    bucket_bytes: int = BUCKET_BYTES) -> Plan:
    """The plan of a pipeline whose stages are data parallel: shard s holds the buckets of
    stage s's parameters (`stage_names[s]`), so each stage's replicas average through their
    own shard. A parameter that more than one stage holds (a tied embedding) is in each of
    their shards, in buckets of its own: each shard steps its copy with the same gradient,
    and a stage can leave that bucket out where it must count the parameter once (the
    global gradient norm). Pieces index the parameters in model order, as `make_plan`'s."""
    items = [(str(n), tuple(int(d) for d in s)) for n, s in named_shapes]
    index = {name: j for j, (name, _) in enumerate(items)}
    holders: dict[str, int] = {}
    for names in stage_names:
        for name in names:
            if name not in index:
                raise ConfigError(f"stage plan: no parameter {name!r} in the model")
            holders[name] = holders.get(name, 0) + 1
    missing = [name for name, _ in items if name not in holders]
    if missing:
        raise ConfigError(f"stage plan: parameter(s) {missing} belong to no stage")
    buckets: list[Bucket] = []
    for shard, names in enumerate(stage_names):
        shared = [n for n in names if holders[n] > 1]
        own = [n for n in names if holders[n] == 1]
        for group in [[n] for n in shared] + ([own] if own else []):
            sub = make_plan(((n, items[index[n]][1]) for n in group), 1, bucket_bytes)
            for b in sub.buckets:
                pieces = tuple(Piece(p.name, index[p.name], p.start, p.stop, p.offset)
                               for p in b.pieces)
                at = buckets[-1].stop if buckets else 0
                buckets.append(Bucket(f"b{len(buckets)}", len(buckets), shard, at,
                                      at + b.size, pieces))
    return Plan(tuple(n for n, _ in items), tuple(s for _, s in items), tuple(buckets),
                len(stage_names))


def job_plan(named_shapes: Iterable[tuple[str, Sequence[int]]], num_shards: int,
             bucket_bytes: int = BUCKET_BYTES,
             stage_names: Sequence[Sequence[str]] | None = None) -> Plan:
    """A job's plan: `num_shards` ranges of the flat parameters, or with `stage_names` a
    data-parallel pipeline's shard per stage (`make_stage_plan`)."""
    if stage_names is not None:
        return make_stage_plan(named_shapes, stage_names, bucket_bytes)
    return make_plan(named_shapes, num_shards, bucket_bytes)


def plan_for(model: object, num_shards: int, bucket_bytes: int = BUCKET_BYTES,
             stage_names: Sequence[Sequence[str]] | None = None) -> Plan:
    """`job_plan` of a module's parameters (named_parameters order)."""
    named = ((n, p.shape) for n, p in model.named_parameters())  # type: ignore[attr-defined]
    return job_plan(named, num_shards, bucket_bytes, stage_names)


def pack(bucket: Bucket, arrays: Sequence[np.ndarray] | Mapping[int, np.ndarray],
         out: np.ndarray) -> np.ndarray:
    """Copy the bucket's pieces of `arrays` (indexed like the plan's parameters: a list of
    all, or a mapping of at least those the bucket holds) into `out`."""
    for p in bucket.pieces:
        out[p.offset:p.offset + p.size] = arrays[p.index].reshape(-1)[p.start:p.stop]
    return out


def pack_grads(bucket: Bucket, params: Sequence[Any], out: Any) -> Any:
    """Copy the gradients of the bucket's pieces of `params` (tensors, indexed like the
    plan's parameters) into `out`; a parameter without a gradient (the loss did not reach
    it) packs as zeros. Only the bucket's own parameters are read: mid-backward most others
    have no gradient yet."""
    for p in bucket.pieces:  # assigned through `out` itself: an MLX slice is a copy
        grad = params[p.index].grad
        if grad is None:
            out[p.offset:p.offset + p.size] = 0
        else:
            out[p.offset:p.offset + p.size] = grad.data.reshape(-1)[p.start:p.stop]
    return out


def unpack(bucket: Bucket, flat: np.ndarray, arrays: Sequence[np.ndarray]) -> None:
    """Write a bucket's flat values back into the parameters' arrays (in place)."""
    if flat.shape != (bucket.size,):
        raise ShapeError(f"bucket {bucket.key}: expected {bucket.size} values, got shape "
                         f"{flat.shape}")
    for p in bucket.pieces:
        target = arrays[p.index]
        values = target.reshape(-1)
        values[p.start:p.stop] = flat[p.offset:p.offset + p.size]
        if values.base is None:  # a copy, not a view (MLX): put it back
            target[...] = values.reshape(target.shape)


def split(plan: Plan, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{bucket key: flat float32 values} of a {parameter name: array} state."""
    arrays = _ordered(plan, state)
    return {b.key: pack(b, arrays, np.empty(b.size, np.float32)) for b in plan.buckets}


def join(plan: Plan, flats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `split`: {parameter name: array of its shape} from every bucket."""
    missing = [b.key for b in plan.buckets if b.key not in flats]
    if missing:
        raise ShapeError(f"join: missing bucket(s) {', '.join(missing)}")
    arrays = [np.empty(s, np.float32) for s in plan.shapes]
    for b in plan.buckets:
        unpack(b, np.asarray(flats[b.key]), arrays)
    return dict(zip(plan.names, arrays))


def _ordered(plan: Plan, state: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    out = []
    for name, shape in zip(plan.names, plan.shapes):
        if name not in state:
            raise ShapeError(f"split: no parameter {name!r} in the state")
        arr = np.asarray(state[name])
        if arr.shape != shape:
            raise ShapeError(f"split: parameter {name!r} has shape {arr.shape}, the plan "
                             f"expects {shape}")
        out.append(np.ascontiguousarray(arr))
    return out
