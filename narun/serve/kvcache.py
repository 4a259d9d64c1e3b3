"""The serving engine's KV cache: one preallocated slot per running sequence, and the
attention of one ragged step over it.

A step's tokens travel through the model as one row (1, N): first one token for each
decoding sequence (each at its own position, in its own slot), then the prompt chunks of
the sequences being prefilled. Every layer writes each token's key and value at
(slot, position), then:

- the decode tokens attend together, in one batched call over the slots' caches
  (slots 0 .. hi-1, the first `length` positions of each), each masked to its own length;
- each prompt chunk attends causally over its own slot, as `KVCache` does for one sequence.

A slot's stale keys past its length are never seen (the length mask hides them), so a slot
is reused without clearing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from narun.models.gpt import attend_after
from narun.nn import functional as F
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
        self.xp = xp
        self.k = [xp.zeros(shape, dtype=like.dtype) for _ in range(n_layer)]
        self.v = [xp.zeros(shape, dtype=like.dtype) for _ in range(n_layer)]

    def layers(self, plan: StepPlan) -> list[_LayerStep]:
        """One cache per layer for `GPT.forward_at`, each running `plan`'s attention."""
        xp = self.xp
        slots, positions = plan.slots(), plan.positions()
        where = (xp.asarray(slots), slice(None), xp.asarray(positions))
        decode = None
        if plan.decode_slots:
            hi = max(plan.decode_slots) + 1
            length = max(plan.decode_positions) + 1
            # Slots below hi that are not decoding keep length 0: fully masked, their rows
            # come out as zeros and are never read.
            lengths = np.zeros(hi, dtype=np.int64)
            lengths[plan.decode_slots] = np.asarray(plan.decode_positions) + 1
            mask = np.arange(length)[None, :] < lengths[:, None]
            decode = _Decode(xp.asarray(np.asarray(plan.decode_slots)), hi, length,
                             Tensor._wrap(xp.asarray(mask[:, None, None, :])))
        return [_LayerStep(self.k[i], self.v[i], where, decode, plan.chunks)
                for i in range(len(self.k))]


@dataclass
class _Decode:
    slots: Any      # device index array (n,)
    hi: int         # slots 0 .. hi-1 take part in the batched call
    length: int     # the longest decode row's length after this step's token
    mask: Tensor    # (hi, 1, 1, length): True where a row may attend


class _LayerStep:
    def __init__(self, k: Any, v: Any, where: tuple[Any, slice, Any], decode: _Decode | None,
                 chunks: list[tuple[int, int, int]]) -> None:
        self.k, self.v, self.where, self.decode, self.chunks = k, v, where, decode, chunks

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v (1, H, N, D) for the step's N tokens -> attention output (1, H, N, D)."""
        K, V = self.k, self.v
        xp = q.xp
        K[self.where] = k.data[0].swapaxes(0, 1)  # (N, H, D) at (slot, position)
        V[self.where] = v.data[0].swapaxes(0, 1)
        qd = q.data[0]  # (H, N, D)
        _, H, N, D = q.shape
        y = xp.empty((1, H, N, D), dtype=q.dtype)
        n = 0
        if self.decode is not None:
            d = self.decode
            n = len(d.slots)
            Q = xp.zeros((d.hi, H, 1, D), dtype=q.dtype)
            Q[d.slots, :, 0] = qd[:, :n].swapaxes(0, 1)
            out = F.scaled_dot_product_attention(
                Tensor._wrap(Q), Tensor._wrap(K[:d.hi, :, :d.length]),
                Tensor._wrap(V[:d.hi, :, :d.length]), attn_mask=d.mask)
            y[0, :, :n] = out.data[d.slots, :, 0].swapaxes(0, 1)
        for slot, start, size in self.chunks:
            end = start + size
            out = attend_after(Tensor._wrap(q.data[:, :, n:n + size]),
                               Tensor._wrap(K[slot:slot + 1, :, :end]),
                               Tensor._wrap(V[slot:slot + 1, :, :end]), start)
            y[:, :, n:n + size] = out.data
            n += size
        return Tensor._wrap(y)
