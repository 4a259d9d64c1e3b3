"""Learning-rate schedules, with torch.optim.lr_scheduler's protocol.

A scheduler is built after its optimizer and sets each group's "lr" at once (step 0);
call `scheduler.step()` once after each `optimizer.step()`. `last_epoch` counts the steps
taken. Every schedule here is a closed form of `last_epoch` and the groups' initial lrs,
so a resumed scheduler (state_dict / load_state_dict) gives exactly the lrs an uninterrupted
one would.

    >>> sched = build_scheduler("cosine", opt, warmup_steps=100, total_steps=2000)
    >>> for batch in data:
    ...     loss.backward(); opt.step(); opt.zero_grad(); sched.step()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from narun.errors import CheckpointError, ConfigError
from narun.optim._optimizer import Optimizer

__all__ = [
    "SCHEDULES", "CosineAnnealingLR", "LRScheduler", "LambdaLR", "StepLR", "WarmupConstantLR",
    "WarmupCosineLR", "WarmupLinearLR", "WarmupStepLR", "build_scheduler",
    "constant_with_warmup", "warmup_cosine",
]


class LRScheduler:
    """Base class: subclasses implement `get_lr()` from `last_epoch` and `base_lrs`."""

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__} needs a narun Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise ConfigError(f"param_groups[{i}] has no 'initial_lr'; resuming a "
                                      f"scheduler at last_epoch={last_epoch} needs an "
                                      "optimizer restored from a state dict")
        self.base_lrs: list[float] = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._step_count = 0
        self._last_lr: list[float] = []
        self.step()

    def get_lr(self) -> list[float]:
        raise NotImplementedError(f"{type(self).__name__} does not implement get_lr")

    def step(self) -> None:
        """Advance one step and write the new lr into every param group."""
        self._step_count += 1
        self.last_epoch += 1
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        """The lr of each group as set by the latest `step()`."""
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        """Plain data (numbers and lists): everything but the optimizer (and callables)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
                if k != "optimizer" and not callable(v) and k != "lr_lambdas"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        unknown = set(state_dict) - set(self.state_dict())
        if unknown:
            raise CheckpointError(f"{type(self).__name__}.load_state_dict: unknown keys "
                                  f"{sorted(unknown)} (a state dict of another schedule?)")
        self.__dict__.update({k: (list(v) if isinstance(v, tuple) else v)
                              for k, v in state_dict.items()})


class _FactorLR(LRScheduler):
    """lr = initial_lr * factor(last_epoch)."""

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]


class LambdaLR(LRScheduler):
    """lr = initial_lr * lr_lambda(last_epoch); one function, or one per group.

    The functions are not part of `state_dict()`: rebuild the scheduler, then load.
    """

    def __init__(self, optimizer: Optimizer,
                 lr_lambda: Callable[[int], float] | Sequence[Callable[[int], float]],
                 last_epoch: int = -1) -> None:
        n = len(optimizer.param_groups)
        if callable(lr_lambda):
            self.lr_lambdas = [lr_lambda] * n
        else:
            lambdas = list(lr_lambda)
            if len(lambdas) != n:
                raise ConfigError(f"LambdaLR: got {len(lambdas)} lr_lambdas for {n} param "
                                  "groups")
            self.lr_lambdas = lambdas
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]


