import numpy as np
import pytest

import narun
from narun.errors import ShapeError
from narun.tensor import linear
from tests.opcheck import HAS_TORCH, check_op

if HAS_TORCH:
    import torch

rng = np.random.default_rng(1)


@pytest.mark.parametrize("dim,keepdim", [(None, False), (0, False), (1, True), ((0, 2), False),
                                         (-1, True)])
def test_sum_mean(dim, keepdim):
    x = rng.standard_normal((3, 4, 5))
    check_op(lambda t: t.sum(dim, keepdim=keepdim), lambda a: a.sum(axis=dim, keepdims=keepdim),
             [x], torch_fn=(lambda t: t.sum(dim, keepdim=keepdim) if dim is not None
                            else t.sum()))
    check_op(lambda t: t.mean(dim, keepdim=keepdim),
             lambda a: a.mean(axis=dim, keepdims=keepdim), [x],
             torch_fn=(lambda t: t.mean(dim, keepdim=keepdim) if dim is not None
                       else t.mean()))


@pytest.mark.parametrize("dim,correction", [(None, 1), (1, 0), ((0, 1), 1)])
def test_var(dim, correction):
    x = rng.standard_normal((4, 5))
    check_op(lambda t: t.var(dim, correction=correction),
             lambda a: a.var(axis=dim, ddof=correction), [x],
             torch_fn=lambda t: t.var(dim, correction=correction))


@pytest.mark.parametrize("op", ["max", "min"])
def test_max_min(op):
    x = rng.permutation(60).reshape(3, 4, 5).astype(np.float64) / 7  # distinct values
    ref = getattr(np, op)
    check_op(lambda t: getattr(t, op)(), lambda a: ref(a), [x],
             torch_fn=lambda t: getattr(t, op)())
    check_op(lambda t: getattr(t, op)(1).values, lambda a: ref(a, axis=1), [x],
             torch_fn=lambda t: getattr(t, op)(1).values)
    check_op(lambda t: getattr(t, op)(-1, keepdim=True)[0],
             lambda a: ref(a, axis=-1, keepdims=True), [x])
    idx = getattr(narun.tensor(x), op)(2).indices.numpy()
    np.testing.assert_array_equal(idx, getattr(np, "arg" + op)(x, axis=2))


def test_max_ties_share_gradient_evenly():
    x = narun.tensor([1.0, 3.0, 3.0], requires_grad=True)
    x.max().backward()
    np.testing.assert_allclose(x.grad.numpy(), [0, 0.5, 0.5])


def test_reshape_view_flatten_squeeze_unsqueeze():
    x = rng.standard_normal((2, 3, 4))
    check_op(lambda t: t.reshape(4, 6), lambda a: a.reshape(4, 6), [x])
    check_op(lambda t: t.view(-1, 2), lambda a: a.reshape(-1, 2), [x])
    check_op(lambda t: t.flatten(1), lambda a: a.reshape(2, 12), [x])
    check_op(lambda t: t.unsqueeze(1).unsqueeze(-1).squeeze(1),
             lambda a: a[..., None], [x])
    check_op(lambda t: t.reshape(2, 1, 3, 4).squeeze(), lambda a: a, [x])
    with pytest.raises(ShapeError, match="reshape"):
        narun.tensor(x).reshape(5, 5)


def test_permute_transpose_expand():
    x = rng.standard_normal((2, 3, 4))
    check_op(lambda t: t.permute(2, 0, 1), lambda a: a.transpose(2, 0, 1), [x],
             torch_fn=lambda t: t.permute(2, 0, 1))
    check_op(lambda t: t.transpose(0, -1), lambda a: a.swapaxes(0, -1), [x])
    check_op(lambda t: t.T, lambda a: a.T, [x])
    y = rng.standard_normal((3, 1))
    check_op(lambda t: t.expand(2, 3, 4), lambda a: np.broadcast_to(a, (2, 3, 4)), [y],
             torch_fn=lambda t: t.expand(2, 3, 4))
    check_op(lambda t: t.expand(-1, 5), lambda a: np.broadcast_to(a, (3, 5)), [y])
    with pytest.raises(ShapeError, match="permutation"):
        narun.tensor(x).permute(0, 0, 1)


