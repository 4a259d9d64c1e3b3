"""The serving engine's slot cache: one ragged step's attention against a NumPy reference,
for each way the decode tokens are batched (views of slots 0 .. hi-1, with or without free
slots among them, or the running slots gathered; the longest row's positions or, once it
fills 3/4 of the cache, all of them) and for prompt chunks beside them."""

import numpy as np
import pytest

import narun
from narun.serve.kvcache import SlotKVCache, StepPlan, _Decode

H, D, MAX_LEN, SLOTS = 2, 4, 16, 8


def reference(K, V, q, slot, pos):
    """Softmax attention of one query q (H, D) at `pos` over keys 0 .. pos of `slot`."""
    k, v = K[slot, :, :pos + 1], V[slot, :, :pos + 1]  # (H, pos + 1, D)
    s = np.einsum("hd,hjd->hj", q, k) / np.sqrt(D)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hj,hjd->hd", p, v)


@pytest.mark.parametrize("decode,chunks,hi,length,bias", [
    # running slots 0 .. 2 at their own lengths, beside two prompt chunks
    ({0: 5, 1: 9, 2: 3}, [(4, 0, 3), (5, 2, 4)], 3, 10, True),
    # a free slot (1) below hi, all rows the same length: no mask
    ({0: 7, 2: 7, 3: 7}, [], 4, 8, False),
    # one sequence left in a high slot: gathered, not 6 rows of work for 1
    ({5: 10}, [(0, 0, 1)], 0, 11, False),
    # the longest row fills 3/4 of the cache: all of it is read, the rest masked
    ({1: 3, 7: 12}, [], 0, MAX_LEN, True),
    # two of six: still views, the free rows cost less than a copy
    ({1: 3, 5: 12}, [], 6, MAX_LEN, True),
    # every row at 14 of 16: read whole, the two stale positions masked
    ({0: 13, 1: 13}, [(2, 0, 5)], 2, MAX_LEN, True),
    ({0: 15, 1: 15}, [], 2, MAX_LEN, False),
    # slots 0 .. 2 but not in slot order: each row still gets its own slot's keys
    ({2: 4, 0: 6, 1: 4}, [(3, 0, 2)], 3, 7, True),
])
def test_a_ragged_step_attends_as_each_sequence_alone(decode, chunks, hi, length, bias):
    rng = np.random.default_rng(0)
    cache = SlotKVCache(1, SLOTS, H, MAX_LEN, D, narun.tensor(np.zeros(1)))
    # stale keys and values everywhere: nothing past a sequence's position may leak in
    cache.k[0][...] = rng.standard_normal(cache.k[0].shape)
    cache.v[0][...] = rng.standard_normal(cache.v[0].shape)
    plan = StepPlan(list(decode), list(decode.values()), chunks)
    N = plan.n_tokens
    q, k, v = (rng.standard_normal((1, N, H, D)) for _ in range(3))
    K, V = cache.k[0].copy(), cache.v[0].copy()
    slots, positions = plan.slots(), plan.positions()
    K[slots, :, positions], V[slots, :, positions] = k[0], v[0]

    d = _Decode.of(plan, np, np.float64, MAX_LEN)
    assert (d.hi, d.length, d.bias is not None) == (hi, length, bias), \
        "the path this case is meant to take"
    y = cache.layers(plan)[0].attend_arrays(q, k, v)

    assert y.shape == (1, N, H, D)
    for t in range(N):
        np.testing.assert_allclose(y[0, t], reference(K, V, q[0, t], slots[t], positions[t]),
                                   rtol=1e-12, atol=1e-12, err_msg=f"token {t}")
    np.testing.assert_array_equal(cache.k[0], K)  # keys and values written where they go
    np.testing.assert_array_equal(cache.v[0], V)
