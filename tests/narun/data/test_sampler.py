import json

import numpy as np
import pytest

from narun.data import ShardedSampler, WindowSampler

N, B = 50, 12  # 4 full batches and a last one of 2


def epoch_batches(world_size, **kw):
    """Per step, the list of every rank's batch for one epoch."""
    samplers = [ShardedSampler(N, B, rank=r, world_size=world_size, **kw)
                for r in range(world_size)]
    return list(zip(*[list(s) for s in samplers]))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_every_index(world_size):
    steps = epoch_batches(world_size, seed=7)
    assert len(steps) == 5
    everything = np.concatenate([b for step in steps for b in step])
    assert len(everything) == N and sorted(everything.tolist()) == list(range(N))
    for step in steps[:-1]:  # full batches split evenly
        assert [len(b) for b in step] == [B // world_size] * world_size


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_global_batch_does_not_depend_on_world_size(world_size):
    single = epoch_batches(1, seed=7)
    for one, many in zip(single, epoch_batches(world_size, seed=7)):
        np.testing.assert_array_equal(one[0], np.concatenate(many))


@pytest.mark.parametrize("world_size", [1, 3])
def test_drop_last_skips_the_incomplete_batch(world_size):
    steps = epoch_batches(world_size, seed=1, drop_last=True)
    everything = np.concatenate([b for step in steps for b in step])
    assert len(steps) == N // B and len(everything) == len(set(everything.tolist())) == 48


def test_epochs_are_different_seeded_permutations():
    s = ShardedSampler(N, B, seed=3)
    e0, e1 = np.concatenate(list(s)), np.concatenate(list(s))
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(N))
    assert not np.array_equal(e0, e1)
    assert s.epoch == 2 and s.index == 0
    np.testing.assert_array_equal(e0, np.concatenate(list(ShardedSampler(N, B, seed=3))))
    assert not np.array_equal(e0, np.concatenate(list(ShardedSampler(N, B, seed=4))))
    np.testing.assert_array_equal(np.concatenate(list(ShardedSampler(N, B, shuffle=False))),
                                  np.arange(N))


@pytest.mark.parametrize("taken", [0, 3, 5, 7, 12])
def test_resume_from_state_continues_identically(taken):
    a = ShardedSampler(N, B, rank=1, world_size=2, seed=9)
    for _ in range(taken):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # as stored in a checkpoint manifest
    b = ShardedSampler(N, B, rank=1, world_size=2, seed=9)
    b.load_state_dict(state)
    for _ in range(13):  # crosses at least two epoch boundaries
        np.testing.assert_array_equal(a.next_batch(), b.next_batch())
    assert a.state_dict() == b.state_dict()


def test_resume_with_another_world_size_keeps_the_global_sequence():
    one = ShardedSampler(N, B, seed=2)
    for _ in range(3):
        one.next_batch()
    state = one.state_dict()
    two = [ShardedSampler(N, B, rank=r, world_size=2, seed=2) for r in range(2)]
    for s in two:
        s.load_state_dict(state)
    for _ in range(6):
        np.testing.assert_array_equal(one.next_batch(),
                                      np.concatenate([s.next_batch() for s in two]))


def test_iteration_resumes_mid_epoch():
    s = ShardedSampler(N, B, seed=0)
    full = list(ShardedSampler(N, B, seed=0))
    s.next_batch()
    s.next_batch()
    rest = list(s)
    assert len(rest) == 3
    for got, want in zip(rest, full[2:]):
        np.testing.assert_array_equal(got, want)


def test_bad_arguments_and_mismatched_state_are_refused():
    with pytest.raises(ValueError, match="batch_size=10 must be divisible by world_size=4"):
        ShardedSampler(N, 10, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank must be < world_size=2"):
        ShardedSampler(N, B, rank=2, world_size=2)
    s = ShardedSampler(N, B, seed=1)
    with pytest.raises(ValueError, match="saved seed=2 but this sampler has seed=1"):
        s.load_state_dict({**s.state_dict(), "seed": 2})


def test_window_sampler_is_a_pure_function_of_seed_and_step():
    single = WindowSampler(100, 8, seed=5)
    again = WindowSampler(100, 8, seed=5)
    np.testing.assert_array_equal(single.offsets(41), again.offsets(41))  # resume at step 41
    assert not np.array_equal(single.offsets(41), single.offsets(42))
    assert not np.array_equal(single.offsets(41), WindowSampler(100, 8, seed=6).offsets(41))
    ranks = [WindowSampler(100, 8, rank=r, world_size=4, seed=5) for r in range(4)]
    for step in (0, 1, 1000):
        parts = [s.offsets(step) for s in ranks]
        assert [len(p) for p in parts] == [2] * 4
        np.testing.assert_array_equal(np.concatenate(parts), single.offsets(step))
    seen = np.concatenate([WindowSampler(7, 4, seed=0).offsets(s) for s in range(200)])
    assert seen.min() == 0 and seen.max() == 6  # every window, none past the end


@pytest.mark.parametrize("batches", [0, 1, 3, 4, 9, 13])
def test_seek_lands_where_taking_that_many_batches_does(batches):
    walked = ShardedSampler(14, batch_size=4, rank=1, world_size=2, seed=3)
    for _ in range(batches):
        walked.next_batch()
    jumped = ShardedSampler(14, batch_size=4, rank=1, world_size=2, seed=3)
    jumped.seek(batches)
    for _ in range(6):  # across an epoch boundary (4 batches per epoch)
        np.testing.assert_array_equal(jumped.next_batch(), walked.next_batch())
