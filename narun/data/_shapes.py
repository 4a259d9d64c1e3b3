"""A known-answer image set rendered locally: one coloured shape per image, four classes.

    >>> from narun.data import make_shapes_npz
    >>> make_shapes_npz("shapes.npz", n=4096, size=32, seed=0)   # doctest: +SKIP

Everything is drawn with NumPy from coordinate grids and masks (nothing is downloaded).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "stripes")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.55, 0.0),
}
SIZES: tuple[str, ...] = ("small", "large")
# half-size of the shape's box as a fraction of the image side, per size word
_HALF = {"small": (0.16, 0.22), "large": (0.30, 0.40)}
NOISE_STD = 0.1


def _check(n: int, size: int, fn: str) -> None:
    if n < 1:
        raise ValueError(f"{fn}: n must be >= 1, got {n}")
    if size < 16:
        raise ValueError(f"{fn}: size must be >= 16, got {size}")


def render_shapes(n: int = 4096, size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Noise-free renderings and their parameters (what `make_shapes_npz` adds noise to).

    Returns a dict with `images` float32 (n, 3, size, size) in [0, 1], `masks` bool
    (n, size, size) (the shape's pixels), `y` int64 (n,), `colors` / `sizes` / `captions`
    unicode (n,), `background` float32 (n, 3), and `noise_rng`: the generator, positioned
    after the rendering draws, that `make_shapes_npz` draws its pixel noise from.
    """
    _check(n, size, "render_shapes")
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int64)  # balanced classes
    color_names = np.array(list(COLORS))
    color_idx = rng.integers(0, len(COLORS), n)
    large = rng.integers(0, 2, n).astype(bool)
    lo = np.where(large, _HALF["large"][0], _HALF["small"][0]) * size
    hi = np.where(large, _HALF["large"][1], _HALF["small"][1]) * size
    half = np.maximum(rng.uniform(lo, hi), 3.0)  # >= 3 px so small stripes stay visible
    # centres keep the whole box (plus a 1 px margin) inside [0, size]
    cx = rng.uniform(half + 1.0, size - half - 1.0)
    cy = rng.uniform(half + 1.0, size - half - 1.0)
    orient = rng.integers(0, 4, n)  # triangle: apex up/down/left/right; stripes: parity
    bars = rng.integers(3, 5, n)  # stripes: 3 or 4 bars
    grey = rng.uniform(0.0, 0.45, n)  # dark-to-grey background, slightly tinted
    background = np.clip(grey[:, None] + rng.uniform(-0.05, 0.05, (n, 3)), 0.0, 1.0)

    coords = np.arange(size, dtype=np.float64) + 0.5  # pixel centres
    dx = coords[None, None, :] - cx[:, None, None]  # (n, 1, size)
    dy = coords[None, :, None] - cy[:, None, None]  # (n, size, 1)
    dx, dy = np.broadcast_arrays(dx, dy)
    h = half[:, None, None]
    in_box = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    circle = dx * dx + dy * dy <= h * h
    # triangle: apex at v = -h, base at v = +h, |u| <= (v + h) / 2; (u, v) by orientation
    o = orient[:, None, None]
    u = np.where(o < 2, dx, dy)
    v = np.where(o < 2, dy, dx) * np.where(o % 2 == 0, 1.0, -1.0)
    triangle = (np.abs(v) <= h) & (np.abs(u) <= (v + h) / 2.0)
    # stripes: bars across the box, horizontal (even orient) or vertical (odd orient)
    # on a whole-pixel period (>= 2) so every bar and gap has the same width in pixels
    w = np.floor(np.where(o % 2 == 0, dy, dx) + h).astype(np.int64)
    period = np.maximum(np.floor(2.0 * half / bars), 2).astype(np.int64)[:, None, None]
    nbars = bars[:, None, None]
    stripes = in_box & (w < nbars * period) & (np.mod(w, period) < (period + 1) // 2)
    masks = np.select([y[:, None, None] == k for k in range(4)],
                      [circle, in_box, triangle, stripes], default=False)

    shape_rgb = np.array(list(COLORS.values()))[color_idx]  # (n, 3)
    images = np.where(masks[:, None], shape_rgb[:, :, None, None],
                      background[:, :, None, None]).astype(np.float32)

    colors = color_names[color_idx]
    sizes = np.where(large, "large", "small")
    captions = _captions(sizes, colors, y)
    return {
        "images": images, "masks": masks, "y": y, "colors": colors.astype(str),
        "sizes": sizes.astype(str), "captions": captions.astype(str),
        "background": background.astype(np.float32), "noise_rng": rng,
    }


def _captions(sizes: np.ndarray, colors: np.ndarray, y: np.ndarray) -> np.ndarray:
    """"a small red circle", "large yellow stripes": elementwise over the arrays."""
    article = np.where(y == CLASSES.index("stripes"), "", "a ")
    words = np.char.add(np.char.add(sizes, " "), np.char.add(colors, " "))
    return np.char.add(np.char.add(article, words), np.array(CLASSES)[y])


def shape_prompts() -> np.ndarray:
    """Every caption the renderer writes for each class, (classes, sizes * colours): row c
    names class c in each size and colour (the texts CLIP's zero-shot scores images
    against)."""
    y, size, color = np.meshgrid(np.arange(len(CLASSES)), np.array(SIZES),
                                 np.array(list(COLORS)), indexing="ij")
    return _captions(size, color, y).reshape(len(CLASSES), -1).astype(str)


def make_shapes_npz(path: str | os.PathLike[str], n: int = 4096, size: int = 32,
                    seed: int = 0) -> Path:
    """Write a labelled image set with known answers: one shape per image, 4 classes.

    Classes (y = index): circle, square, triangle, stripes (several parallel bars),
    balanced, rows in random order. Each image has a shape colour from `COLORS`, a size
    word (small/large), a random position (the shape fully inside), a dark/grey
    background unlike the shape's colour, and Gaussian pixel noise (std 0.1 on [0, 1]
    values, then clipped to [0, 1]). Writes `x` float32 (n, 3, size, size) standardised
    per channel (zero mean, unit variance over the set), `y` int64 (n,), `captions`
    (e.g. "a small red circle", "large yellow stripes"), `colors`, `sizes` (unicode
    (n,)), `classes` (the 4 names), `prompts` (4, 16) (every caption of each class:
    `shape_prompts`) and `mean` / `std` float32 (3,) (the per-channel statistics x was
    standardised with). No pickled objects. Deterministic per seed.
    """
    _check(n, size, "make_shapes_npz")
    r = render_shapes(n, size, seed)
    x = r["images"] + r["noise_rng"].normal(0.0, NOISE_STD, r["images"].shape).astype(np.float32)
    np.clip(x, 0.0, 1.0, out=x)
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    std = np.maximum(x.std(axis=(0, 2, 3), dtype=np.float64), 1e-6)
    x -= mean.astype(np.float32)[None, :, None, None]
    x /= std.astype(np.float32)[None, :, None, None]
    p = Path(path)
    with open(p, "wb") as f:  # a file object keeps np.savez from appending ".npz"
        np.savez(f, x=x, y=r["y"], captions=r["captions"], colors=r["colors"],
                 sizes=r["sizes"], classes=np.array(CLASSES), prompts=shape_prompts(),
                 mean=mean.astype(np.float32), std=std.astype(np.float32))
    return p
