"""One pipeline stage's compute for one training step: the forward and backward of each
micro-batch, as the stage's schedule orders them.

Why the losses are scaled by 1/m: one process's step minimises the mean loss over the whole
batch. With m equal micro-batches that mean is the mean of the m micro-batch means, so each
micro-batch's backward starts from its loss / m and the stages' accumulated gradients are
exactly one process's (up to the order of float additions).

A received activation becomes a leaf that requires grad, over the received buffer itself
(no copy); its gradient after the backward is what goes back to the previous stage.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import narun
from narun.errors import ConfigError
from narun.pipeline.partition import StageModule
from narun.tensor import Tensor


class StageWork:
    """The forwards and backwards of one step's `micro_batches` on one stage."""

    def __init__(self, module: StageModule, micro_batches: int) -> None:
        self.module = module
        self.micro_batches = micro_batches
        self.loss = 0.0  # the step's loss (last stage): the mean over micro-batches
        self.busy = 0.0  # seconds in forwards and backwards (the rest of a step is bubble)
        self.peak_held = 0  # the most micro-batches whose activations were kept at once
        self._inputs: dict[int, Tensor] = {}
        self._outputs: dict[int, Tensor] = {}

    @property
    def held(self) -> int:
        """Micro-batches whose activations are kept for their backward."""
        return len(self._outputs)

    def forward(self, i: int, x: Any, targets: Any = None) -> Any:
        """Run micro-batch i: token ids or rows (first stage) or the previous stage's
        activation array. Returns the activation to send on, or None on the last stage
        (which needs the micro-batch's `targets`)."""
        if i in self._outputs:
            raise ConfigError(f"stage {self.module.plan.index}: micro-batch {i} ran forward "
                              f"twice in one step")
        began = time.perf_counter()
        plan = self.module.plan
        if plan.first:
            inp = x if isinstance(x, Tensor) else narun.tensor(np.asarray(x))
        else:
            inp = Tensor._wrap(x).requires_grad_()
            self._inputs[i] = inp
        out = self.module.forward(inp)
        if plan.last:
            loss = self.module.loss(out, targets)
            self.loss += loss.item() / self.micro_batches
            out = loss * (1.0 / self.micro_batches)
        self._outputs[i] = out
        self.peak_held = max(self.peak_held, len(self._outputs))
        self.busy += time.perf_counter() - began
        return None if plan.last else out.data

    def backward(self, i: int, grad: Any = None) -> Any:
        """Backward of micro-batch i from the gradient of its activation (None on the last
        stage, which starts from its loss); returns the gradient of its input activation
        to send back, or None on the first stage."""
        out = self._outputs.pop(i, None)
        if out is None:
            raise ConfigError(f"stage {self.module.plan.index}: backward of micro-batch {i} "
                              f"before its forward")
        began = time.perf_counter()
        out.backward(grad)
        inp = self._inputs.pop(i, None)
        self.busy += time.perf_counter() - began
        return None if inp is None else inp.grad.data
