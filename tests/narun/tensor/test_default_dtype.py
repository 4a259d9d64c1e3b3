import numpy as np
import pytest

import narun


@pytest.fixture
def restore_default_dtype():
    before = narun.get_default_dtype()
    yield
    narun.set_default_dtype(before)


def test_the_default_is_float32():
    assert narun.get_default_dtype() == np.float32
    assert narun.tensor([1.5]).dtype == np.float32


@pytest.mark.parametrize("dtype", [narun.float64, "float16", np.float64])
def test_python_floats_and_factories_follow_the_default(restore_default_dtype, dtype):
    narun.set_default_dtype(dtype)
    want = np.dtype(dtype)
    from narun.tensor import DEFAULT_DTYPE  # read now: it follows the setting

    assert narun.get_default_dtype() == want == DEFAULT_DTYPE
    made = [narun.tensor([1.5, 2.0]), narun.tensor(3.0), narun.zeros(2), narun.ones(2, 3),
            narun.empty(1), narun.full((2,), 0.5), narun.randn(3), narun.rand(3),
            narun.arange(0.0, 1.0, 0.25), narun.nn.Linear(2, 3).weight]
    assert [t.dtype for t in made] == [want] * len(made)
    # integers, bools and NumPy arrays keep their own dtype; an explicit dtype wins
    assert narun.tensor([1, 2]).dtype == np.int64 and narun.arange(3).dtype == np.int64
    assert narun.tensor(np.zeros(2, np.float32)).dtype == np.float32
    assert narun.zeros(2, dtype="float32").dtype == np.float32


@pytest.mark.parametrize("bad", ["int64", narun.bool_, np.complex64, "nope", None])
def test_only_floating_dtypes_can_be_the_default(restore_default_dtype, bad):
    with pytest.raises(TypeError, match=r"only floating dtypes .*float16, float32, float64"):
        narun.set_default_dtype(bad)
    assert narun.get_default_dtype() == np.float32
