"""The serving engine's KV cache: one preallocated slot per running sequence, and the
attention of one ragged step over it.

A step's tokens travel through the model as one row (1, N): first one token for each
decoding sequence (each at its own position, in its own slot), then the prompt chunks of
the sequences being prefilled. Every layer writes each token's key and value at
(slot, position), then:

- the decode tokens attend together, in one batched call over the slots' caches (views
  of slots 0 .. hi-1, or the running slots gathered when most of those are free; the first
  `length` positions of each), each masked to its own length;
- each prompt chunk attends causally over its own slot, as `KVCache` does for one sequence.

A slot's stale keys past its length are never seen (the length mask hides them), so a slot
is reused without clearing it. Everything runs on raw arrays (`GPT.forward_at`'s
`attend_arrays` protocol): no Tensor wrapping, no graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from narun.models._inference import attend_after_arrays
from narun.nn.functional._attention import softmax_scores_
from narun.tensor import Tensor


@dataclass
class StepPlan:
    """Where each token of one step goes: decode tokens first, then prompt chunks."""

    decode_slots: list[int] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)
    chunks: list[tuple[int, int, int]] = field(default_factory=list)  # (slot, start, n)

    @property
    def n_tokens(self) -> int:
        return len(self.decode_slots) + sum(n for _, _, n in self.chunks)

    def positions(self) -> np.ndarray:
        parts = [np.asarray(self.decode_positions, dtype=np.int64)]
        parts += [np.arange(start, start + n) for _, start, n in self.chunks]
        return np.concatenate(parts)

    def slots(self) -> np.ndarray:
        parts = [np.asarray(self.decode_slots, dtype=np.int64)]
        parts += [np.full(n, slot, dtype=np.int64) for slot, _, n in self.chunks]
        return np.concatenate(parts)


class SlotKVCache:
    """Keys and values of `max_batch` sequences for every layer, each array
    (max_batch, n_head, max_len, head_dim) in the dtype and on the device of `like`."""

    def __init__(self, n_layer: int, max_batch: int, n_head: int, max_len: int,
                 head_dim: int, like: Tensor) -> None:
        shape = (max_batch, n_head, max_len, head_dim)
        xp = like.xp
        self.xp, self.device = xp, like.device
        self.k = [xp.zeros(shape, dtype=like.dtype) for _ in range(n_layer)]
        self.v = [xp.zeros(shape, dtype=like.dtype) for _ in range(n_layer)]

    def layers(self, plan: StepPlan) -> list[_LayerStep]:
        """One cache per layer for `GPT.forward_at`, each running `plan`'s attention."""
        xp = self.xp
        where = (xp.asarray(plan.slots()), slice(None), xp.asarray(plan.positions()))
        k = self.k[0]
        decode = _Decode.of(plan, xp, k.dtype, k.shape[2]) if plan.decode_slots else None
        return [_LayerStep(xp, self.device, self.k[i], self.v[i], where, decode, plan.chunks)
                for i in range(len(self.k))]


@dataclass
class _Decode:
    """How the step's n decode tokens attend, shared by every layer.

    Slots are given out lowest first, so the decoding slots are mostly 0 .. n-1: then the
    batched call runs on views of slots 0 .. hi-1 of the cache (no copy), and a free slot
    below hi only costs its row of work (its output is never read). When fewer than a third
    of slots 0 .. hi-1 decode, their caches are gathered instead: a copy reads and writes n
    rows before the call reads them again, 3n rows of traffic against hi.

    The calls read the first `length` positions of each (slot, head), and once the longest
    row fills 3/4 of the cache they read all of it, masking the rest: a block read whole
    leaves no gap before the next one, and the gapped reads of the prefix cost more than
    the extra quarter (32 slots x 4 heads x 32 dims, capacity 128, float32, 1 thread: q.k
    and p.v of 96 positions 200-280 us a layer, of all 128 positions 124-148 us)."""

    n: int
    slots: Any        # device index array (n,)
    hi: int           # padded: slots 0 .. hi-1 take part; gathered: 0
    length: int       # positions the calls read: the longest row's length, or the capacity
    bias: Any         # (rows, 1, 1, length) 0 / -inf past each row's length, or None
    in_order: bool    # slots are 0 .. n-1 in order: the rows are the decode tokens as they are

    @staticmethod
    def of(plan: StepPlan, xp: Any, dtype: Any, capacity: int) -> _Decode:
        slots = np.asarray(plan.decode_slots, dtype=np.int64)
        lengths = np.asarray(plan.decode_positions, dtype=np.int64) + 1
        n, hi, longest = len(slots), int(slots.max()) + 1, int(lengths.max())
        length = capacity if 4 * longest >= 3 * capacity else longest
        padded = hi <= 3 * n
        in_order = not padded or (hi == n and bool((slots == np.arange(n)).all()))
        bias = None
        if (lengths != length).any():
            row_lengths = lengths
            if padded:  # a free slot's row sees every position: finite, and never read
                row_lengths = np.full(hi, longest, dtype=np.int64)
                row_lengths[slots] = lengths
            visible = np.arange(length)[None, :] < row_lengths[:, None]
            bias = xp.asarray(np.where(visible, 0.0, -np.inf).astype(dtype)[:, None, None])
        return _Decode(n, xp.asarray(slots), hi if padded else 0, length, bias, in_order)


class _LayerStep:
    def __init__(self, xp: Any, device: str, k: Any, v: Any, where: tuple[Any, slice, Any],
                 decode: _Decode | None, chunks: list[tuple[int, int, int]]) -> None:
        self.xp, self.device = xp, device
        self.k, self.v, self.where, self.decode, self.chunks = k, v, where, decode, chunks

    def attend_arrays(self, q: Any, k: Any, v: Any) -> Any:
        """q, k, v (1, N, H, D) for the step's N tokens -> attention output (1, N, H, D)."""
        K, V, xp = self.k, self.v, self.xp
        K[self.where] = k[0]  # (N, H, D) at (slot, position)
        V[self.where] = v[0]
        _, N, H, D = q.shape
        y = xp.empty((1, N, H, D), dtype=q.dtype)
        n = 0
        if self.decode is not None:
            d = self.decode
            n = d.n
            qd = q[0, :n, :, None]  # (n, H, 1, D)
            if not d.hi:
                Ks, Vs, Q = K[d.slots, :, :d.length], V[d.slots, :, :d.length], qd
            else:
                Ks, Vs, Q = K[:d.hi, :, :d.length], V[:d.hi, :, :d.length], qd
                if not d.in_order:  # row r is slot r's query (zeros for a free slot)
                    Q = xp.zeros((d.hi, H, 1, D), dtype=q.dtype)
                    Q[d.slots] = qd
            s = xp.matmul(Q * (1.0 / math.sqrt(D)), Ks.swapaxes(-1, -2))  # (rows, H, 1, length)
            if d.bias is not None:
                s += d.bias
            out = xp.matmul(softmax_scores_(xp, s, False), Vs)  # (rows, H, 1, D)
            y[0, :n] = out[:, :, 0] if d.in_order else out[d.slots, :, 0]
        for slot, start, size in self.chunks:
            end = start + size
            out = attend_after_arrays(xp, q[0, n:n + size].swapaxes(0, 1), K[slot, :, :end],
                                      V[slot, :, :end], self.device)  # (H, size, D)
            y[0, n:n + size] = out.swapaxes(0, 1)
            n += size
        return y
