"""Without torch, a comparison against it is reported as a skip with the reason, never a
silent pass (tests/conftest.py, opcheck.compare_with_torch). Runs a few real tests in a
pytest subprocess whose `import torch` fails as it does where torch is not installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import opcheck
from tests.opcheck import check_op

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_missing_torch_turns_each_comparison_into_a_visible_skip(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "torch.py").write_text(
        'raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n')
    tests = [
        # check_op with torch_fn, twice in one test: both checks still run
        "tests/narun/tensor/test_reduce_shape_matmul.py::test_max_min[max]",
        "tests/narun/nn/test_init.py::test_gain[tanh-None-1.6666666666666667]",  # inline
        "tests/narun/tensor/test_elementwise.py::test_comparisons_have_no_grad",  # no torch
        "tests/narun/optim/test_clip.py::test_clip_grad_norm_matches_torch[2.0]",  # skipif
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(hidden), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          *tests], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=100)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "1 passed, 3 skipped" in text, text
    missing = "torch is not installed (No module named 'torch'); not compared with torch: "
    other = "; the test's other checks passed"
    assert re.search(re.escape("test_reduce_shape_matmul.py:") + r"\d+: " + re.escape(
        missing + "check_op's forward and backward x2" + other), text), text
    assert re.search(re.escape("test_init.py:") + r"\d+: " + re.escape(missing + "gain" + other),
                     text), text


@pytest.mark.skipif(not opcheck.HAS_TORCH, reason="needs torch: checks that check_op "
                                                   "compares with it")
def test_an_op_without_gradients_is_still_compared_with_torch():
    """check_op used to return after finding no differentiable output, before comparing
    with torch: a wrong non-differentiable op matched any torch_fn."""
    x = np.array([[0.5, -1.0, 2.0], [3.0, 0.0, -2.0]])
    check_op(lambda a: a.argmax(-1), lambda a: a.argmax(-1), [x], grad=[False],
             torch_fn=lambda a: a.argmax(-1))
    with pytest.raises(AssertionError, match="forward differs from torch"):
        check_op(lambda a: a.argmax(-1), None, [x], grad=[False],
                 torch_fn=lambda a: a.argmin(-1))


@pytest.mark.skipif(not opcheck.HAS_MLX, reason="needs MLX: checks that check_op runs ops "
                                                "on mlx:cpu")
def test_an_op_that_differs_on_mlx_fails_check_op():
    """check_op runs every op on mlx:cpu too: a forward or a gradient that differs there
    from NumPy's fails, though NumPy's own checks pass."""
    x = np.array([[0.5, -1.0, 2.0], [3.0, 0.25, -2.0]])
    check_op(lambda a: a * 2.0, lambda a: a * 2.0, [x])

    def forward_off(a):
        return a * (2.0 + 1e-4 * (a.device == "mlx:cpu"))

    with pytest.raises(AssertionError, match="mlx:cpu float64 forward differs"):
        check_op(forward_off, lambda a: a * 2.0, [x])

    def backward_off(a):  # the same values, a gradient scaled by 1.001 on MLX only
        if a.device != "mlx:cpu":
            return a * 2.0
        return a * 2.002 - (a * 0.002).detach()

    with pytest.raises(AssertionError, match="mlx:cpu gradient of input 0 differs"):
        check_op(backward_off, lambda a: a * 2.0, [x])
