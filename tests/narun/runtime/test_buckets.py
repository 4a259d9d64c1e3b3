"""Bucketing: every parameter is split into buckets and reassembled exactly (no processes)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from narun.errors import ConfigError, ShapeError
from narun.runtime.buckets import join, make_plan, make_stage_plan, pack, pack_grads, split, unpack
from narun.tensor._tensor import Tensor

SHAPES = [("emb", (50, 8)), ("w1", (8, 16)), ("b1", (16,)), ("scale", ()), ("w2", (16, 3)),
          ("b2", (3,))]


def random_state(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes}


@pytest.mark.parametrize("shards, bucket_bytes", [(1, 4 << 20), (2, 256), (3, 100), (4, 4),
                                                  (7, 333)])
def test_split_join_is_exact(shards, bucket_bytes):
    state = random_state(SHAPES)
    plan = make_plan([(n, s) for n, s in SHAPES], shards, bucket_bytes)
    back = join(plan, split(plan, state))
    assert list(back) == [n for n, _ in SHAPES]
    for name, value in state.items():
        assert back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)


@pytest.mark.parametrize("shards, bucket_bytes", [(2, 256), (3, 100), (5, 64)])
def test_plan_covers_the_flat_vector_once_in_shard_key_ranges(shards, bucket_bytes):
    plan = make_plan(SHAPES, shards, bucket_bytes)
    total = sum(math.prod(s) for _, s in SHAPES)
    # buckets tile [0, total) in order, each about bucket_bytes
    assert plan.buckets[0].start == 0 and plan.buckets[-1].stop == total
    for a, b in zip(plan.buckets, plan.buckets[1:]):
        assert a.stop == b.start
    sizes = [b.size for b in plan.buckets]
    assert max(sizes) - min(sizes) <= 1
    assert max(sizes) * 4 <= bucket_bytes or len(plan.buckets) == shards
    # shards own contiguous, non-empty runs of buckets, in order
    owners = [b.shard for b in plan.buckets]
    assert owners == sorted(owners) and set(owners) == set(range(shards))
    # every element of every parameter is in exactly one piece
    seen = {n: np.zeros(math.prod(s), int) for n, s in SHAPES}
    for b in plan.buckets:
        assert sum(p.size for p in b.pieces) == b.size
        for p in b.pieces:
            seen[p.name][p.start:p.stop] += 1
    assert all((v == 1).all() for v in seen.values())


def test_a_tensor_larger_than_a_bucket_is_split_across_shards():
    plan = make_plan([("big", (64, 64)), ("small", (4,))], 4, 4096)
    holders = {b.shard for b in plan.buckets for p in b.pieces if p.name == "big"}
    assert holders == {0, 1, 2, 3}


def test_pack_unpack_round_trip_into_parameter_arrays():
    state = random_state(SHAPES, seed=1)
    plan = make_plan(SHAPES, 3, 64)
    arrays = [np.zeros(s, np.float32) for _, s in SHAPES]
    source = list(state.values())
    for b in plan.buckets:
        buf = pack(b, source, np.empty(b.size, np.float32))
        np.testing.assert_array_equal(
            buf, np.concatenate([a.reshape(-1) for a in source])[b.start:b.stop])
        unpack(b, buf, arrays)
    for a, s in zip(arrays, source):
        np.testing.assert_array_equal(a, s)


def test_pack_grads_packs_each_gradient_and_zeros_where_there_is_none():
    state = random_state(SHAPES, seed=2)
    plan = make_plan(SHAPES, 3, 64)
    params = []
    for i, a in enumerate(state.values()):
        t = Tensor._wrap(np.zeros_like(a))
        t.grad = None if i == 1 else Tensor._wrap(a)  # the loss did not reach parameter 1
        params.append(t)
    grads = [np.zeros_like(a) if i == 1 else a for i, a in enumerate(state.values())]
    flat = np.concatenate([g.reshape(-1) for g in grads])
    for b in plan.buckets:
        buf = np.full(b.size, np.nan, np.float32)  # stale values must not survive
        np.testing.assert_array_equal(pack_grads(b, params, buf), flat[b.start:b.stop])


def test_errors_name_what_is_wrong():
    with pytest.raises(ConfigError, match="ps_shards"):
        make_plan([("w", (2,))], 3)
    plan = make_plan(SHAPES, 2, 256)
    with pytest.raises(ShapeError, match="'w1' has shape"):
        split(plan, {**random_state(SHAPES), "w1": np.zeros((3, 3), np.float32)})
    with pytest.raises(ShapeError, match="missing bucket"):
        join(plan, {})
    with pytest.raises(ShapeError, match="expected"):
        unpack(plan.buckets[0], np.zeros(3, np.float32), [np.zeros(s) for _, s in SHAPES])


def test_a_stage_plan_gives_each_stage_its_own_shard_and_the_tied_weight_to_both_ends():
    # three stages; "emb" is held by the first and the last (a tied embedding)
    stages = [["emb", "w1", "b1"], ["scale"], ["w2", "b2", "emb"]]
    plan = make_stage_plan(SHAPES, stages, bucket_bytes=40)
    assert plan.names == tuple(n for n, _ in SHAPES) and plan.num_shards == 3
    index = {n: j for j, (n, _) in enumerate(SHAPES)}
    for s, held in enumerate(stages):
        pieces = [p for b in plan.shard_buckets(s) for p in b.pieces]
        assert {p.name for p in pieces} == set(held)
        assert all(p.index == index[p.name] for p in pieces)  # model order, as make_plan's
        for name in held:  # every element of each parameter the stage holds, once
            covered = sorted((p.start, p.stop) for p in pieces if p.name == name)
            assert covered[0][0] == 0 and covered[-1][1] == math.prod(dict(SHAPES)[name])
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    # the tied weight's buckets hold nothing else, so a stage can leave them out of a norm
    assert all({p.name for p in b.pieces} == {"emb"} or "emb" not in {p.name for p in b.pieces}
               for b in plan.buckets)
    state = random_state(SHAPES)
    arrays = [state[n] for n, _ in SHAPES]
    back = join(plan, {b.key: pack(b, arrays, np.empty(b.size, np.float32))
                       for b in plan.buckets})
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value)
    with pytest.raises(ConfigError, match="belong to no stage"):
        make_stage_plan(SHAPES, stages[:2])
    with pytest.raises(ConfigError, match="no parameter 'nope'"):
        make_stage_plan(SHAPES, [["nope"]])
