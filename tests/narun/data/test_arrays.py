import numpy as np
import pytest

from narun.data import ArrayDataset, load_arrays, make_classification_npz
from narun.errors import ConfigError


def test_blobs_are_separable_known_answer(tmp_path):
    path = make_classification_npz(tmp_path / "blobs.npz", n=1000, dim=8, classes=5, seed=3)
    train = ArrayDataset(path, val_fraction=0.2, split="train")
    val = ArrayDataset(path, val_fraction=0.2, split="val")
    assert (len(train), len(val)) == (800, 200)
    x, y = train.arrays["x"], train.arrays["y"]
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (800, 8)
    assert np.bincount(np.concatenate([y, val.arrays["y"]])).tolist() == [200] * 5
    assert (np.diff(y) < 0).any()  # rows are shuffled, not sorted by class
    # nearest class mean (fit on train) classifies held-out rows: the data are separable
    means = np.stack([x[y == c].mean(0) for c in range(5)])
    vx, vy = val[:]
    pred = np.argmin(((vx[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(pred == vy) >= 0.99


def test_same_seed_same_data(tmp_path):
    a = load_arrays(make_classification_npz(tmp_path / "a.npz", n=64, seed=1))
    b = load_arrays(make_classification_npz(tmp_path / "b.npz", n=64, seed=1))
    c = load_arrays(make_classification_npz(tmp_path / "c.npz", n=64, seed=2))
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], c["x"])


def test_npz_rows_batch_and_split(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    y = np.arange(10) * 7
    np.savez(tmp_path / "d.npz", x=x, y=y)
    train = ArrayDataset(tmp_path / "d.npz", val_fraction=0.3)
    val = ArrayDataset(tmp_path / "d.npz", val_fraction=0.3, split="val")
    assert train.names == ("x", "y") and len(train) == 7 and len(val) == 3
    bx, by = train.batch([6, 0])
    np.testing.assert_array_equal(bx, x[[6, 0]])
    np.testing.assert_array_equal(by, [42, 0])
    np.testing.assert_array_equal(val[0][1], y[7])
    only_y = ArrayDataset(tmp_path / "d.npz", names=("y",))
    assert only_y.names == ("y",)


def test_npy_is_named_x(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((5, 2)))
    ds = ArrayDataset(tmp_path / "a.npy")
    assert ds.names == ("x",) and len(ds) == 5


def test_bad_files_raise_config_errors(tmp_path):
    np.savez(tmp_path / "ragged.npz", x=np.zeros((4, 2)), y=np.zeros(3))
    with pytest.raises(ConfigError, match=r"share their first dimension.*x: \(4, 2\), y: \(3,\)"):
        ArrayDataset(tmp_path / "ragged.npz")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="cannot read .*obj.npy"):
        ArrayDataset(tmp_path / "obj.npy")
    with pytest.raises(ConfigError, match="no such file"):
        ArrayDataset(tmp_path / "nope.npz")
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)))
    with pytest.raises(ConfigError, match="no array named 'y' \\(it has: x\\)"):
        ArrayDataset(tmp_path / "d.npz", names=("x", "y"))
