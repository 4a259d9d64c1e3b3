"""Get a trained model back from what `narun train` wrote (a run or one checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from narun.errors import CheckpointError


class Trained(NamedTuple):
    """What `load_trained` returns: the model (in eval mode), the job config it was trained
    with, the step it was saved at and the checkpoint directory it came from."""

    model: Any
    config: Any
    step: int
    checkpoint: Path


def load_trained(path: str | os.PathLike[str]) -> Trained:
    """The model saved at `path`, ready to use: a step directory (`runs/gpt/checkpoints/
    step-000200`), or a run directory (`runs/gpt`), whose newest checkpoint that verifies
    is used. The model is built from the config saved with it and put in eval mode.

        >>> model, config, step, _ = narun.models.load_trained("runs/gpt")
        >>> model.generate(tok.encode("Once")[None], 50)

    Raises CheckpointError when there is no usable checkpoint at `path`.
    """
    import narun.models  # noqa: F401  (registers the model fields config_from_dict checks)
    from narun.checkpoint import find_checkpoint, load_checkpoint
    from narun.config import config_from_dict
    from narun.models._registry import build_from_config

    c = load_checkpoint(find_checkpoint(path))
    if "config" not in c.extra:
        raise CheckpointError(f"{c.path}: has no job config in its manifest, so the model "
                              f"cannot be rebuilt; load its weights with narun.load("
                              f"'{c.path / 'model.safetensors'}') into a model you build")
    cfg = config_from_dict(c.extra["config"])
    model = build_from_config(cfg.model)
    model.load_state_dict(c.model)
    model.eval()
    return Trained(model, cfg, c.step, c.path)
