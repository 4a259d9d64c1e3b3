"""Mixed precision: a model that computes in float16 (or bfloat16) while float32 master
weights and the optimizer's state take the steps, with dynamic loss scaling for float16.

float16 keeps 11 bits of mantissa and overflows past 65504, and small gradients underflow
to zero. So the loss is multiplied by a scale before backward (lifting the gradients into
float16's range), the gradients are copied into the float32 masters divided by it, and a
step whose gradients hold an inf or a nan is skipped and the scale halved; after
`growth_interval` clean steps it doubles (torch.amp.GradScaler's rule, and its defaults).
bfloat16 has float32's range, so it needs no scaling (and gets none); NumPy and CuPy have
no bfloat16 arrays, so `precision="bf16"` trains on MLX devices only, whose bfloat16 arrays
report ml_dtypes' NumPy dtype.

    >>> mp = MixedPrecision(model, "fp16")   # the model's parameters become float16
    >>> opt = narun.optim.AdamW(mp.parameters(), lr=1e-3)   # over the float32 masters
    >>> loss = model.loss(x, y)
    >>> mp.backward(loss)                    # (loss * scale).backward()
    >>> mp.step(opt, max_norm=1.0)           # False: skipped (inf/nan), the scale halved
    True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from narun.errors import ConfigError
from narun.nn.utils import clip_grad_norm_
from narun.tensor import Tensor

PRECISIONS = ("fp32", "fp16", "bf16")


class GradScaler:
    """The loss scale of float16 training and its update rule (torch.amp.GradScaler's)."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000) -> None:
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ConfigError(f"GradScaler: init_scale must be a finite number > 0, got "
                              f"{init_scale}")
        if not growth_factor > 1.0 or not 0.0 < backoff_factor < 1.0:
            raise ConfigError(f"GradScaler: need growth_factor > 1 and 0 < backoff_factor "
                              f"< 1, got {growth_factor} and {backoff_factor}")
        if growth_interval < 1:
            raise ConfigError(f"GradScaler: growth_interval must be >= 1, got "
                              f"{growth_interval}")
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.clean_steps = 0  # since the last change of scale
        self.skipped = 0  # steps skipped over the whole run

    def update(self, found_inf: bool) -> None:
        """After a step: back off on an overflow, grow after growth_interval clean steps."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.skipped += 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped = int(state.get("skipped", 0))


class MixedPrecision:
    """`model` computing in `precision` ("fp16" or "bf16") over float32 masters.

    Makes a float32 master copy of every parameter and turns the model's own parameters
    into the low-precision dtype. Give the optimizer `parameters()` (the masters). A step:
    `backward(loss)`, then `step(optimizer)`, which moves the gradients into the masters
    (unscaled, in float32), skips the step if any is inf or nan, else clips, steps and
    copies the masters back into the model. `master_state()` is the model's float32 state
    dict, what a checkpoint keeps."""

    def __init__(self, model: Any, precision: str, scaler: GradScaler | None = None) -> None:
        if precision not in ("fp16", "bf16"):
            raise ConfigError(f"training.precision: MixedPrecision takes fp16 or bf16, got "
                              f"{precision!r} (fp32 needs no MixedPrecision)")
        self.model = model
        self.names, self.params = zip(*model.named_parameters())
        xp = self.params[0].xp
        self.dtype = low_precision_dtype(xp, precision)
        self.scaler = scaler if scaler is not None else (
            GradScaler() if precision == "fp16" else None)
        self.masters = []
        for p in self.params:
            master = Tensor._wrap(p.data.astype(np.float32))
            master.requires_grad = True
            self.masters.append(master)
            p.data = p.data.astype(self.dtype)

    def parameters(self) -> list[Tensor]:
        """The float32 masters, which the optimizer steps."""
        return list(self.masters)

    def backward(self, loss: Tensor) -> None:
        """Backward of `loss`, scaled by the loss scale under float16."""
        (loss * self.scaler.scale if self.scaler is not None else loss).backward()

    def step(self, optimizer: Any, max_norm: float | None = None) -> bool:
        """Unscale the model's gradients into the masters; if all are finite, clip them to
        `max_norm` (when given), step `optimizer` and copy the masters into the model.
        Returns False for a skipped step. Clears the model's gradients either way."""
        inv = 1.0 / self.scaler.scale if self.scaler is not None else 1.0
        finite = True
        for p, master in zip(self.params, self.masters):
            if p.grad is None:
                master.grad = None
                continue
            xp = p.xp
            g = xp.multiply(p.grad.data, xp.float32(inv), dtype=xp.float32)
            finite = finite and bool(xp.isfinite(g).all())
            master.grad = Tensor._wrap(g)
            p.grad = None
        if self.scaler is not None:
            self.scaler.update(found_inf=not finite)
        if not finite:
            for master in self.masters:
                master.grad = None
            return False
        if max_norm:
            clip_grad_norm_(self.masters, max_norm)
        optimizer.step()
        self.sync()
        return True

    def sync(self) -> None:
        """Copy the masters into the model's parameters (in its dtype)."""
        for p, master in zip(self.params, self.masters):
            p.data[...] = master.data

    def master_state(self) -> dict[str, Any]:
        """The model's state dict with the float32 masters in place of its parameters."""
        state = self.model.state_dict()
        for name, master in zip(self.names, self.masters):
            state[name] = master.data
        return state

    def load_master_state(self, state: dict[str, Any]) -> None:
        """Load a float32 state dict (a checkpoint's model) into the model (cast to its
        dtype, as `sync` casts) and the masters."""
        self.model.load_state_dict(state)
        for name, master in zip(self.names, self.masters):
            value = state[name]
            master.data[...] = value.data if isinstance(value, Tensor) else value

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])


def at_least_float32(t: Tensor) -> Tensor:
    """`t` cast to float32 if it is a half-precision tensor (float16 or bfloat16), else
    itself: losses are taken in float32 (autocast's rule for softmax and cross-entropy), so
    the scaled loss and the gradient it starts backward with stay finite (65536 x a loss of
    5 is past float16), and bfloat16's 8-bit mantissa does not round the log-sum-exp."""
    return t.float() if t.dtype.itemsize < 4 else t


def low_precision_dtype(xp: Any, precision: str) -> Any:
    """The array dtype of `precision` on the backend `xp`; ConfigError where it has none."""
    if precision == "fp16":
        return xp.float16
    if precision == "bf16":
        dtype = getattr(xp, "bfloat16", None)
        if dtype is None:
            raise ConfigError(bf16_refusal(on_mlx=xp.__name__ == "narun.tensor._mlx"))
        return dtype
    raise ConfigError(f"training.precision: expected one of {PRECISIONS}, got {precision!r}")


def bf16_refusal(on_mlx: bool = False) -> str:
    """Why training.precision bf16 cannot train here, and what can."""
    if on_mlx:  # MLX without ml_dtypes
        return ("training.precision: bf16 on MLX needs ml_dtypes (bfloat16 for NumPy, which "
                "MLX's bfloat16 arrays report and come to the host as); install "
                "narun[mps] or pip install ml_dtypes")
    return ("training.precision: bf16 needs bfloat16 arrays, which NumPy (cpu) and CuPy "
            "(cuda) do not have; use fp16 (float16 with loss scaling), or train bf16 on an "
            "MLX device (runtime.device: mps or mlx:cpu)")
