"""The engine can fit: a 2-layer transformer drives its loss to ~0 on one memorised batch."""

import numpy as np
import pytest

import narun
from narun.models import GPT, gpt_config


@pytest.mark.parametrize("preset", ["gpt2-tiny", "gpt-modern-tiny"])
def test_two_layer_transformer_memorises_a_batch(preset):
    narun.manual_seed(0)
    model = GPT(gpt_config(preset, n_layer=2, n_embd=32, n_head=2, block_size=16))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (4, 17))
    x, y = narun.tensor(tokens[:, :-1]), narun.tensor(tokens[:, 1:])
    opt = narun.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert first > 5.0  # random tokens start near log(256) = 5.55
    assert loss.item() < 0.05
    # and the memorised continuation comes back greedily
    out = model.generate(tokens[:1, :8], 8, temperature=0)
    np.testing.assert_array_equal(out[0, 8:], tokens[0, 8:16])
