"""A model cut into pipeline stages: which blocks each stage runs, which parameters it owns,
and the forward of one stage on one micro-batch.

A model is a chain of units: a GPT's transformer blocks (the token and position embeddings
ride with the first, the final norm and the head with the last), an MLP's Linear layers
(each with the activation after it). `plan_stages` splits the chain into p contiguous runs
of units whose estimated costs (multiply-adds per row) are as even as a contiguous split
allows: the p-stage pipeline is as slow as its slowest stage, so that maximum is what the
split minimises.

A stage owns the parameters its units use. A GPT with tied weights uses the token embedding
twice, at the bottom (lookup) and at the top (the head's matrix): the first and the last
stage each hold a copy, and `tied_names` lists it so a runtime can sum the two stages'
gradients before each step, which keeps the copies identical (Megatron does the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import narun
from narun.errors import ConfigError
from narun.models.gpt import GPT
from narun.models.mlp import MLP
from narun.nn import functional as F
from narun.tensor import Tensor


@dataclass(frozen=True)
class StagePlan:
    """Stage `index` of `stages`: it runs units `first_unit .. end_unit - 1` and owns the
    parameters named in `names` (the model's own names)."""

    index: int
    stages: int
    first_unit: int
    end_unit: int
    names: tuple[str, ...]

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.stages - 1

    def describe(self) -> str:
        return f"stage {self.index}: units {self.first_unit}..{self.end_unit - 1}"


def units(model: Any) -> int:
    """How many units (GPT blocks, MLP layers) the model's chain has."""
    if isinstance(model, GPT):
        return model.config.n_layer
    if isinstance(model, MLP):
        return len(model.sizes) - 1
    raise ConfigError(f"runtime.mode: pipeline cuts a GPT or an MLP into stages, not "
                      f"{type(model).__name__}")


def tied_names(model: Any) -> tuple[str, ...]:
    """Parameters both the first and the last stage hold (their gradients are summed)."""
    if isinstance(model, GPT) and model.config.tie_weights:
        return ("wte.weight",)
    return ()


def plan_stages(model: Any, stages: int) -> list[StagePlan]:
    """The balanced contiguous split of the model's units into `stages` stages."""
    n = units(model)
    if not 1 <= stages <= n:
        raise ConfigError(f"runtime.stages: the model has {n} blocks, so it splits into 1 to "
                          f"{n} stages, got {stages}; use at most {n} stages")
    bounds = _balanced_bounds(_unit_costs(model), stages)
    plans = []
    for s in range(stages):
        lo, hi = bounds[s], bounds[s + 1]
        names = []
        for name, _ in model.named_parameters():
            owner = _owner(model, name, stages, bounds)
            if owner == s or (owner == -1 and s in (0, stages - 1)):
                names.append(name)
        plans.append(StagePlan(s, stages, lo, hi, tuple(names)))
    return plans


def _unit_costs(model: Any) -> list[float]:
    if isinstance(model, MLP):
        return [float(a * b) for a, b in zip(model.sizes[:-1], model.sizes[1:])]
    cfg = model.config
    block = 4.0 * cfg.n_embd * cfg.n_embd + 2.0 * cfg.n_embd * cfg.hidden
    costs = [block] * cfg.n_layer
    costs[-1] += cfg.n_embd * cfg.vocab_size  # the head rides with the last block
    return costs


def _balanced_bounds(costs: Sequence[float], parts: int) -> list[int]:
    """Cut points 0 = b0 < b1 < ... < b_parts = len(costs) minimising the largest part's
    cost (the classic linear-partition dynamic programme; n and p are small)."""
    n = len(costs)
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    best = np.full((parts + 1, n + 1), np.inf)
    cut = np.zeros((parts + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, parts + 1):
        for j in range(k, n - (parts - k) + 1):
            for i in range(k - 1, j):
                worst = max(best[k - 1, i], prefix[j] - prefix[i])
                if worst < best[k, j]:
                    best[k, j], cut[k, j] = worst, i
    bounds = [n]
    for k in range(parts, 0, -1):
        bounds.append(int(cut[k, bounds[-1]]))
    return bounds[::-1]


def _owner(model: Any, name: str, stages: int, bounds: list[int]) -> int:
    """The stage that owns parameter `name`; -1 for a tied one (first and last both)."""
    if name in tied_names(model):
        return -1
    head, _, rest = name.partition(".")
    if isinstance(model, MLP):  # net.<k>.weight: Linear k // 2 of the Sequential
        unit = int(rest.partition(".")[0]) // 2
    elif head == "h":
        unit = int(rest.partition(".")[0])
    elif head in ("wte", "wpe"):
        return 0
    else:  # ln_f, lm_head
        return stages - 1
    return int(np.searchsorted(bounds, unit, side="right")) - 1


class StageModule:
    """One stage of `model` for `plan`: `forward(x)` runs its units on a micro-batch (token
    ids on the first stage, the previous stage's activations elsewhere); the last stage's
    output is the logits, and `loss(logits, targets)` the mean cross-entropy. The modules
    are the model's own, so a stage process builds the whole model and keeps this stage."""

    def __init__(self, model: Any, plan: StagePlan) -> None:
        self.model, self.plan = model, plan
        params = dict(model.named_parameters())
        self.parameters = {name: params[name] for name in plan.names}

    def forward(self, x: Tensor) -> Tensor:
        model, plan = self.model, self.plan
        if isinstance(model, MLP):
            net = model.net
            for unit in range(plan.first_unit, plan.end_unit):
                x = net[2 * unit](x)
                if 2 * unit + 1 < len(net):
                    x = net[2 * unit + 1](x)
            return x
        if plan.first:
            x = model.embed(x)
        rope = model.rope_for(x.shape[1], x)
        for block in model.h[plan.first_unit:plan.end_unit]:
            x = block(x, rope)
        return model.head(x) if plan.last else x

    @staticmethod
    def loss(logits: Tensor, targets: Any) -> Tensor:
        """Mean cross-entropy over every row (every token for a language model)."""
        t = targets if isinstance(targets, Tensor) else narun.tensor(
            np.asarray(targets, dtype=np.int64), device=logits.device)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1))
