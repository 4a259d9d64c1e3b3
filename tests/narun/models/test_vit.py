"""ViT against an independent PyTorch implementation with the same weights (float64): logits,
loss and every parameter's gradient."""

from __future__ import annotations

import numpy as np
import pytest

import narun
from narun.errors import ConfigError
from narun.models import ViT
from narun.nn import functional as F

torch = pytest.importorskip("torch")
tnn = torch.nn
TF = torch.nn.functional
from tests.narun.models.torch_encoder import TorchBlock, assert_same  # noqa: E402


class TorchViT(tnn.Module):
    def __init__(self, classes, size, patch, dim, depth, heads, ratio):
        super().__init__()
        self.patch = tnn.Conv2d(3, dim, patch, stride=patch)
        self.cls = tnn.Parameter(torch.zeros(1, 1, dim))
        self.pos = tnn.Parameter(torch.zeros(1, (size // patch) ** 2 + 1, dim))
        self.blocks = tnn.Sequential(*(TorchBlock(dim, heads, ratio * dim) for _ in range(depth)))
        self.ln, self.head = tnn.LayerNorm(dim), tnn.Linear(dim, classes)

    def forward(self, x):
        p = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(p), -1, -1), p], dim=1) + self.pos
        return self.head(self.ln(self.blocks(x))[:, 0])


def test_vit_matches_torch():
    narun.set_default_dtype(narun.float64)
    try:
        narun.manual_seed(0)
        ours = ViT(3, image_size=16, patch_size=4, dim=32, depth=2, heads=4)
    finally:
        narun.set_default_dtype(narun.float32)
    theirs = TorchViT(3, 16, 4, 32, 2, 4, 2).double()
    theirs.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in ours.state_dict().items()})
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 3, 16, 16)), rng.integers(0, 3, 5)
    logits = ours(narun.tensor(x))
    loss = F.cross_entropy(logits, narun.tensor(y))
    loss.backward()
    t_logits = theirs(torch.tensor(x))
    t_loss = TF.cross_entropy(t_logits, torch.tensor(y))
    t_loss.backward()
    assert_same(ours, theirs, logits.numpy(), t_logits, loss, t_loss)


def test_sizes_that_do_not_fit_are_refused():
    with pytest.raises(ConfigError, match="does not divide image_size"):
        ViT(4, image_size=32, patch_size=5)
    with pytest.raises(ConfigError, match=r"expected images \(N, C, 32, 32\)"):
        ViT(4)(narun.randn(1, 3, 16, 16))
