"""persistent_buffers / load_buffers: what a checkpoint keeps besides the parameters, read
and written in place (ps-sync's trainer 0 reports them, the coordinator loads them)."""

from __future__ import annotations

import numpy as np
import pytest

from narun import nn
from narun.errors import CheckpointError
from narun.nn.utils import load_buffers, persistent_buffers


def model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_persistent_buffers_are_the_state_dict_entries_that_are_not_parameters():
    m = model()
    assert sorted(persistent_buffers(m)) == ["1.num_batches_tracked", "1.running_mean",
                                             "1.running_var"]
    assert persistent_buffers(m)["1.running_mean"].data is m[1].running_mean.data  # shared


def test_load_buffers_copies_in_place_and_refuses_what_is_not_a_buffer():
    m = model()
    held = m[1].running_var.data
    load_buffers(m, {"1.running_var": np.full(4, 2.5, np.float32),
                     "1.num_batches_tracked": np.array(7)})
    assert m[1].running_var.data is held  # in place
    np.testing.assert_array_equal(held, np.full(4, 2.5, np.float32))
    assert int(m[1].num_batches_tracked.data) == 7
    with pytest.raises(CheckpointError, match=r"'0.weight' are not persistent buffers"):
        load_buffers(m, {"0.weight": np.zeros((4, 3, 3, 3), np.float32)})
    with pytest.raises(CheckpointError, match="size mismatch for 1.running_mean"):
        load_buffers(m, {"1.running_mean": np.zeros(5, np.float32)})
