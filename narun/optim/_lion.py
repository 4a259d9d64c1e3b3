"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms")."""

from __future__ import annotations

from typing import Any

from narun.optim._optimizer import Optimizer, ParamsT


class Lion(Optimizer):
    """p *= 1 - lr*wd; p -= lr * sign(b1 m + (1-b1) g); m = b2 m + (1-b2) g.

    Only the sign of the interpolated momentum is used, so every coordinate moves by lr:
    use a learning rate 3-10x smaller than AdamW's and a larger weight decay.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 *, maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      maximize=maximize))

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        super()._validate_group(group, index)
        self._check_betas(group, index)

    def _update(self, group: dict[str, Any], param: Any, grad: Any,
                state: dict[str, Any]) -> None:
        xp = self._xp(param)
        if "exp_avg" not in state:
            state["exp_avg"] = xp.zeros_like(param, order="C")
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        beta1, beta2 = (float(b) for b in group["betas"])
        maximize = bool(group["maximize"])
        for p, g, m, s, t, u in self._blocks([param, grad, state["exp_avg"]], 3):
            if maximize:
                xp.negative(g, out=u)
                g = u
            if wd != 0:
                p *= 1.0 - lr * wd
            xp.subtract(g, m, out=s)  # s = b1 m + (1-b1) g, then its sign
            s *= 1.0 - beta1
            s += m
            xp.sign(s, out=t)  # not in place: NumPy's in-place sign is 2-3x slower
            t *= -lr
            p += t
            xp.subtract(g, m, out=s)
            s *= 1.0 - beta2
            m += s