class StepLR(_FactorLR):
    """lr = initial_lr * gamma ** (last_epoch // step_size)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        if not isinstance(step_size, int) or step_size < 1:
            raise ConfigError(f"StepLR: step_size must be an int >= 1, got {step_size!r}")
        self.step_size = step_size
        self.gamma = float(gamma)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        return self.gamma ** (step // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (initial_lr - eta_min) * (1 + cos(pi * last_epoch / T_max)) / 2."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0,  # noqa: N803
                 last_epoch: int = -1) -> None:
        if not isinstance(T_max, int) or T_max < 1:
            raise ConfigError(f"CosineAnnealingLR: T_max must be an int >= 1, got {T_max!r}")
        self.T_max = T_max
        self.eta_min = float(eta_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        c = (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
        return [self.eta_min + (base - self.eta_min) * c for base in self.base_lrs]


def _check_steps(name: str, warmup_steps: int, total_steps: int | None) -> None:
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ConfigError(f"{name}: warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if total_steps is not None and (not isinstance(total_steps, int)
                                    or total_steps < warmup_steps):
        raise ConfigError(f"{name}: total_steps must be an int >= warmup_steps "
                          f"({warmup_steps}), got {total_steps!r}")


def _check_ratio(name: str, min_lr_ratio: float) -> float:
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"{name}: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return float(min_lr_ratio)


class _WarmupLR(_FactorLR):
    """Linear warmup from 0: factor t / warmup_steps for t < warmup_steps, then `decay`."""

    warmup_steps: int

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        return self.decay(step - self.warmup_steps)

    def decay(self, step: int) -> float:
        raise NotImplementedError


class WarmupCosineLR(_WarmupLR):
    """Linear warmup from 0 to the initial lr, then a half cosine down to
    min_lr_ratio * initial_lr at total_steps, where it stays."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float = 0.0, last_epoch: int = -1) -> None:
        _check_steps("warmup_cosine", warmup_steps, total_steps)
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.min_lr_ratio = _check_ratio("warmup_cosine", min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def decay(self, step: int) -> float:
        progress = min(step / max(1, self.total_steps - self.warmup_steps), 1.0)
        r = self.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupLinearLR(_WarmupLR):
    """Linear warmup from 0, then a straight line down to min_lr_ratio * initial_lr at
    total_steps, where it stays."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float = 0.0, last_epoch: int = -1) -> None:
        _check_steps("linear", warmup_steps, total_steps)
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.min_lr_ratio = _check_ratio("linear", min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def decay(self, step: int) -> float:
        left = max(0.0, 1.0 - step / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * left


class WarmupConstantLR(_WarmupLR):
    """Linear warmup from 0, then the initial lr for good."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, last_epoch: int = -1) -> None:
        _check_steps("constant_with_warmup", warmup_steps, None)
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch)

    def decay(self, step: int) -> float:
        return 1.0


class WarmupStepLR(_WarmupLR):
    """Linear warmup from 0, then the lr times gamma every step_size steps."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, step_size: int,
                 gamma: float = 0.1, last_epoch: int = -1) -> None:
        _check_steps("step", warmup_steps, None)
        if not isinstance(step_size, int) or step_size < 1:
            raise ConfigError(f"step: step_size must be an int >= 1, got {step_size!r}")
        self.warmup_steps, self.step_size, self.gamma = warmup_steps, step_size, float(gamma)
        super().__init__(optimizer, last_epoch)

    def decay(self, step: int) -> float:
        return self.gamma ** (step // self.step_size)


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.0) -> WarmupCosineLR:
    """Linear warmup from 0 over `warmup_steps`, then cosine decay to
    `min_lr_ratio` * lr at `total_steps` (and flat after)."""
    return WarmupCosineLR(optimizer, warmup_steps, total_steps, min_lr_ratio)


def constant_with_warmup(optimizer: Optimizer, warmup_steps: int) -> WarmupConstantLR:
    """Linear warmup from 0 over `warmup_steps`, then the optimizer's lr."""
    return WarmupConstantLR(optimizer, warmup_steps)


SCHEDULES = ("constant", "cosine", "linear", "step")


def build_scheduler(name: str, optimizer: Optimizer, warmup_steps: int, total_steps: int,
                    *, min_lr_ratio: float = 0.0, step_size: int | None = None,
                    gamma: float = 0.1) -> LRScheduler:
    """The scheduler a config's `training.schedule` names; all start with linear warmup.

    "cosine": cosine decay to min_lr_ratio * lr at total_steps; "linear": linear decay to
    the same; "constant": flat; "step": times `gamma` every `step_size` steps (default: a
    third of the steps after warmup, so the lr drops twice).
    """
    _check_steps(f"schedule {name!r}", warmup_steps, total_steps)
    if name == "cosine":
        return WarmupCosineLR(optimizer, warmup_steps, total_steps, min_lr_ratio)
    if name == "linear":
        return WarmupLinearLR(optimizer, warmup_steps, total_steps, min_lr_ratio)
    if name == "constant":
        return WarmupConstantLR(optimizer, warmup_steps)
    if name == "step":
        if step_size is None:
            step_size = max(1, (total_steps - warmup_steps) // 3)
        return WarmupStepLR(optimizer, warmup_steps, step_size, gamma)
    raise ConfigError(f"training.schedule: unknown schedule {name!r}; valid names are "
                      f"{', '.join(SCHEDULES)}")
