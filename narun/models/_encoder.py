"""The pre-norm transformer encoder block of ViT, BERT and CLIP: every token attends to every
token (or, with `causal`, to itself and the tokens before it: CLIP's text encoder), then a
GELU MLP, each on a LayerNorm of the residual stream."""

from __future__ import annotations

from narun import nn
from narun.nn import functional as F
from narun.tensor import Tensor


class EncoderBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)); every token attends to every token, or with
    `causal` to itself and those before it."""

    def __init__(self, dim: int, heads: int, hidden: int, gelu: str = "none",
                 causal: bool = False) -> None:
        super().__init__()
        self.heads, self.gelu = heads, gelu  # GELU exact ("none") or its tanh form
        self.causal = causal
        self.ln_1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        H = self.heads
        qkv = self.qkv(self.ln_1(x)).reshape(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=self.causal)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln_2(x)), approximate=self.gelu))
