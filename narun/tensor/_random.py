"""The global random generator behind randn/rand/dropout/init, seedable and checkpointable."""

from __future__ import annotations

from typing import Any

import numpy as np

_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed narun's global generator (like torch.manual_seed)."""
    global _rng
    _rng = np.random.default_rng(seed)


def generator() -> np.random.Generator:
    return _rng


def get_rng_state() -> dict[str, Any]:
    """The generator's state as plain data (JSON/msgpack friendly), for checkpoints."""
    return _rng.bit_generator.state


def set_rng_state(state: dict[str, Any]) -> None:
    _rng.bit_generator.state = state
