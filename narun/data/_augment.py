"""Image augmentation for array datasets: random flips and small shifts of a batch.

    >>> x = augment_images(x, ("hflip", "shift"), max_shift=2, seed=0, step=7)  # doctest: +SKIP

The draws come from `np.random.default_rng([seed, step, AUGMENT_STREAM])`, a generator made
afresh for each step: a step's batch is augmented the same way whatever ran before it (a
resumed run, a trainer that restarted, N trainers that each slice the global batch), and
nothing needs checkpointing. Each image gets its own draws, one per row of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from narun.errors import ConfigError

AUGMENTATIONS: tuple[str, ...] = ("hflip", "vflip", "shift")
# mixed into the generator's seed so augmentation draws differ from the sampler's
# (which seeds np.random.default_rng([seed, epoch]))
AUGMENT_STREAM = 0x41554747


def augment_images(x: np.ndarray, names: Sequence[str], max_shift: int, seed: int,
                   step: int) -> np.ndarray:
    """`x` (N, C, H, W) with the augmentations in `names` applied, as a new array.

    - `hflip`: each image is mirrored left-right with probability 1/2;
    - `vflip`: each image is mirrored top-bottom with probability 1/2;
    - `shift`: each image moves by (dy, dx), each drawn uniformly from
      [-max_shift, max_shift]: out[i, j] = x[i - dy, j - dx], with the pixels that come in
      from outside copied from the nearest edge pixel (np.pad's mode "edge").

    Draws, in this order whatever order `names` has: hflip (N), vflip (N), dy (N), dx (N),
    each only for an augmentation in `names`.
    """
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ConfigError(f"data.augment: unknown augmentation {unknown[0]!r} "
                          f"(valid: {', '.join(AUGMENTATIONS)})")
    if x.ndim != 4:
        raise ConfigError(f"data.augment: flips and shifts are for images (N, C, H, W), got "
                          f"x of shape {x.shape}")
    rng = np.random.default_rng([seed, step, AUGMENT_STREAM])
    n, _, h, w = x.shape
    out = np.array(x, copy=True)
    if "hflip" in names:
        flip = rng.random(n) < 0.5
        out[flip] = out[flip, :, :, ::-1]
    if "vflip" in names:
        flip = rng.random(n) < 0.5
        out[flip] = out[flip, :, ::-1, :]
    if "shift" in names and max_shift > 0:
        s = max_shift
        dy = rng.integers(-s, s + 1, n)
        dx = rng.integers(-s, s + 1, n)
        # out[i, j] = x[clip(i - dy), clip(j - dx)]: gather rows then columns per image
        rows = np.clip(np.arange(h)[None, :] - dy[:, None], 0, h - 1)  # (N, H)
        cols = np.clip(np.arange(w)[None, :] - dx[:, None], 0, w - 1)  # (N, W)
        batch = np.arange(n)[:, None, None, None]
        chan = np.arange(x.shape[1])[None, :, None, None]
        out = out[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
    return np.ascontiguousarray(out)
