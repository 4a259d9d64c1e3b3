"""Optimizers, learning-rate schedules and gradient clipping, with torch.optim's semantics.

Every update runs in place on the parameter arrays and preallocated state, in float32 when
the parameters are float32. `state_dict()` is plain data (ints, floats, lists, NumPy
arrays), so checkpoints need no pickle.
"""

from narun.nn.utils import clip_grad_norm_, clip_grad_value_
from narun.optim import lr_scheduler
from narun.optim._adam import Adam, AdamW
from narun.optim._lion import Lion
from narun.optim._optimizer import Optimizer
from narun.optim._sgd import SGD
from narun.optim.lr_scheduler import build_scheduler

__all__ = [
    "SGD", "Adam", "AdamW", "Lion", "Optimizer", "build_scheduler", "clip_grad_norm_",
    "clip_grad_value_", "lr_scheduler",
]
