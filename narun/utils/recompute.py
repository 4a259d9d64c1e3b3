"""Gradient checkpointing: trade compute for memory by recomputing a function's activations
in backward instead of keeping them from forward (torch.utils.checkpoint).

`checkpoint(fn, *args)` runs `fn(*args)` without recording a graph, so none of its
intermediate arrays outlive the call: only its inputs and its output remain. When backward
reaches the output, `fn` runs again on the same inputs, this time recording, with the
random generator put back to where it was (dropout draws the same masks), and the gradient
flows back through that recomputed graph: the parameters `fn` uses get their gradients
there, its tensor inputs get theirs as the result. The values are the plain run's: the same
ops on the same arrays, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import narun
from narun.tensor import Tensor
from narun.tensor._autograd import enable_grad, is_grad_enabled, no_grad
from narun.tensor._tensor import make


def checkpoint(fn: Callable[..., Tensor], *args: Any) -> Tensor:
    """`fn(*args)`, its activations recomputed in backward instead of kept. `fn` returns one
    Tensor; non-tensor arguments (and tuples of tensors, as a rotary table) are passed as
    they are, and only the tensor arguments that require grad get gradients. Without grad
    mode, or with no tensor argument that requires grad, it is just `fn(*args)`."""
    inputs = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
    if not is_grad_enabled() or not inputs:
        return fn(*args)
    rng = narun.get_rng_state()
    with no_grad():
        out = fn(*args)
    if not isinstance(out, Tensor):
        raise TypeError(f"checkpoint: fn must return a Tensor, got {type(out).__name__}")

    def backward(g: Any) -> tuple[Any, ...]:
        now = narun.get_rng_state()
        narun.set_rng_state(rng)
        try:
            fresh = [_leaf(a) if isinstance(a, Tensor) and a.requires_grad else a for a in args]
            with enable_grad():
                again = fn(*fresh)
        finally:
            narun.set_rng_state(now)
        again.backward(g)
        return tuple(f.grad.data if f.grad is not None else None
                     for f in fresh if isinstance(f, Tensor) and f.requires_grad)

    return make(out.data, tuple(inputs), backward, "checkpoint")


def _leaf(t: Tensor) -> Tensor:
    """A leaf over `t`'s array: the recomputed graph ends here, and its gradient is `t`'s."""
    leaf = Tensor._wrap(t.data)
    leaf.requires_grad = True
    return leaf
