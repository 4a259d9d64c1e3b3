"""Adam and AdamW (torch.optim's rules), fused into in-place passes over cached slices.

Per slice: m += (1-b1)(g - m); v = b2 v + (1-b2) g^2; p -= (lr/bc1) m / (sqrt(v)/sqrt(bc2) +
eps). The bias corrections are folded into two scalars, as torch's fused kernels do:
p -= (lr sqrt(bc2)/bc1) * m / (sqrt(v) + eps sqrt(bc2)), so no pass divides by sqrt(bc2).
"""

from __future__ import annotations

import math
from typing import Any

from narun.errors import ConfigError
from narun.optim._optimizer import Optimizer, ParamsT


class Adam(Optimizer):
    """Adam (Kingma & Ba). `weight_decay` adds weight_decay * p to the gradient (L2), as
    torch.optim.Adam; `decoupled_weight_decay=True` (AdamW) shrinks p instead. `amsgrad`
    uses the running maximum of v; `maximize` ascends.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 decoupled_weight_decay: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay))

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        super()._validate_group(group, index)
        self._check_betas(group, index)
        if not group["eps"] >= 0:
            raise ConfigError(f"param group {index}: eps must be >= 0, got {group['eps']}")

    def _update(self, group: dict[str, Any], param: Any, grad: Any,
                state: dict[str, Any]) -> None:
        xp = self._xp(param)
        amsgrad = bool(group["amsgrad"])
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(param, order="C")
            state["exp_avg_sq"] = xp.zeros_like(param, order="C")
            if amsgrad:
                state["max_exp_avg_sq"] = xp.zeros_like(param, order="C")
        state["step"] = step = state["step"] + 1
        lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        beta1, beta2 = (float(b) for b in group["betas"])
        decoupled, maximize = bool(group["decoupled_weight_decay"]), bool(group["maximize"])
        bc2_sqrt = math.sqrt(1.0 - beta2**step)
        step_size = lr / (1.0 - beta1**step) * bc2_sqrt
        eps_hat = eps * bc2_sqrt
        shrink = 1.0 - lr * wd

        arrays = [param, grad, state["exp_avg"], state["exp_avg_sq"]]
        if amsgrad:
            arrays.append(state["max_exp_avg_sq"])
        coupled = wd != 0 and not decoupled
        for blk in self._blocks(arrays, 2):
            p, g, m, v, s, t = blk[0], blk[1], blk[2], blk[3], blk[-2], blk[-1]
            if maximize:
                xp.negative(g, out=t)
                g = t
            if coupled:
                xp.multiply(p, wd, out=s)
                xp.add(s, g, out=t)
                g = t
            elif decoupled and wd != 0:
                p *= shrink
            xp.subtract(g, m, out=s)
            s *= 1.0 - beta1
            m += s
            v *= beta2
            xp.multiply(g, g, out=s)
            s *= 1.0 - beta2
            v += s
            if amsgrad:
                xp.maximum(blk[4], v, out=blk[4])
                v = blk[4]
            xp.sqrt(v, out=s)
            s += eps_hat
            xp.divide(m, s, out=s)
            s *= -step_size
            p += s


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr * weight_decay
    before the Adam step. Default weight_decay=0.01, as torch.optim.AdamW.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True)
