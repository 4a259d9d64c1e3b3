"""Backward over random graphs of views, broadcasts, joins and reuse, run once and several
times, against PyTorch (or, without it, central differences of narun's own forward).

The engine adds gradients in place only into buffers it knows nobody else holds. Getting
that wrong corrupts gradients silently, and only in particular graphs: when a buffer added
into a leaf is freed and the next view takes its place. Random programs find such graphs;
`test_a_freed_buffer_never_makes_a_view_writable` is one that once did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import narun

try:
    import torch
except ImportError:  # the oracle is optional: central differences stand in for it
    torch = None

SHAPES = [(4, 6), (1, 6), (4, 1), (6,), (2, 3, 4)]


class Lib:
    """The few calls whose spelling differs between narun and torch."""

    def __init__(self, name: str) -> None:
        self.name = name

    def leaf(self, value: np.ndarray) -> Any:
        if self.name == "torch":
            return torch.tensor(value, dtype=torch.float64, requires_grad=True)
        return narun.tensor(value, dtype="float64", requires_grad=True)

    def const(self, value: np.ndarray) -> Any:
        if self.name == "torch":
            return torch.tensor(value, dtype=torch.float64)
        return narun.tensor(value, dtype="float64")

    def cat(self, tensors: list[Any], dim: int) -> Any:
        return (torch.cat if self.name == "torch" else narun.cat)(tensors, dim)

    def index(self, idx: np.ndarray) -> Any:
        return torch.tensor(idx) if self.name == "torch" else idx


def _fits(u: Any, shape: tuple[int, ...]) -> Any:
    """`u` made to combine with a tensor of `shape`: as is when it broadcasts, reshaped when
    the sizes match, else reduced to a scalar (which broadcasts to anything)."""
    try:
        if np.broadcast_shapes(tuple(u.shape), shape) == shape:
            return u
    except ValueError:
        pass
    if int(np.prod(u.shape)) == int(np.prod(shape)):
        return u.reshape(shape)
    return u.sum()


def _unary(rng: np.random.Generator, shape: tuple[int, ...]) -> list[tuple[str, Any]]:
    """The unary ops that apply to a tensor of `shape`, each with its drawn argument."""
    n = len(shape)
    ops: list[tuple[str, Any]] = [("flat_roundtrip", None), ("scale", float(rng.normal())),
                                  ("tanh", None), ("neg", None), ("contiguous", None),
                                  ("cat_self", int(rng.integers(n))) if n else ("neg", None)]
    if n >= 2:
        ops += [("mT", None), ("T", None), ("permute", tuple(rng.permutation(n)))]
    if n and shape[0] > 1:
        ops += [("slice", None), ("split", None),
                ("gather", rng.integers(0, shape[0], size=shape[0] + 1))]
    if n and shape[-1] > 1:
        ops += [("stride", None), ("sum_keep", None)]
    if n <= 2:
        ops += [("expand", int(rng.integers(2, 4)))]
    return ops


def _apply(lib: Lib, op: str, arg: Any, t: Any) -> Any:
    table: dict[str, Callable[[], Any]] = {
        "flat_roundtrip": lambda: t.reshape(-1).reshape(tuple(t.shape)),
        "scale": lambda: t * arg,
        "tanh": lambda: t.tanh(),
        "neg": lambda: -t,
        "contiguous": lambda: t.contiguous(),
        "cat_self": lambda: lib.cat([t, t], arg),
        "mT": lambda: t.transpose(-2, -1),
        "T": lambda: t.permute(*reversed(range(len(t.shape)))),
        "permute": lambda: t.permute(*arg),
        "slice": lambda: t[1:],
        "split": lambda: t.split(1, 0)[0],
        "gather": lambda: t[lib.index(arg)],
        "stride": lambda: t[..., ::2],
        "sum_keep": lambda: t.sum(dim=-1, keepdim=True),
        "expand": lambda: t.unsqueeze(0).expand(arg, *t.shape),
    }
    return table[op]()


def random_program(rng: np.random.Generator) -> tuple[list[np.ndarray], list[tuple]]:
    """Leaf values and a straight-line program over a pool that starts as the leaves:
    ("un", op, arg, i) appends op(pool[i]); ("bin", op, i, j) appends pool[i] op pool[j]
    (pool[j] fitted to pool[i]'s shape); ("loss", picks, seeds) ends it."""
    leaves = [rng.normal(size=SHAPES[k]) for k in rng.choice(len(SHAPES), 3)]
    shapes = [tuple(v.shape) for v in leaves]
    program: list[tuple] = []
    for _ in range(int(rng.integers(4, 14))):
        # favour recent values (long chains of views) but keep reusing old ones too
        i = int(len(shapes) - 1 - min(rng.geometric(0.4) - 1, len(shapes) - 1))
        if rng.random() < 0.6:
            ops = _unary(rng, shapes[i])
            op, arg = ops[rng.integers(len(ops))]
            program.append(("un", op, arg, i))
            shapes.append(_shape_after(op, arg, shapes[i]))
        else:
            j = int(rng.integers(len(shapes)))
            program.append(("bin", str(rng.choice(["add", "mul", "sub"])), i, j))
            shapes.append(shapes[i])
    picks = sorted({len(shapes) - 1, *rng.choice(len(shapes), 2)})
    program.append(("loss", picks, [int(rng.integers(1 << 30)) for _ in picks]))
    return leaves, program


def _shape_after(op: str, arg: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    with narun.no_grad():
        return tuple(_apply(Lib("narun"), op, arg, narun.zeros(*shape)).shape)


def run(lib: Lib, program: list[tuple], leaves: list[Any], retain: set[int] = frozenset()
        ) -> tuple[Any, list[Any]]:
    """The loss of `program` on `leaves`, and the pool (retain_grad on the indices given)."""
    pool = list(leaves)
    for ins in program:
        if ins[0] == "un":
            _, op, arg, i = ins
            pool.append(_apply(lib, op, arg, pool[i]))
        elif ins[0] == "bin":
            _, op, i, j = ins
            a, b = pool[i], _fits(pool[j], tuple(pool[i].shape))
            pool.append(a + b if op == "add" else a * b if op == "mul" else a - b)
        else:
            _, picks, seeds = ins
            for k in retain:
                if k >= len(leaves):
                    pool[k].retain_grad()
            total = None
            for k, seed in zip(picks, seeds):
                w = lib.const(np.random.default_rng(seed).normal(size=tuple(pool[k].shape)))
                term = (pool[k] * w).sum()
                total = term if total is None else total + term
            return total, pool
    raise AssertionError("a program ends with its loss")


def _grad(t: Any) -> np.ndarray | None:
    if t.grad is None:
        return None
    return t.grad.detach().numpy() if torch is not None and isinstance(t, torch.Tensor) \
        else t.grad.numpy()


def expected_grads(program: list[tuple], values: list[np.ndarray]) -> list[np.ndarray]:
    """d loss / d leaf, once: from torch, or central differences of narun's forward."""
    if torch is not None:
        lib = Lib("torch")
        leaves = [lib.leaf(v) for v in values]
        loss, _ = run(lib, program, leaves)
        loss.backward()
        return [np.zeros(v.shape) if g is None else g for v, g in
                zip(values, (_grad(t) for t in leaves))]
    lib, eps = Lib("narun"), 1e-6
    out = []
    with narun.no_grad():
        for k, v in enumerate(values):
            g = np.zeros(v.size)
            for e in range(v.size):
                plus, minus = [x.copy() for x in values], [x.copy() for x in values]
                plus[k].reshape(-1)[e] += eps
                minus[k].reshape(-1)[e] -= eps
                f = [run(lib, program, [lib.const(x) for x in xs])[0].item()
                     for xs in (plus, minus)]
                g[e] = (f[0] - f[1]) / (2 * eps)
            out.append(g.reshape(v.shape))
    return out


@pytest.mark.parametrize("seed", range(300))
def test_random_graph_gradients_accumulate_exactly(seed):
    """Each graph built and backpropagated 1-3 times (fresh graph each time, gradients
    accumulating), then once more with retain_graph and two backward calls."""
    rng = np.random.default_rng(seed)
    values, program = random_program(rng)
    once = expected_grads(program, values)
    lib = Lib("narun")
    leaves = [lib.leaf(v) for v in values]
    repeats = int(rng.integers(1, 4))
    for _ in range(repeats):
        loss, _ = run(lib, program, leaves)
        loss.backward()
    for k, (t, g) in enumerate(zip(leaves, once)):
        got = np.zeros(g.shape) if t.grad is None else t.grad.numpy()
        np.testing.assert_allclose(got, repeats * g, rtol=1e-7, atol=1e-9,
                                   err_msg=f"leaf {k} after {repeats} backward(s)")
    for t in leaves:
        t.zero_grad()
    loss, pool = run(lib, program, leaves)
    loss.backward(retain_graph=True)
    loss.backward()
    for k, (t, g) in enumerate(zip(leaves, once)):
        got = np.zeros(g.shape) if t.grad is None else t.grad.numpy()
        np.testing.assert_allclose(got, 2 * g, rtol=1e-7, atol=1e-9,
                                   err_msg=f"leaf {k} after backward twice on one graph")


@pytest.mark.skipif(torch is None, reason="torch is the oracle for retained non-leaf grads")
@pytest.mark.parametrize("seed", range(40))
def test_retained_grads_of_intermediates_match_torch(seed):
    rng = np.random.default_rng(1000 + seed)
    values, program = random_program(rng)
    n = len(values)
    retain = {int(k) for k in rng.choice(range(n, n + len(program) - 1), 2)}
    results = []
    for name in ("narun", "torch"):
        lib = Lib(name)
        loss, pool = run(lib, program, [lib.leaf(v) for v in values], retain)
        loss.backward()
        results.append([_grad(pool[k]) for k in sorted(retain)])
    for k, (got, want) in zip(sorted(retain), zip(*results)):
        if want is None:
            assert got is None, f"pool[{k}]"
        else:
            np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9, err_msg=f"pool[{k}]")


def test_a_freed_buffer_never_makes_a_view_writable():
    """Found by review: a leaf's summed gradient was freed, its id stayed marked as the
    engine's own, the next reshape/transpose view got that id, and the engine added into
    the view, writing into another tensor's gradient (a.grad came out 0.03, not 0.02)."""
    a, b, c = (narun.tensor(np.zeros((4, 6)), requires_grad=True) for _ in range(3))
    for _ in range(2):
        x = a.reshape(24).reshape(4, 6)
        y = c.reshape(24).reshape(4, 6)
        z = (y.T.T + b).T.T
        ((x + y + z + b) * 0.01).sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), np.full((4, 6), 0.02))
    np.testing.assert_allclose(b.grad.numpy(), np.full((4, 6), 0.04))
    np.testing.assert_allclose(c.grad.numpy(), np.full((4, 6), 0.04))
