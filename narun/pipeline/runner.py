"""Run one stage's schedule for one step: its actions in order, over any transport.

The transport is the `StageIO` the caller gives: a stage process gives sockets to its
neighbours, a test gives in-memory queues, and both run this same loop. A receive awaits
the message (which may have arrived long before: activations are buffered as they come, so
a stage receives micro-batch i + 1 while it computes i); a send waits at most until ZeroMQ
takes the message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from narun.pipeline.stage import StageWork


class StageIO(Protocol):
    async def recv_act(self, i: int) -> Any: ...
    async def send_act(self, i: int, data: Any) -> None: ...
    async def recv_grad(self, i: int) -> Any: ...
    async def send_grad(self, i: int, data: Any) -> None: ...
    def micro_batch(self, i: int) -> tuple[Any, Any]:
        """Micro-batch i of this step: (inputs, targets), on the ends that use them."""


Compute = Callable[..., Awaitable[Any]]


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


async def run_actions(work: StageWork, actions: Sequence[Any], io: StageIO,
                      compute: Compute = _inline) -> None:
    """Run `actions` (a validated schedule's list for this stage) up to its `step`, which
    the caller takes (the optimizer step needs the tied and clipped gradients first).
    `compute(fn, *args)` runs the forward and backward: a stage process gives one that
    runs them on its executor thread, so its event loop keeps receiving meanwhile."""
    plan = work.module.plan
    arrived: dict[int, Any] = {}
    grads: dict[int, Any] = {}
    for action in actions:
        kind, i = action.kind, action.micro_batch
        if kind == "recv_act":
            arrived[i] = await io.recv_act(i)
        elif kind == "recv_grad":
            grads[i] = await io.recv_grad(i)
        elif kind == "forward":
            x, y = io.micro_batch(i)
            if not plan.first:
                x = arrived.pop(i)
            out = await compute(work.forward, i, x, y if plan.last else None)
            if out is not None:
                arrived[i] = out  # held until its send_act
        elif kind == "send_act":
            await io.send_act(i, arrived.pop(i))
        elif kind == "backward":
            grad_in = await compute(work.backward, i, grads.pop(i, None))
            if grad_in is not None:
                grads[i] = grad_in  # held until its send_grad
        elif kind == "send_grad":
            await io.send_grad(i, grads.pop(i))
        elif kind == "step":
            return
        else:
            raise ValueError(f"stage {plan.index}: unknown action {action!r}")
