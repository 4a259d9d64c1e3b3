"""The autograd engine: graph nodes, grad mode, and backward.

Every op records one `Node`: its parent tensors and a `backward` closure that maps the
gradient of the op's output to one gradient (or None) per parent. The engine owns everything
else: topological order, the count check, reducing broadcast axes back to each parent's
shape, accumulation, and freeing each node's closure (and so the activations it captured) as
soon as it has run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from narun.errors import GradError

if TYPE_CHECKING:
    from narun.tensor._tensor import Tensor

BackwardFn = Callable[[Any], Sequence[Any]]


class _GradMode(threading.local):
    # Thread-local like PyTorch's: an executor thread's no_grad must not leak into the loop.
    enabled = True


_mode = _GradMode()


def is_grad_enabled() -> bool:
    return _mode.enabled


class _SetGradMode:
    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._prev: list[bool] = []

    def __enter__(self) -> None:
        self._prev.append(_mode.enabled)
        _mode.enabled = self._enabled

    def __exit__(self, *exc: object) -> None:
        _mode.enabled = self._prev.pop()

    def __call__(self, fn: Callable) -> Callable:
        import functools

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.__class__(self._enabled):
                return fn(*args, **kwargs)

        return wrapper


def no_grad() -> _SetGradMode:
    """Context manager (and decorator) that records no graph inside it."""
    return _SetGradMode(False)


def enable_grad() -> _SetGradMode:
    return _SetGradMode(True)


class Node:
    """How one tensor was made: the op's name, its parents, and its backward rule."""

    __slots__ = ("name", "parents", "backward")

    def __init__(self, name: str, parents: tuple[Tensor, ...], backward: BackwardFn) -> None:
        self.name = name
        self.parents = parents
        self.backward: BackwardFn | None = backward


