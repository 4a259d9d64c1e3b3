"""embedding: a row gather forward, a segmented row sum backward (no np.add.at).

The weight gradient sums the upstream rows of equal indices. Measured in one run for 2048
indices into a (V, 256) float32 table, backward only, one core of this 2-core EPYC VM (ms):

    method                     V=256 uniform  V=256 byte text  V=50257 uniform  V=50257 zipf
    np.add.at                       5.5             5.5             12.4            13.0
    sort + np.add.reduceat          1.8             1.3             12.3             9.5
    np.bincount per column          2.5             2.9             78.6            82.7
    one-hot (V, M) @ g              3.3             3.4               -               -
    sort + rank layers              0.7             8.4              9.2            11.8
    sort + pairwise doubling        1.1             1.1             10.0             9.4
    (torch forward + backward       0.3             0.4             39.1            37.4)

Pairwise doubling is used: the sorted rows of one index are summed as a tree, halving the
live rows each step, so it costs about two passes over the rows plus log2(largest repeat
count) small steps whatever the distribution (rank layers loop once per repeat, which byte
text, with a few very frequent bytes, makes slow). With V=50257 most of the time is filling
the dense (V, D) gradient itself.
"""

from __future__ import annotations

from typing import Any

from narun.errors import ConfigError, ShapeError
from narun.nn.functional._common import raw, require_float, require_int
from narun.tensor._tensor import Tensor, make


def _row_sums(xp: Any, index: Any, rows: Any, n: int) -> Any:
    """out[v] = sum of rows[i] over i with index[i] == v, as a dense (n, D) array."""
    out = xp.zeros((n, rows.shape[1]), dtype=rows.dtype)
    M = index.shape[0]
    if M == 0:
        return out
    order = xp.argsort(index)
    keys = index[order]
    acc = xp.take(rows, order, axis=0)
    first = xp.empty(M, dtype=bool)
    first[0] = True
    tail = first[1:]
    xp.not_equal(keys[1:], keys[:-1], out=tail)
    if tail.base is None:  # a copy, not a view (MLX): put it in place
        first[1:] = tail
    starts = xp.flatnonzero(first)
    lens = xp.diff(xp.append(starts, M))
    rank = xp.arange(M) - xp.repeat(starts, lens)  # position within its run of equal keys
    room = xp.repeat(lens, lens) - rank  # rows left in the run from here
    stride, longest = 1, int(lens.max())
    while stride < longest:
        # Runs' rows at ranks 0, 2s, 4s, ... take in the row s after them (if in the run).
        sel = xp.flatnonzero((rank % (2 * stride) == 0) & (room > stride))
        acc[sel] += acc[sel + stride]
        stride *= 2
    out[keys[starts]] = acc[starts]
    return out


def embedding(input: Any, weight: Tensor, padding_idx: int | None = None) -> Tensor:  # noqa: A002
    """Rows of `weight` (V, D) at integer `input` indices: shape input.shape + (D,).

    As torch.nn.functional.embedding: the row at `padding_idx` gets no gradient.
    """
    op = "embedding"
    require_float(op, "weight", weight)
    if weight.ndim != 2:
        raise ShapeError(f"{op}: weight must be 2-d (num_embeddings, dim), got {weight.shape}")
    idx = raw(op, "input", input, weight)
    require_int(op, "input", idx)
    V, D = weight.shape
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= V):
        bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
        raise IndexError(f"{op}: index {bad} is out of range for {V} embeddings")
    if padding_idx is not None:
        if not -V <= padding_idx < V:
            raise ConfigError(f"{op}: padding_idx {padding_idx} is out of range for {V} "
                              "embeddings")
        padding_idx %= V
    xp = weight.xp
    out = xp.take(weight.data, idx, axis=0)

    def backward(g: Any) -> tuple[Any]:
        gw = _row_sums(xp, idx.reshape(-1), g.reshape(-1, D), V)
        if padding_idx is not None:
            gw[padding_idx] = 0
        return (gw,)

    return make(out, (weight,), backward, "embedding")
