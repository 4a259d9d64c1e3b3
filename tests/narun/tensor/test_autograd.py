import numpy as np
import pytest

import narun
from narun.errors import DeviceError, GradError
from narun.tensor._tensor import make
from tests.opcheck import check_op


def test_chain_rule_through_a_shared_subexpression():
    x = narun.tensor([0.5, -1.0, 2.0], dtype="float64", requires_grad=True)
    y = x * x
    z = (y + y.exp() * x).sum()
    z.backward()
    xv = np.array([0.5, -1.0, 2.0])
    np.testing.assert_allclose(x.grad.numpy(),
                               2 * xv + np.exp(xv**2) * (2 * xv * xv + 1), rtol=1e-12)


def test_gradients_accumulate_across_backward_calls():
    w = narun.tensor([1.0, 2.0], requires_grad=True)
    (w * 3).sum().backward()
    (w * w).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), [3 + 2, 3 + 4])


def test_a_0d_leaf_used_twice_gets_both_gradients():
    # NumPy returns scalars, not 0-d arrays, from 0-d arithmetic: they must still add up
    x = narun.tensor(2.0, dtype="float64", requires_grad=True)
    (x.exp() + x.exp()).backward()
    assert isinstance(x.grad.numpy(), np.ndarray)
    assert x.grad.item() == pytest.approx(2 * np.exp(2.0), rel=1e-12)


def test_pass_through_gradients_are_not_aliased_between_leaves():
    a = narun.tensor([1.0, 2.0], requires_grad=True)
    b = narun.tensor([3.0, 4.0], requires_grad=True)
    (a + b).sum().backward()
    assert not np.shares_memory(a.grad.numpy(), b.grad.numpy())
    (a * 2).sum().backward()  # accumulates into a.grad in place; b.grad must not move
    np.testing.assert_array_equal(a.grad.numpy(), [3, 3])
    np.testing.assert_array_equal(b.grad.numpy(), [1, 1])


def test_view_gradient_is_copied_into_the_leaf():
    a = narun.tensor(np.ones((2, 3)), requires_grad=True)
    a.T.sum().backward()
    assert a.grad.numpy().flags.c_contiguous
    np.testing.assert_array_equal(a.grad.numpy(), np.ones((2, 3)))


def test_second_backward_through_freed_graph_is_refused():
    x = narun.tensor([1.0], requires_grad=True)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(GradError, match="second time"):
        y.backward()
    x2 = narun.tensor([1.0], requires_grad=True)
    y2 = (x2 * x2).sum()
    y2.backward(retain_graph=True)
    y2.backward()
    np.testing.assert_array_equal(x2.grad.numpy(), [4.0])


def test_backward_needs_a_scalar_or_a_gradient():
    x = narun.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(GradError, match="one-element"):
        (x * 2).backward()
    (x * 2).backward(narun.tensor([1.0, 10.0]))
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 20.0])
    with pytest.raises(GradError, match="does not require grad"):
        narun.tensor([1.0]).sum().backward()


def test_no_grad_records_nothing_and_nests():
    x = narun.tensor([1.0], requires_grad=True)
    with narun.no_grad():
        y = x * 2
        with narun.enable_grad():
            z = x * 3
    assert not y.requires_grad and y.grad_fn is None
    assert z.requires_grad and z.grad_fn == "mul"
    assert narun.is_grad_enabled()

    @narun.no_grad()
    def f(t):
        return t * 2

    assert not f(x).requires_grad


def test_detach_and_integer_tensors():
    x = narun.tensor([1.0, 2.0], requires_grad=True)
    d = (x * 2).detach()
    assert not d.requires_grad and d.is_leaf
    with pytest.raises(GradError, match="floating-point"):
        narun.tensor([1, 2], requires_grad=True)


def test_unused_branch_and_none_gradients():
    a = narun.tensor([1.0, 2.0], requires_grad=True)
    b = narun.tensor([5.0, 6.0], requires_grad=True)
    (a * 2).sum().backward()
    assert b.grad is None


def test_broken_backward_contract_is_reported_with_the_op_name():
    x = narun.tensor([1.0], requires_grad=True)
    y = make(x.data * 2, (x,), lambda g: (g, g), "broken_op")
    with pytest.raises(GradError, match="broken_op: backward returned 2 gradients for 1"):
        y.sum().backward()


def test_post_accumulate_hooks_fire_last_layer_first():
    w1 = narun.tensor(np.ones((3, 3)), requires_grad=True)
    w2 = narun.tensor(np.ones((3, 3)), requires_grad=True)
    order = []
    w1.register_post_accumulate_grad_hook(lambda t: order.append("w1"))
    w2.register_post_accumulate_grad_hook(lambda t: order.append("w2"))
    x = narun.tensor(np.ones((2, 3)))
    ((x @ w1).relu() @ w2).sum().backward()
    assert order == ["w2", "w1"]


def test_retain_grad_on_intermediate():
    x = narun.tensor([1.0, 2.0], requires_grad=True)
    y = x * 3
    y.retain_grad()
    (y * y).sum().backward()
    np.testing.assert_allclose(y.grad.numpy(), [6.0, 12.0])
    np.testing.assert_allclose(x.grad.numpy(), [18.0, 36.0])


def test_inplace_operators_are_refused_with_advice():
    x = narun.tensor([1.0])
    with pytest.raises(TypeError, match="no_grad"):
        x += 1


def test_unknown_and_unavailable_devices():
    with pytest.raises(DeviceError, match="unknown device"):
        narun.tensor([1.0], device="tpu")
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(DeviceError, match="CuPy"):
            narun.tensor([1.0]).to("cuda")


def test_tensor_factory_dtypes_and_copy():
    a = np.arange(3, dtype=np.float64)
    t = narun.tensor(a)
    assert t.dtype == np.float64
    a[0] = 99
    assert t.numpy()[0] == 0  # copied
    assert narun.tensor([1.5]).dtype == np.float32
    assert narun.tensor([1, 2]).dtype == np.int64
    assert narun.tensor(2.5).item() == 2.5
    narun.manual_seed(3)
    r1 = narun.randn(4).numpy()
    narun.manual_seed(3)
    np.testing.assert_array_equal(r1, narun.randn(4).numpy())


def test_check_op_catches_a_wrong_gradient_and_a_wrong_forward():
    def wrong_grad(t):
        return make(t.data * 2, (t,), lambda g: (g * 2.001,), "wrong")

    with pytest.raises(AssertionError, match="central differences"):
        check_op(wrong_grad, lambda a: a * 2, [np.ones(3)])
    with pytest.raises(AssertionError, match="forward differs"):
        check_op(lambda t: t * 2, lambda a: a * 2.0001, [np.ones(3)])


@pytest.mark.cuda
def test_mixing_devices_names_both_and_moves_are_differentiable():
    cupy = pytest.importorskip("cupy", reason="needs CuPy")
    if cupy.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("needs a CUDA GPU")
    from narun.errors import DeviceMismatchError

    a = narun.tensor([1.0, 2.0], requires_grad=True)
    g = a.to("cuda")
    assert g.device == "cuda:0"
    with pytest.raises(DeviceMismatchError, match="cpu.*cuda:0|cuda:0.*cpu"):
        a + g
    (g * g).sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), [2.0, 4.0])
