"""PyTorch's side of the encoder tests (ViT, BERT, CLIP): an independent pre-norm encoder block with
narun's parameter names, so a state dict loads into both."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch import nn as tnn


class TorchBlock(tnn.Module):
    def __init__(self, dim, heads, hidden, gelu="none", causal=False):
        super().__init__()
        self.heads, self.gelu, self.causal = heads, gelu, causal
        self.ln_1, self.ln_2 = tnn.LayerNorm(dim), tnn.LayerNorm(dim)
        self.qkv, self.proj = tnn.Linear(dim, 3 * dim), tnn.Linear(dim, dim)
        self.fc, self.out = tnn.Linear(dim, hidden), tnn.Linear(hidden, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).reshape(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = TF.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(TF.gelu(self.fc(self.ln_2(x)), approximate=self.gelu))


def assert_same(ours, theirs, logits, t_logits, loss, t_loss):
    """narun's logits, loss and every parameter's gradient equal PyTorch's (float64)."""
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert loss.item() == pytest.approx(t_loss.item(), rel=1e-12)
    named = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), named[name].grad.numpy(), rtol=1e-8,
                                   atol=1e-12, err_msg=name)


__all__ = ["TorchBlock", "assert_same", "torch"]
