"""BERT against an independent PyTorch implementation with the same weights (float64): logits,
the masked-byte loss and every parameter's gradient; and the masking rule itself."""

from __future__ import annotations

import numpy as np
import pytest

import narun
from narun.models import BERT
from narun.models.bert import IGNORE, MASK

torch = pytest.importorskip("torch")
tnn = torch.nn
TF = torch.nn.functional
from tests.narun.models.torch_encoder import TorchBlock, assert_same  # noqa: E402


class TorchBERT(tnn.Module):
    def __init__(self, block, dim, depth, heads, ratio):
        super().__init__()
        self.tok, self.pos = tnn.Embedding(257, dim), tnn.Embedding(block, dim)
        self.blocks = tnn.Sequential(*(TorchBlock(dim, heads, ratio * dim, "tanh")
                                       for _ in range(depth)))
        self.ln, self.mlm, self.mlm_ln = tnn.LayerNorm(dim), tnn.Linear(dim, dim), \
            tnn.LayerNorm(dim)
        self.decoder = tnn.Linear(dim, 256)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        x = self.ln(self.blocks(x))
        return self.decoder(self.mlm_ln(TF.gelu(self.mlm(x), approximate="tanh")))


def test_bert_matches_torch():
    narun.set_default_dtype(narun.float64)
    try:
        narun.manual_seed(0)
        ours = BERT(block_size=24, dim=32, depth=2, heads=4, mlp_ratio=2)
    finally:
        narun.set_default_dtype(narun.float32)
    theirs = TorchBERT(24, 32, 2, 4, 2).double()
    theirs.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in ours.state_dict().items()})
    windows = np.random.default_rng(0).integers(0, 256, (3, 20))
    narun.manual_seed(1)
    inputs, targets = ours.mask(windows)
    loss = ours.masked_loss(narun.tensor(inputs), targets)
    loss.backward()
    t_logits = theirs(torch.tensor(inputs))
    t_loss = TF.cross_entropy(t_logits.reshape(-1, 256), torch.tensor(targets).reshape(-1),
                              ignore_index=IGNORE)
    t_loss.backward()
    with narun.no_grad():
        logits = ours(inputs).numpy()
    assert_same(ours, theirs, logits, t_logits, loss, t_loss)


def test_masking_chooses_15_percent_and_replaces_80_10_10():
    model = BERT(block_size=64, dim=16, depth=1, heads=2)
    ids = np.random.default_rng(1).integers(0, 256, (400, 64))
    narun.manual_seed(0)
    inputs, targets = model.mask(ids)
    chosen = targets != IGNORE
    # 15%, and one more in a window where none was chosen: 0.15 + 0.85 / 64
    assert chosen.mean() == pytest.approx(0.15 + 0.85 / 64, abs=0.005)
    assert chosen.any(axis=1).all()  # every window teaches something
    np.testing.assert_array_equal(targets[chosen], ids[chosen])
    np.testing.assert_array_equal(inputs[~chosen], ids[~chosen])
    masked = (inputs == MASK)[chosen].mean()
    kept = (inputs == ids)[chosen].mean()  # 10% kept, and a random byte is the same 1/256
    assert masked == pytest.approx(0.8, abs=0.02) and kept == pytest.approx(0.1, abs=0.02)
    narun.manual_seed(0)
    again = model.mask(ids)
    np.testing.assert_array_equal(again[0], inputs)  # drawn from narun's seeded generator
