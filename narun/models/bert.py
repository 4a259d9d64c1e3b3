"""BERT (Devlin et al. 2018) over bytes: a bidirectional transformer encoder trained to
predict masked bytes (masked-language modelling), with narun's byte tokenizer.

Each training window has 15% of its positions chosen; of those 80% become the [MASK] token
(id 256, one past the bytes), 10% a random byte and 10% stay, and the loss is the
cross-entropy of the original bytes at the chosen positions only. The choices are drawn from
narun's global generator, so a seeded run is deterministic. The encoder blocks are pre-norm
(as ViT's), with GELU in its tanh form throughout (GPT-2's; the exact one's erf costs NumPy
several passes); the MLM head is dense -> GELU -> LayerNorm -> a projection to the 256
bytes.

    >>> model = BERT(block_size=128, dim=128, depth=4, heads=4)
    >>> loss = model.loss(windows)      # windows: int64 (B, T) byte ids
"""

from __future__ import annotations

from typing import Any

import numpy as np

import narun
from narun import nn
from narun.errors import ConfigError, ShapeError
from narun.models._encoder import EncoderBlock
from narun.models._registry import register_model
from narun.nn import functional as F
from narun.tensor import Tensor, _random

BYTES = 256
MASK = BYTES  # the [MASK] token's id
IGNORE = -100  # cross_entropy's ignore_index: positions that were not chosen
BLOCK_SIZE = 128  # the default longest window (model.block_size)


class BERT(nn.Module):
    def __init__(self, block_size: int = BLOCK_SIZE, dim: int = 128, depth: int = 4, heads: int = 4,
                 mlp_ratio: int = 4, mask_prob: float = 0.15) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.dim: {dim} is not divisible by model.heads {heads}")
        if not 0.0 < mask_prob < 1.0:
            raise ConfigError(f"model.mask_prob: must be in (0, 1), got {mask_prob}")
        if block_size < 1 or depth < 1:
            raise ConfigError(f"model.block_size and model.depth: need >= 1, got "
                              f"{block_size} and {depth}")
        self.block_size, self.mask_prob = block_size, float(mask_prob)
        self.tok = nn.Embedding(BYTES + 1, dim)
        self.pos = nn.Embedding(block_size, dim)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_ratio * dim, gelu="tanh")
                                      for _ in range(depth)))
        self.ln = nn.LayerNorm(dim)
        self.mlm = nn.Linear(dim, dim)
        self.mlm_ln = nn.LayerNorm(dim)
        self.decoder = nn.Linear(dim, BYTES)

    def forward(self, idx: Any) -> Tensor:
        """Byte logits (B, T, 256) at every position of token ids `idx` (B, T)."""
        idx = idx if isinstance(idx, Tensor) else narun.tensor(np.asarray(idx, np.int64))
        if idx.ndim != 2 or idx.shape[1] > self.block_size:
            raise ShapeError(f"BERT: expected token ids (B, T <= {self.block_size}), got "
                             f"shape {idx.shape}")
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(narun.arange(0, T, device=idx.device))
        x = self.ln(self.blocks(x))
        return self.decoder(self.mlm_ln(F.gelu(self.mlm(x), approximate="tanh")))

    def mask(self, idx: Any) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) for masked-language modelling of byte windows `idx` (B, T):
        targets hold the original byte at the chosen positions and IGNORE elsewhere."""
        ids = np.asarray(idx.numpy() if isinstance(idx, Tensor) else idx, dtype=np.int64)
        g = _random.generator()
        chosen = g.random(ids.shape) < self.mask_prob
        chosen[np.arange(len(ids)), g.integers(0, ids.shape[1], len(ids))] = True  # >= 1 a row
        action = g.random(ids.shape)
        inputs = ids.copy()
        inputs[chosen & (action < 0.8)] = MASK
        swap = chosen & (action >= 0.8) & (action < 0.9)
        inputs[swap] = g.integers(0, BYTES, int(swap.sum()))
        return inputs, np.where(chosen, ids, IGNORE)

    def masked_loss(self, inputs: Any, targets: Any) -> Tensor:
        """Mean cross-entropy of the targets' bytes at their chosen positions."""
        logits = self(inputs)
        t = targets if isinstance(targets, Tensor) else narun.tensor(
            np.asarray(targets, np.int64), device=logits.device)
        return F.cross_entropy(logits.reshape(-1, BYTES), t.reshape(-1), ignore_index=IGNORE)

    def loss(self, idx: Any, _targets: Any = None) -> Tensor:
        """The masked-byte loss of windows `idx` (the next-byte targets a text batch comes
        with are not used: the targets are the masked bytes themselves)."""
        inputs, targets = self.mask(idx)
        device = idx.device if isinstance(idx, Tensor) else "cpu"
        return self.masked_loss(narun.tensor(inputs, device=device), targets)


@register_model("bert", {"block_size": int, "dim": int, "depth": int, "heads": int,
                         "mlp_ratio": int, "mask_prob": float})
def _build(block_size: int = BLOCK_SIZE, dim: int = 128, depth: int = 4, heads: int = 4,
           mlp_ratio: int = 4, mask_prob: float = 0.15) -> BERT:
    return BERT(block_size, dim, depth, heads, mlp_ratio, mask_prob)