def unbroadcast(grad: Any, shape: tuple[int, ...], op: str) -> Any:
    """Sum `grad` over the axes that broadcasting added or stretched, giving `shape`."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra < 0:
        raise GradError(f"{op}: backward returned a gradient of shape {grad.shape} "
                        f"for an input of shape {shape}")
    axes = tuple(range(extra)) + tuple(
        i + extra for i, n in enumerate(shape) if n == 1 and grad.shape[i + extra] != 1
    )
    out = grad.sum(axis=axes, keepdims=True) if axes else grad
    if extra:
        out = out.reshape(out.shape[extra:])
    if out.shape != shape:
        raise GradError(f"{op}: backward returned a gradient of shape {grad.shape}, "
                        f"which does not broadcast to the input's shape {shape}")
    return out


def _consumer_counts(root: Tensor) -> dict[int, int]:
    """For each tensor that needs a gradient: how many graph edges consume it."""
    counts: dict[int, int] = {id(root): 0}
    stack = [root]
    while stack:
        node = stack.pop()._node
        if node is None:
            continue
        for p in node.parents:
            if p.requires_grad:
                if id(p) not in counts:
                    counts[id(p)] = 0
                    stack.append(p)
                counts[id(p)] += 1
    return counts


class IndexGrad:
    """A gradient that is `value` at `data[index]` (a basic index) and zero elsewhere.

    Slicing and split return this instead of a zero-padded full array, so the engine writes
    every piece into one buffer per input rather than allocating a full array per piece.
    """

    __slots__ = ("index", "value")

    def __init__(self, index: Any, value: Any) -> None:
        self.index = index
        self.value = value


def backward(root: Tensor, grad: Any = None, retain_graph: bool = False) -> None:
    """Accumulate d(root)/d(leaf) into `.grad` of every leaf that requires grad."""
    from narun.tensor._tensor import Tensor

    if not root.requires_grad:
        raise GradError("backward() on a tensor that does not require grad: nothing it was "
                        "computed from has requires_grad=True (or it was made under no_grad)")
    xp = root.xp
    if grad is None:
        if root.data.size != 1:
            raise GradError(f"backward() without a gradient needs a one-element output, got "
                            f"shape {root.shape}; pass grad= of that shape")
        grad = xp.ones_like(root.data)
    else:
        grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=root.dtype)
        if grad.shape != root.shape:
            raise GradError(f"backward(): grad has shape {grad.shape}, output has {root.shape}")
    if root._node is None:  # backward() on a leaf: its gradient is `grad` itself
        _accumulate_leaf(root, grad, exclusive=False)
        return
    # The gradient pending for each tensor, keyed by the tensor (the graph keeps every tensor
    # alive until backward returns, so its id cannot be reused meanwhile), with whether the
    # array is exclusive: nobody else can hold it, so the engine may add into it in place and a
    # leaf may keep it without a copy. Exclusivity belongs to the pending entry, never to an
    # array's id: an array freed mid-backward gives its id to the next one allocated.
    grads: dict[int, tuple[Any, bool]] = {id(root): (grad, False)}
    # A tensor is ready once every op that consumed it has run its backward (counts reach
    # zero). Leaves are finished the moment they are ready, so their hooks fire as early as
    # possible: the last layer's gradients are final while the first layer's are computed.
    pending = _consumer_counts(root)
    ready = [root]
    while ready:
        t = ready.pop()
        g, exclusive = grads.pop(id(t), (None, False))
        node = t._node
        if g is not None and t._retains_grad:
            _accumulate_leaf(t, g, exclusive)
        if g is None:
            in_grads: Any = (None,) * len(node.parents)  # nothing flows, but unblock parents
            fresh: Any = in_grads
        else:
            if node.backward is None:
                raise GradError(f"backward through {node.name} a second time: its saved "
                                "values were freed; call backward(retain_graph=True) the "
                                "first time")
            in_grads = node.backward(g)
            if not retain_graph:
                node.backward = None
            if len(in_grads) != len(node.parents):
                raise GradError(f"{node.name}: backward returned {len(in_grads)} gradients "
                                f"for {len(node.parents)} inputs")
            fresh = _fresh(in_grads, g)
            del g
        for p, pg, new in zip(node.parents, in_grads, fresh):
            if not p.requires_grad:
                continue
            if pg is not None:
                _add_grad(grads, p, pg, new, node.name)
            pending[id(p)] -= 1
            if pending[id(p)]:
                continue
            if p._node is not None:
                ready.append(p)
            elif id(p) in grads:
                _accumulate_leaf(p, *grads.pop(id(p)))


def _fresh(in_grads: Sequence[Any], incoming: Any) -> list[bool]:
    """For each gradient a rule returned: is it an array nobody else holds? Not when it is
    the incoming gradient passed through (add), a view (reshape, transpose: its base is
    someone's), or one array returned for two inputs."""
    return [pg is not None and not isinstance(pg, IndexGrad) and pg is not incoming
            and pg.base is None and sum(q is pg for q in in_grads) == 1
            for pg in in_grads]


def _add_grad(grads: dict[int, tuple[Any, bool]], p: Tensor, pg: Any, exclusive: bool,
              op: str) -> None:
    """Add `pg` into the pending gradient of `p`, in place only into an exclusive buffer."""
    prev, prev_exclusive = grads.get(id(p), (None, False))
    if isinstance(pg, np.generic):  # NumPy's 0-d arithmetic gives scalars, which `+=` rebinds
        pg, exclusive = np.asarray(pg), True  # instead of adding into: a fresh 0-d array
    if isinstance(pg, IndexGrad):
        if not prev_exclusive:
            buf = p.xp.zeros(p.shape, dtype=pg.value.dtype)
            if prev is not None:
                buf += prev
            grads[id(p)] = (buf, True)
            prev = buf
        prev[pg.index] += pg.value
        return
    if pg.shape != p.shape:
        pg = unbroadcast(pg, p.shape, op)
        exclusive = True  # a sum over the broadcast axes: a new array (perhaps reshaped)
    if prev is None:
        grads[id(p)] = (pg, exclusive)
    elif prev_exclusive:
        prev += pg
    else:
        grads[id(p)] = (prev + pg, True)


def _accumulate_leaf(t: Tensor, g: Any, exclusive: bool) -> None:
    from narun.tensor._tensor import Tensor

    if g.dtype != t.dtype:
        g = g.astype(t.dtype)
    elif not exclusive or not g.flags.c_contiguous:
        g = g.copy()
    if t.grad is None:
        t.grad = Tensor._wrap(g)
    else:
        t.grad.data += g
    for hook in t._grad_hooks:
        hook(t)