@pytest.mark.parametrize("index", [
    1, (slice(None), 2), (Ellipsis, slice(1, 3)), (slice(None, None, -1),), (0, None, 1),
])
def test_getitem_basic(index):
    x = rng.standard_normal((3, 4, 5))
    check_op(lambda t: t[index], lambda a: a[index], [x])


def test_getitem_advanced_with_repeats():
    x = rng.standard_normal((5, 3))
    idx = np.array([0, 2, 2, 4, 0])
    check_op(lambda t: t[idx], lambda a: a[idx], [x], torch_fn=lambda t: t[idx])
    mask = x > 0
    check_op(lambda t: t[mask], lambda a: a[mask], [x])
    check_op(lambda t: t[narun.tensor(idx), 1:], lambda a: a[idx, 1:], [x])


def test_cat_stack_split_chunk():
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((2, 5))
    check_op(lambda x, y: narun.cat([x, y], dim=1), lambda x, y: np.concatenate([x, y], 1),
             [a, b], torch_fn=lambda x, y: torch.cat([x, y], 1))
    c = rng.standard_normal((2, 3))
    check_op(lambda x, y: narun.stack([x, y], dim=1), lambda x, y: np.stack([x, y], 1), [a, c],
             torch_fn=lambda x, y: torch.stack([x, y], 1))
    x = rng.standard_normal((7, 4))
    check_op(lambda t: t.split(3), lambda a: (a[:3], a[3:6], a[6:]), [x],
             torch_fn=lambda t: t.split(3))
    check_op(lambda t: t.split([1, 3], dim=1), lambda a: (a[:, :1], a[:, 1:]), [x])
    check_op(lambda t: t.chunk(2, dim=1), lambda a: (a[:, :2], a[:, 2:]), [x],
             torch_fn=lambda t: t.chunk(2, dim=1))
    # a piece that is never used still gets a zero gradient where it was
    t = narun.tensor(x, requires_grad=True)
    t.chunk(2, dim=1)[1].sum().backward()
    np.testing.assert_array_equal(t.grad.numpy(), np.repeat([[0, 0, 1, 1]], 7, 0))
    with pytest.raises(ShapeError, match="add up"):
        narun.tensor(x).split([2, 2])


def test_where_masked_fill():
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4,))
    cond = rng.standard_normal((3, 4)) > 0
    check_op(lambda x, y: narun.where(narun.tensor(cond), x, y), lambda x, y: np.where(cond, x, y),
             [a, b], torch_fn=lambda x, y: torch.where(torch.tensor(cond), x, y))
    mask = rng.standard_normal((1, 4)) > 0
    check_op(lambda x: x.masked_fill(narun.tensor(mask), -5.0),
             lambda x: np.where(mask, -5.0, x), [a],
             torch_fn=lambda x: x.masked_fill(torch.tensor(mask), -5.0))


@pytest.mark.parametrize("sa,sb", [
    ((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (5, 4, 2)),
    ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)), ((2, 3, 4), (4,)), ((4,), (2, 4, 3)),
])
def test_matmul(sa, sb):
    a, b = rng.standard_normal(sa), rng.standard_normal(sb)
    check_op(lambda x, y: x @ y, np.matmul, [a, b], torch_fn=lambda x, y: torch.matmul(x, y))


def test_matmul_errors_name_shapes():
    with pytest.raises(ShapeError, match=r"\(3, 4\) @ \(5, 2\)"):
        narun.randn(3, 4) @ narun.randn(5, 2)


@pytest.mark.parametrize("xs,bias", [((5, 4), True), ((2, 3, 4), True), ((3, 4), False)])
def test_linear(xs, bias):
    x, w, b = rng.standard_normal(xs), rng.standard_normal((6, 4)), rng.standard_normal(6)
    inputs = [x, w, b] if bias else [x, w]
    check_op(linear,
             lambda x, w, b=None: x @ w.T + (0 if b is None else b), inputs,
             torch_fn=lambda *a: torch.nn.functional.linear(*a))


def test_linear_with_empty_dims_gives_zeros_like_torch():
    out = linear(narun.tensor(np.zeros((2, 0), np.float32)),
                 narun.tensor(np.zeros((3, 0), np.float32)))
    np.testing.assert_array_equal(out.numpy(), np.zeros((2, 3), np.float32))
    assert linear(narun.randn(0, 4), narun.randn(5, 4)).shape == (0, 5)
