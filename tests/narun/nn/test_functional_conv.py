import numpy as np
import pytest

import narun
from narun.errors import ConfigError, ShapeError
from narun.nn import functional as F
from tests.opcheck import HAS_TORCH, check_op

if HAS_TORCH:
    import torch.nn.functional as TF


def np_conv2d(x, w, b=None, stride=(1, 1), pad=(0, 0, 0, 0), dil=(1, 1)):
    """Direct loops over output pixels (independent of im2col)."""
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), pad[:2], pad[2:]))
    Ho = (xp.shape[2] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (xp.shape[3] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((N, O, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            r, c = i * stride[0], j * stride[1]
            patch = xp[:, :, r:r + dil[0] * (kh - 1) + 1:dil[0], c:c + dil[1] * (kw - 1) + 1:dil[1]]
            out[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3]))
    return out if b is None else out + b[:, None, None]


def np_pool(x, k, s, p, kind, count_include_pad=True, dil=(1, 1)):
    N, C, H, W = x.shape
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])), constant_values=fill)
    real = np.pad(np.ones((H, W)), ((p[0], p[0]), (p[1], p[1])))
    Ho = (xp.shape[2] - dil[0] * (k[0] - 1) - 1) // s[0] + 1
    Wo = (xp.shape[3] - dil[1] * (k[1] - 1) - 1) // s[1] + 1
    out = np.zeros((N, C, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            rs = slice(i * s[0], i * s[0] + dil[0] * (k[0] - 1) + 1, dil[0])
            cs = slice(j * s[1], j * s[1] + dil[1] * (k[1] - 1) + 1, dil[1])
            win = xp[:, :, rs, cs]
            if kind == "max":
                out[:, :, i, j] = win.max(axis=(2, 3))
            else:
                n = k[0] * k[1] if count_include_pad else real[rs, cs].sum()
                out[:, :, i, j] = win.sum(axis=(2, 3)) / n
    return out


@pytest.mark.parametrize("stride,padding,dilation", [
    (1, 0, 1), (2, 1, 1), ((1, 2), (2, 0), 1), (1, 1, 2)])
def test_conv2d(stride, padding, dilation):
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((4, 3, 3, 2)),
               rng.standard_normal(4))
    st = (stride, stride) if isinstance(stride, int) else stride
    pd = (padding, padding) if isinstance(padding, int) else padding
    dl = (dilation, dilation)
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    check_op(lambda a, c, d: F.conv2d(a, c, d, **kw),
             lambda a, c, d: np_conv2d(a, c, d, st, (pd[0], pd[0], pd[1], pd[1]), dl),
             [x, w, b], torch_fn=lambda a, c, d: TF.conv2d(a, c, d, **kw))


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on its own copy
def test_conv2d_same_padding_even_kernel_and_unbatched_input_without_bias():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 5, 4)), rng.standard_normal((3, 2, 2, 3))
    # even kernel height: torch pads 0 rows on top and 1 below
    check_op(lambda a, c: F.conv2d(a, c, padding="same"),
             lambda a, c: np_conv2d(a[None], c, pad=(0, 1, 1, 1))[0], [x, w],
             torch_fn=lambda a, c: TF.conv2d(a, c, padding="same"))


def test_conv2d_float32_and_errors():
    rng = np.random.default_rng(2)
    x = narun.tensor(rng.standard_normal((1, 2, 5, 5)).astype(np.float32), requires_grad=True)
    w = narun.tensor(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), requires_grad=True)
    out = F.conv2d(x, w, padding=1)
    out.sum().backward()
    assert out.dtype == x.grad.dtype == w.grad.dtype == np.float32
    with pytest.raises(ShapeError, match="expected"):
        F.conv2d(x, narun.tensor(np.ones((3, 4, 3, 3), np.float32)))
    with pytest.raises(ConfigError, match="stride 1"):
        F.conv2d(x, w, stride=2, padding="same")
    with pytest.raises(ShapeError, match="does not fit"):
        F.conv2d(x, narun.tensor(np.ones((3, 2, 7, 7), np.float32)))


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (2, None, 0, 1), (3, 1, 1, 1), ((3, 2), (2, 1), (1, 0), 1), (2, 1, 0, 2)])
def test_max_pool2d_overlapping_windows(kernel, stride, padding, dilation):
    rng = np.random.default_rng(3)
    x = rng.permutation(2 * 2 * 6 * 6).reshape(2, 2, 6, 6) / 7.0  # distinct: no ties
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    s = k if stride is None else ((stride, stride) if isinstance(stride, int) else stride)
    p = (padding, padding) if isinstance(padding, int) else padding
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    check_op(lambda a: F.max_pool2d(a, kernel, **kw),
             lambda a: np_pool(a, k, s, p, "max", dil=(dilation, dilation)), [x],
             torch_fn=lambda a: TF.max_pool2d(a, kernel, **kw))


@pytest.mark.parametrize("x,grad", [
    ([[1.0, 3.0, 3.0], [0.0, 3.0, 2.0]], [[0, 2, 0], [0, 0, 0]]),
    ([[1.0, 2.0, 3.0], [3.0, 3.0, 2.0]], [[0, 0, 1], [1, 0, 0]])])
def test_max_pool2d_gradient_goes_to_the_first_maximum_of_a_tie(x, grad):
    # Windows overlap (stride 1) and hold ties; torch picks the first maximum, row-major.
    t = narun.tensor(np.array(x)[None, None], requires_grad=True)
    F.max_pool2d(t, 2, stride=1).sum().backward()
    np.testing.assert_array_equal(t.grad.numpy()[0, 0], grad)


@pytest.mark.parametrize("kernel,stride,padding,include", [
    (2, None, 0, True), (3, 1, 1, True), (3, 2, 1, False), ((2, 3), 1, (1, 1), False)])
def test_avg_pool2d(kernel, stride, padding, include):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2, 5, 6))
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    s = k if stride is None else (stride, stride)
    p = (padding, padding) if isinstance(padding, int) else padding
    kw = dict(stride=stride, padding=padding, count_include_pad=include)
    check_op(lambda a: F.avg_pool2d(a, kernel, **kw),
             lambda a: np_pool(a, k, s, p, "avg", include), [x],
             torch_fn=lambda a: TF.avg_pool2d(a, kernel, **kw))


def test_avg_pool2d_divisor_override_and_unbatched():
    x = np.random.default_rng(5).standard_normal((3, 4, 4))
    check_op(lambda a: F.avg_pool2d(a, 2, divisor_override=3),
             lambda a: np_pool(a[None], (2, 2), (2, 2), (0, 0), "avg")[0] * 4 / 3, [x],
             torch_fn=lambda a: TF.avg_pool2d(a, 2, divisor_override=3))


def test_pool_errors():
    x = narun.tensor(np.ones((1, 1, 4, 4)))
    with pytest.raises(ConfigError, match="padding"):
        F.max_pool2d(x, 2, padding=2)
    with pytest.raises(ShapeError, match="4-d"):
        F.avg_pool2d(narun.tensor(np.ones(4)), 2)
