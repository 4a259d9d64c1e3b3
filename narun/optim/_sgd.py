"""SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD's rule)."""

from __future__ import annotations

from typing import Any

from narun.errors import ConfigError
from narun.optim._optimizer import Optimizer, ParamsT


class SGD(Optimizer):
    """p -= lr * d, where d = g + weight_decay * p, or with momentum the running buffer
    b = momentum * b + (1 - dampening) * d (b = d on the first step); Nesterov uses
    d + momentum * b instead of b. `maximize` ascends.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 *, maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize))

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        super()._validate_group(group, index)
        if group["momentum"] < 0:
            raise ConfigError(f"param group {index}: momentum must be >= 0, got "
                              f"{group['momentum']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ConfigError(f"param group {index}: Nesterov momentum needs momentum > 0 and "
                              f"dampening 0, got momentum={group['momentum']}, "
                              f"dampening={group['dampening']}")

    def _update(self, group: dict[str, Any], param: Any, grad: Any,
                state: dict[str, Any]) -> None:
        xp = self._xp(param)
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        momentum, dampening = float(group["momentum"]), float(group["dampening"])
        nesterov, maximize = bool(group["nesterov"]), bool(group["maximize"])
        first = False
        if momentum != 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = xp.empty_like(param, order="C")
            first = True
        arrays = [param, grad]
        if momentum != 0:
            arrays.append(state["momentum_buffer"])
        for blk in self._blocks(arrays, 2):
            p, g, s, t = blk[0], blk[1], blk[-2], blk[-1]
            d = g
            if maximize:
                xp.negative(g, out=t)
                d = t
            if wd != 0:
                xp.multiply(p, wd, out=s)
                s += d
                d = s
            if momentum != 0:
                buf = blk[2]
                if first:
                    xp.copyto(buf, d)
                else:
                    buf *= momentum
                    if dampening == 0:
                        buf += d
                    else:
                        xp.multiply(d, 1.0 - dampening, out=t)
                        buf += t
                if nesterov:
                    tmp = s if d is t else t
                    xp.multiply(buf, momentum, out=tmp)
                    tmp += d
                    d = tmp
                else:
                    d = buf
            xp.multiply(d, -lr, out=s)
            p += s
