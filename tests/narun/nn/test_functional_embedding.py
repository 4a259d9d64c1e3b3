import numpy as np
import pytest

import narun
from narun.errors import ConfigError
from narun.nn import functional as F
from narun.nn.functional._embedding import _row_sums
from tests.opcheck import HAS_TORCH, check_op

if HAS_TORCH:
    import torch.nn.functional as TF


def test_embedding_with_repeated_indices():
    rng = np.random.default_rng(0)
    idx = np.array([[1, 2, 1, 5], [5, 5, 0, 1]])  # repeats must accumulate
    w = rng.standard_normal((6, 3))
    check_op(F.embedding, lambda i, weight: weight[i], [idx, w],
             torch_fn=lambda i, weight: TF.embedding(i, weight))


@pytest.mark.parametrize("padding_idx", [2, -1])
def test_padding_row_gets_no_gradient(padding_idx):
    # Not a finite-difference check: the padding row is read but, by definition (torch's),
    # gets no gradient.
    idx = np.array([3, 0, 3, 2, 2])
    w = narun.tensor(np.ones((4, 2)), requires_grad=True)
    F.embedding(narun.tensor(idx), w, padding_idx=padding_idx).sum().backward()
    expected = np.array([[1, 1], [0, 0], [2, 2], [2, 2]], dtype=float)
    expected[padding_idx] = 0
    np.testing.assert_array_equal(w.grad.numpy(), expected)


@pytest.mark.parametrize("dist", ["uniform", "skewed", "unique", "one"])
def test_row_sums_match_add_at(dist):
    rng = np.random.default_rng(1)
    V, M = 50, 300
    idx = {"uniform": rng.integers(0, V, M),
           "skewed": np.minimum(rng.zipf(1.3, M) - 1, V - 1),  # one index repeats a lot
           "unique": rng.permutation(V)[:40],
           "one": np.full(M, 7)}[dist]
    g = rng.standard_normal((idx.size, 4))
    expected = np.zeros((V, 4))
    np.add.at(expected, idx, g)
    np.testing.assert_allclose(_row_sums(np, idx, g, V), expected, rtol=1e-12, atol=1e-12)


def test_embedding_float32_and_index_errors():
    w = narun.tensor(np.ones((5, 3), np.float32), requires_grad=True)
    out = F.embedding(np.array([[0, 4], [4, 4]]), w)
    assert out.shape == (2, 2, 3)
    out.sum().backward()
    assert w.grad.dtype == np.float32
    np.testing.assert_array_equal(w.grad.numpy()[:, 0], [1, 0, 0, 0, 3])
    with pytest.raises(IndexError, match="index 5 is out of range for 5"):
        F.embedding(np.array([5]), w)
    with pytest.raises(IndexError, match="index -1"):
        F.embedding(np.array([-1]), w)
    with pytest.raises(ConfigError, match="padding_idx 5"):
        F.embedding(np.array([0]), w, padding_idx=5)
