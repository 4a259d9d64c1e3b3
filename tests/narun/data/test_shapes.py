"""The rendered shapes image set: labels, captions and pixels agree with what is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from narun import cli
from narun.data import ArrayDataset, class_prompts, make_shapes_npz, render_shapes
from narun.data._shapes import CLASSES, COLORS
from narun.errors import ConfigError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes") / "shapes.npz"
    make_shapes_npz(path, n=512, size=32, seed=3)
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _runs(v: np.ndarray) -> int:
    """Number of runs of True in a 1-d bool array."""
    return int(np.sum(np.diff(np.concatenate([[0], v.astype(np.int8), [0]])) == 1))


def _box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def test_arrays_shapes_dtypes_balance(shapes):
    x, y = shapes["x"], shapes["y"]
    assert x.shape == (512, 3, 32, 32) and x.dtype == np.float32
    assert y.shape == (512,) and y.dtype == np.int64
    assert np.bincount(y, minlength=4).tolist() == [128] * 4
    assert y[:16].tolist() != sorted(y[:16].tolist())  # rows shuffled
    assert shapes["classes"].tolist() == list(CLASSES)
    for key in ("captions", "colors", "sizes", "classes", "prompts"):
        assert shapes[key].dtype.kind == "U"  # fixed-width unicode, never objects
    # standardised per channel; the stored statistics undo it into [0, 1]
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=(0, 2, 3)), 1.0, atol=1e-3)
    raw = x * shapes["std"][None, :, None, None] + shapes["mean"][None, :, None, None]
    assert raw.min() > -1e-4 and raw.max() < 1 + 1e-4


def test_deterministic_per_seed(tmp_path):
    a, b, c = (make_shapes_npz(tmp_path / name, n=32, seed=s)
               for name, s in (("a", 1), ("b", 1), ("c", 2)))
    assert a.name == "a"  # no ".npz" appended
    with np.load(a) as fa, np.load(b) as fb, np.load(c) as fc:
        for k in fa.files:
            np.testing.assert_array_equal(fa[k], fb[k])
        assert not np.array_equal(fa["x"], fc["x"])
        assert not np.array_equal(fa["captions"], fc["captions"])


def test_masks_match_labels():
    """Each class is told apart by a NumPy statistic of the drawn mask."""
    r = render_shapes(n=400, size=32, seed=5)
    fill = {k: [] for k in range(4)}
    for m, label in zip(r["masks"], r["y"], strict=True):
        box = _box(m)
        runs = max(max(_runs(row) for row in box), max(_runs(col) for col in box.T))
        if label == CLASSES.index("stripes"):
            assert runs >= 3  # parallel bars alternate with gaps
        else:
            assert runs == 1  # solid shapes: one run per row and column
            fill[label].append(box.mean())  # area / bounding box
    circle, square, triangle = (np.array(fill[k]) for k in range(3))
    assert np.all(square == 1.0)
    assert np.all((circle > 0.65) & (circle < 0.93))
    assert abs(circle.mean() - np.pi / 4) < 0.05
    assert np.all(triangle < 0.65)
    assert abs(triangle.mean() - 0.5) < 0.06
    # shapes lie fully inside the image with a margin: the border pixels are background
    border = r["masks"][:, [0, -1], :].any() or r["masks"][:, :, [0, -1]].any()
    assert not border


def test_pixels_colours_and_captions():
    r = render_shapes(n=200, size=32, seed=7)
    images, masks = r["images"], r["masks"]
    for i in range(200):
        colour = np.array(COLORS[r["colors"][i]], dtype=np.float32)
        np.testing.assert_array_equal(images[i][:, masks[i]], np.repeat(
            colour[:, None], masks[i].sum(), axis=1))
        np.testing.assert_array_equal(images[i][:, ~masks[i]], np.repeat(
            r["background"][i][:, None], (~masks[i]).sum(), axis=1))
        assert np.abs(colour - r["background"][i]).max() >= 0.5  # background differs
        words = r["captions"][i].split()
        name = CLASSES[r["y"][i]]
        assert words[-1] == name and words[-2] == r["colors"][i]
        assert words[-3] == r["sizes"][i]
        assert words[0] == ("a" if name != "stripes" else r["sizes"][i])
    small = np.array([m.sum() for m, s in zip(masks, r["sizes"], strict=True) if s == "small"])
    large = np.array([m.sum() for m, s in zip(masks, r["sizes"], strict=True) if s == "large"])
    assert large.mean() > 2.5 * small.mean()


def test_prompts_are_every_caption_of_each_class(shapes, tmp_path):
    prompts = shapes["prompts"]
    assert prompts.shape == (4, 16) and len(set(prompts.ravel())) == 64
    assert prompts[0, 0] == "a small red circle" and prompts[3, -1] == "large orange stripes"
    for caption, y in zip(shapes["captions"], shapes["y"], strict=True):
        assert caption in prompts[y]  # every caption is one of its own class's prompts
    np.testing.assert_array_equal(class_prompts(make_shapes_npz(tmp_path / "s.npz", n=8)),
                                  prompts)
    only_names = tmp_path / "names.npz"
    np.savez(only_names, x=shapes["x"], classes=shapes["classes"])
    assert class_prompts(only_names).tolist() == [[c] for c in CLASSES]
    np.savez(only_names, x=shapes["x"])
    with pytest.raises(ConfigError, match="no array `prompts` or `classes`"):
        class_prompts(only_names)


def test_noisy_pixels_keep_the_shape(tmp_path):
    """The stored x, un-standardised, is the clean rendering plus ~0.1 noise."""
    path = make_shapes_npz(tmp_path / "s.npz", n=64, seed=11)
    r = render_shapes(n=64, seed=11)
    with np.load(path) as f:
        raw = f["x"] * f["std"][None, :, None, None] + f["mean"][None, :, None, None]
        captions = f["captions"]
    np.testing.assert_array_equal(captions, r["captions"])
    diff = raw - r["images"]
    assert 0.05 < diff.std() < 0.11  # std 0.1 noise, less where clipping to [0, 1] bites
    # thresholding against the background recovers the shape's mask
    dist = np.abs(raw - r["background"][:, :, None, None]).max(axis=1)
    agree = ((dist > 0.35) == r["masks"]).mean()
    assert agree > 0.95


def test_array_dataset_loads_it(shapes, tmp_path):
    path = make_shapes_npz(tmp_path / "s.npz", n=100)
    train = ArrayDataset(path, names=("x", "y"), val_fraction=0.2, split="train")
    val = ArrayDataset(path, names=("x", "y"), val_fraction=0.2, split="val")
    assert len(train) == 80 and len(val) == 20
    x, y = train.batch(np.array([0, 3, 5]))
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.float32 and y.dtype == np.int64


def test_cli_writes_a_loadable_file(tmp_path, capsys):
    path = tmp_path / "sub" / "shapes.npz"
    assert cli.main(["data", "shapes", str(path), "--n", "64", "--size", "24"]) == 0
    assert str(path) in capsys.readouterr().out
    ds = ArrayDataset(path, names=("x", "y"), val_fraction=0.25, split="train")
    assert len(ds) == 48 and ds.arrays["x"].shape[1:] == (3, 24, 24)
    assert cli.main(["data", "shapes", str(path), "--size", "8"]) == 2  # a ConfigError
    assert "data shapes: make_shapes_npz: size must be >= 16" in capsys.readouterr().err


@pytest.mark.parametrize(("kwargs", "name"), [({"n": 0}, "n"), ({"size": 15}, "size")])
def test_bad_arguments(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name} must be"):
        make_shapes_npz(tmp_path / "x.npz", **kwargs)
    with pytest.raises(ValueError, match=rf"\b{name} must be"):
        render_shapes(**kwargs)
