"""Gradient checkpointing: the same values and gradients as the plain run (with dropout,
whose masks must be drawn again alike), less memory held between forward and backward."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import narun
from narun.models import GPT, gpt_config
from narun.nn import functional as F
from narun.utils import checkpoint


def test_values_and_gradients_are_the_plain_runs_with_dropout_and_plain_arguments():
    narun.manual_seed(0)
    lin = narun.nn.Linear(6, 5)
    x = narun.randn(3, 6, requires_grad=True)
    bias = narun.randn(5)  # a tensor input that needs no gradient

    def f(x, bias, scale):
        return F.dropout(lin(x).relu() + bias, 0.5, True) * scale

    runs = []
    for wrapped in (False, True):
        x.grad, lin.weight.grad, lin.bias.grad = None, None, None
        narun.manual_seed(1)
        y = checkpoint(f, x, bias, 3.0) if wrapped else f(x, bias, 3.0)
        (y * y).sum().backward()
        runs.append((y.data, x.grad.data, lin.weight.grad.data, lin.bias.grad.data))
    for plain, wrapped in zip(*runs):
        np.testing.assert_array_equal(wrapped, plain)
    assert bias.grad is None


def test_without_grad_it_is_just_the_call():
    lin = narun.nn.Linear(2, 2)
    with narun.no_grad():
        y = checkpoint(lin, narun.randn(1, 2, requires_grad=True))
    assert not y.requires_grad
    with pytest.raises(TypeError, match="must return a Tensor"):
        checkpoint(lambda x: (x, x), narun.randn(2, requires_grad=True))


def gpt_step(recompute: bool, dropout: float = 0.1) -> tuple[float, dict, int]:
    """Loss, gradients, and the peak of NumPy's allocations over forward + backward."""
    narun.manual_seed(0)
    model = GPT(gpt_config("gpt-modern-tiny", n_layer=4, block_size=64, dropout=dropout,
                           gradient_checkpointing=recompute)).train()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (8, 64)), rng.integers(0, 256, (8, 64))
    narun.manual_seed(5)
    tracemalloc.start()
    try:
        loss = model.loss(x, y)
        loss.backward()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return loss.item(), {n: p.grad.data for n, p in model.named_parameters()}, peak


def test_a_checkpointed_gpt_gives_the_same_gradients_with_less_memory():
    loss, grads, peak = gpt_step(recompute=False)
    loss_r, grads_r, peak_r = gpt_step(recompute=True)
    assert loss_r == loss
    for name in grads:
        np.testing.assert_array_equal(grads_r[name], grads[name], err_msg=name)
    # 4 blocks: each block's activations are held only while it is recomputed
    assert peak_r < 0.6 * peak, (peak_r, peak)
