"""A stage's connections to the other stages: activations forward, their gradients back, and
the tied weights' gradients between the two end stages (protocol/SPEC.md: `activation`,
`activation_grad`, `tied_grads`).

Each stage binds one ROUTER that every stage sending to it connects a DEALER to, under the
identity `stage-S`. A reader task takes every message as it arrives and files it by
(type, step, micro-batch), so a stage receives micro-batch i + 1 while it computes i and
`recv_*` only picks up what is already there (or waits for it). As SPEC.md says, messages
for the current step and the next are kept; any other step's (a previous incarnation's)
are dropped and counted, never fatal. Arrays travel zero-copy both ways: a received
activation is the frame's own buffer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import structlog
import zmq.asyncio

from narun.runtime.mailbox import new_id
from narun.runtime.tasks import Background
from protocol import Channel, message, open_channel

log = structlog.get_logger("narun.pipeline")

_KINDS = ("activation", "activation_grad", "tied_grads")


class StageLinks:
    """Stage `stage` of `stages`: `endpoint` is where the others reach it; `connect` takes
    every stage's endpoint (index = stage) once all are known."""

    def __init__(self, context: zmq.asyncio.Context, stage: int, stages: int,
                 on_error: Callable[[BaseException], None], host: str = "127.0.0.1",
                 curve_server: Any = None, curve_client: Any = None, step: int = 0) -> None:
        self.stage, self.stages = stage, stages
        self.context = context
        self.curve_client = curve_client
        self.inbox = open_channel(context, "router", bind=f"tcp://{host}:0",
                                  curve=curve_server)
        self.endpoint = self.inbox.endpoint
        # messages for this step and the next are kept: from the start, the step the stage
        # starts at (after a rollback, a neighbour may send it before this stage begins it)
        self.step = step
        self.dropped = 0  # messages for any other step (a previous incarnation's)
        self._waiting: dict[tuple[str, int, int], asyncio.Future[Any]] = {}
        self._out: dict[int, Channel] = {}
        self._tasks = Background(f"stage {stage} links", on_error=on_error)
        self._tasks.spawn(self._read(), f"stage {stage}'s inbox")

    def connect(self, endpoints: list[str]) -> None:
        """Open the DEALERs to the neighbours (and to the other end stage for tied weights)."""
        s, p = self.stage, self.stages
        peers = {t for t in (s - 1, s + 1) if 0 <= t < p}
        if s in (0, p - 1) and p > 1:
            peers.add(p - 1 - s if s == 0 else 0)
        for t in sorted(peers):
            self._out[t] = open_channel(self.context, "dealer", connect=endpoints[t],
                                        identity=f"stage-{s}".encode(),
                                        curve=self.curve_client)

    def close(self) -> None:
        self._tasks.cancel()
        for fut in self._waiting.values():
            fut.cancel()
        for channel in self._out.values():
            channel.close()
        self.inbox.close()

    def begin(self, step: int) -> None:
        """Step `step` starts: drop what is kept for steps before it."""
        self.step = step
        for key in [k for k in self._waiting if k[1] < step]:
            self._waiting.pop(key).cancel()

    # -- sending ---------------------------------------------------------------------------
    async def send_act(self, step: int, i: int, data: Any) -> None:
        await self._send(self.stage + 1, "activation", step, i, data)

    async def send_grad(self, step: int, i: int, data: Any) -> None:
        await self._send(self.stage - 1, "activation_grad", step, i, data)

    async def send_tied(self, step: int, grads: dict[str, Any]) -> None:
        other = self.stages - 1 if self.stage == 0 else 0
        # waits until ZeroMQ has released the arrays: the sender adds the other end's
        # gradients into these same arrays next
        await self._out[other].send(message("tied_grads", new_id(), step=step, grads=grads))

    async def _send(self, to: int, kind: str, step: int, i: int, data: Any) -> None:
        # nobody writes to an activation or its gradient once sent: no wait for release
        await self._out[to].send(message(kind, new_id(), step=step, micro_batch=i,
                                         data=np.ascontiguousarray(data)), wait_sent=False)

    # -- receiving -------------------------------------------------------------------------
    # shielded: a caller that gives up waiting (a timeout) leaves the slot to be filled
    async def recv_act(self, step: int, i: int) -> Any:
        return await asyncio.shield(self._slot("activation", step, i))

    async def recv_grad(self, step: int, i: int) -> Any:
        return await asyncio.shield(self._slot("activation_grad", step, i))

    async def recv_tied(self, step: int) -> dict[str, Any]:
        return await asyncio.shield(self._slot("tied_grads", step, -1))

    def _slot(self, kind: str, step: int, i: int) -> asyncio.Future[Any]:
        key = (kind, step, i)
        fut = self._waiting.get(key)
        if fut is None:
            fut = self._waiting[key] = asyncio.get_running_loop().create_future()
        return fut

    async def _read(self) -> None:
        while True:
            msg, route = await self.inbox.recv()
            if msg.type not in _KINDS:
                log.warning("stage.unexpected", stage=self.stage, type=msg.type,
                            sender=route)
                continue
            step = msg["step"]
            i = -1 if msg.type == "tied_grads" else msg["micro_batch"]
            if not self.step <= step <= self.step + 1:
                self.dropped += 1
                log.info("stage.dropped", stage=self.stage, type=msg.type, step=step,
                         current=self.step)
                continue
            fut = self._slot(msg.type, step, i)
            if fut.done():
                self.dropped += 1  # a repeat of what is already here
                continue
            fut.set_result(msg["grads"] if msg.type == "tied_grads" else msg["data"])


class StepIO:
    """`run_actions`'s transport for one step of one stage over its links: the step's
    micro-batches come from the global batch (x, y), split in m equal parts."""

    def __init__(self, links: StageLinks, step: int, x: Any, y: Any, m: int) -> None:
        self.links, self.step = links, step
        self.xs = np.split(x, m) if x is not None else None
        self.ys = np.split(y, m) if y is not None else None

    async def recv_act(self, i: int) -> Any:
        return await self.links.recv_act(self.step, i)

    async def send_act(self, i: int, data: Any) -> None:
        await self.links.send_act(self.step, i, data)

    async def recv_grad(self, i: int) -> Any:
        return await self.links.recv_grad(self.step, i)

    async def send_grad(self, i: int, data: Any) -> None:
        await self.links.send_grad(self.step, i, data)

    def micro_batch(self, i: int) -> tuple[Any, Any]:
        return (None if self.xs is None else self.xs[i], None if self.ys is None else self.ys[i])
