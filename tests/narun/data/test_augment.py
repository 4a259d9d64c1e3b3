import numpy as np
import pytest

from narun.config import config_from_dict
from narun.data import AUGMENTATIONS, augment_images
from narun.data._augment import AUGMENT_STREAM
from narun.errors import ConfigError


def images(n=16, c=3, h=8, w=10, seed=0):
    return np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)


def reference(x, names, max_shift, seed, step):
    """One image at a time with np.flip and np.pad(mode="edge"), from the documented draws."""
    rng = np.random.default_rng([seed, step, AUGMENT_STREAM])
    n, _, h, w = x.shape
    hflip = rng.random(n) < 0.5 if "hflip" in names else np.zeros(n, bool)
    vflip = rng.random(n) < 0.5 if "vflip" in names else np.zeros(n, bool)
    shift = "shift" in names and max_shift > 0
    dy = rng.integers(-max_shift, max_shift + 1, n) if shift else np.zeros(n, int)
    dx = rng.integers(-max_shift, max_shift + 1, n) if shift else np.zeros(n, int)
    out = []
    for i in range(n):
        img = x[i]
        if hflip[i]:
            img = np.flip(img, axis=2)
        if vflip[i]:
            img = np.flip(img, axis=1)
        s = max_shift
        padded = np.pad(img, ((0, 0), (s, s), (s, s)), mode="edge")
        # out[r, c] = img[r - dy, c - dx]: the window starting at (s - dy, s - dx)
        out.append(padded[:, s - dy[i]:s - dy[i] + h, s - dx[i]:s - dx[i] + w])
    return np.stack(out), hflip, vflip, dy, dx


@pytest.mark.parametrize("names", [("hflip",), ("vflip",), ("shift",),
                                   ("hflip", "vflip", "shift"), ("shift", "hflip")])
@pytest.mark.parametrize("max_shift", [1, 3])
def test_flips_and_shifts_equal_the_numpy_reference(names, max_shift):
    x = images(n=64)
    before = x.copy()
    out = augment_images(x, names, max_shift, seed=5, step=11)
    want, *_ = reference(x, names, max_shift, seed=5, step=11)
    assert out.dtype == x.dtype and out.flags.c_contiguous
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(x, before)  # the input batch is left alone


def test_a_lit_pixel_moves_by_the_drawn_shift_and_flip():
    # known answer without the reference's padding: one bright pixel away from the edges
    n, h, w, s = 200, 12, 12, 2
    x = np.zeros((n, 1, h, w), np.float32)
    x[:, 0, 4, 7] = 1.0
    out = augment_images(x, ("hflip", "vflip", "shift"), s, seed=0, step=3)
    _, hflip, vflip, dy, dx = reference(x, ("hflip", "vflip", "shift"), s, seed=0, step=3)
    r = np.where(vflip, h - 1 - 4, 4) + dy
    c = np.where(hflip, w - 1 - 7, 7) + dx
    want = np.zeros_like(x)
    want[np.arange(n), 0, r, c] = 1.0
    np.testing.assert_array_equal(out, want)
    # about half the images flip each way, and every shift in [-s, s] occurs, none beyond
    assert 0.35 < hflip.mean() < 0.65 and 0.35 < vflip.mean() < 0.65
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(-s, s + 1))


def test_draws_are_a_function_of_seed_and_step():
    x = images(n=32)
    names = AUGMENTATIONS
    a = augment_images(x, names, 2, seed=1, step=7)
    np.testing.assert_array_equal(a, augment_images(x, names, 2, seed=1, step=7))
    assert not np.array_equal(a, augment_images(x, names, 2, seed=1, step=8))
    assert not np.array_equal(a, augment_images(x, names, 2, seed=2, step=7))
    # the order augmentations are listed in does not change the draws
    np.testing.assert_array_equal(a, augment_images(x, names[::-1], 2, seed=1, step=7))


def test_nothing_listed_or_a_zero_shift_changes_nothing():
    x = images()
    np.testing.assert_array_equal(augment_images(x, (), 2, seed=0, step=0), x)
    np.testing.assert_array_equal(augment_images(x, ("shift",), 0, seed=0, step=0), x)


def test_bad_input_is_refused_with_the_key():
    with pytest.raises(ConfigError, match=r"data.augment: .*images \(N, C, H, W\).*\(16, 3\)"):
        augment_images(np.zeros((16, 3), np.float32), ("hflip",), 2, seed=0, step=0)
    with pytest.raises(ConfigError, match=r"data.augment: unknown augmentation 'rot90'"):
        augment_images(images(), ("rot90",), 2, seed=0, step=0)


def arrays_config(**data):
    return config_from_dict({"model": {"name": "mlp"},
                             "data": {"kind": "arrays", "path": "x.npz", **data}})


def test_the_config_keys_are_checked():
    assert arrays_config().data.augment == [] and arrays_config().data.max_shift == 2
    assert arrays_config(augment="hflip, shift").data.augment == ["hflip", "shift"]  # --set
    with pytest.raises(ConfigError, match=r"data.augment: must be one of hflip, vflip, shift, "
                                          r"got 'hflp'; did you mean 'hflip'\?"):
        arrays_config(augment=["hflp"])
    with pytest.raises(ConfigError, match=r"data.max_shift: must be >= 0, got -1"):
        arrays_config(max_shift=-1)
    with pytest.raises(ConfigError, match=r"data.augment: .*data.kind 'text'"):
        config_from_dict({"data": {"kind": "text", "augment": ["hflip"]}})
