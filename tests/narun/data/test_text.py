import numpy as np
import pytest

from narun.data import ByteTokenizer, TextDataset, default_corpus
from narun.errors import ConfigError

T = 16


@pytest.fixture
def corpus(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, size=1000, dtype=np.uint8)
    path = tmp_path / "corpus.bin"
    path.write_bytes(raw.tobytes())
    return path, raw


def test_split_is_head_and_tail_with_the_right_sizes(corpus):
    path, raw = corpus
    train, val = TextDataset.splits(path, seq_len=T, val_fraction=0.1)
    np.testing.assert_array_equal(train.data, raw[:900])
    np.testing.assert_array_equal(val.data, raw[900:])
    assert (len(train), len(val)) == (900 - T, 100 - T)


def test_windows_match_the_corpus_and_y_is_x_shifted(corpus):
    path, raw = corpus
    ds = TextDataset(path, seq_len=T, val_fraction=0.1, split="val")
    x, y = ds.sample_batch(32, np.random.default_rng(5))
    offsets = np.random.default_rng(5).integers(0, len(ds), size=32)
    expect = raw[900 + offsets[:, None] + np.arange(T + 1)]
    assert x.dtype == y.dtype == np.int64 and x.shape == y.shape == (32, T)
    np.testing.assert_array_equal(x, expect[:, :-1])
    np.testing.assert_array_equal(y, expect[:, 1:])
    assert x.flags.c_contiguous and y.flags.c_contiguous


def test_window_bounds(corpus):
    path, raw = corpus
    ds = TextDataset(path, seq_len=T, val_fraction=0.1)
    x, y = ds.batch(np.array([0, len(ds) - 1]))
    np.testing.assert_array_equal(x[0], raw[:T])
    assert y[1, -1] == raw[899]  # the last window ends on the last train token, not beyond
    with pytest.raises(IndexError, match=r"\[0, 884\)"):
        ds.batch(np.array([len(ds)]))
    offsets = np.random.default_rng(1).integers(0, len(ds), size=10_000)
    assert offsets.max() + T + 1 <= len(ds.data)


def test_sampling_is_deterministic_for_a_seed(corpus):
    ds = TextDataset(corpus[0], seq_len=T)
    a = ds.sample_batch(8, np.random.default_rng(3))
    b = ds.sample_batch(8, np.random.default_rng(3))
    c = ds.sample_batch(8, np.random.default_rng(4))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_eval_batches_predict_every_token_once_in_order(corpus):
    path, raw = corpus
    val = TextDataset(path, seq_len=T, val_fraction=0.2, split="val")  # 200 tokens
    batches = list(val.iter_eval_batches(batch_size=5))
    assert [len(x) for x, _ in batches] == [5, 5, 2]  # offsets 0,16,...,176
    x = np.concatenate([b[0] for b in batches]).reshape(-1)
    y = np.concatenate([b[1] for b in batches]).reshape(-1)
    np.testing.assert_array_equal(x, raw[800:800 + 12 * T])
    np.testing.assert_array_equal(y, raw[801:801 + 12 * T])
    again = list(val.iter_eval_batches(batch_size=5, max_batches=2))
    assert len(again) == 2 and np.array_equal(again[1][1], batches[1][1])


def test_val_fraction_zero_keeps_everything_for_train(corpus):
    path, raw = corpus
    assert len(TextDataset(path, seq_len=T, val_fraction=0.0).data) == len(raw)
    with pytest.raises(ConfigError, match="split 'val'.*0 tokens"):
        TextDataset(path, seq_len=T, val_fraction=0.0, split="val")


def test_errors_name_the_key(corpus, tmp_path):
    with pytest.raises(ConfigError, match="data.seq_len.*fewer than seq_len"):
        TextDataset(corpus[0], seq_len=2000)
    with pytest.raises(ConfigError, match="data.path: no such file .*missing.txt"):
        TextDataset(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="data.val_fraction"):
        TextDataset(corpus[0], val_fraction=1.0)
    with pytest.raises(ConfigError, match="data.seq_len"):
        TextDataset(corpus[0], seq_len=0)


def test_default_corpus_is_cpython_docs_text():
    from pydoc_data.topics import topics

    raw = default_corpus()
    # 0.46 MB on CPython 3.11; the topics grew in later versions
    assert len(raw) > 400_000
    assert raw == "".join(topics[k] for k in sorted(topics)).encode("utf-8")
    train, val = TextDataset.splits(seq_len=128, val_fraction=0.05)
    assert len(train.data) + len(val.data) == len(raw)
    assert abs(len(val.data) - 0.05 * len(raw)) <= 1
    text = ByteTokenizer().decode(val.data)
    assert text == raw[len(train.data):].decode("utf-8", errors="replace")
