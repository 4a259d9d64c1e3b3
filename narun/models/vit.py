"""Vision Transformer (Dosovitskiy et al. 2020): the image cut into patches, each projected
to a token (a strided convolution), a learned class token in front, learned position
embeddings, pre-norm encoder blocks (bidirectional attention, GELU MLP), and a linear head on
the class token's final state.

    >>> model = ViT(num_classes=4, image_size=32, patch_size=4, dim=64, depth=4, heads=4)
    >>> logits = model(images)       # (N, 3, 32, 32) -> (N, 4)
"""

from __future__ import annotations

import narun
from narun import nn
from narun.errors import ConfigError
from narun.models._encoder import EncoderBlock
from narun.models._registry import register_model
from narun.nn import init
from narun.tensor import Tensor


class ViT(nn.Module):
    def __init__(self, num_classes: int, image_size: int = 32, patch_size: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2,
                 in_channels: int = 3) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"model.patch_size: {patch_size} does not divide image_size "
                              f"{image_size}")
        if dim % heads:
            raise ConfigError(f"model.dim: {dim} is not divisible by model.heads {heads}")
        if num_classes < 2 or depth < 1:
            raise ConfigError(f"model.num_classes >= 2 and model.depth >= 1, got "
                              f"{num_classes} and {depth}")
        self.image_size, self.patch_size = image_size, patch_size
        tokens = (image_size // patch_size) ** 2 + 1
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls = nn.Parameter(narun.zeros(1, 1, dim).data)
        self.pos = nn.Parameter(narun.zeros(1, tokens, dim).data)
        init.trunc_normal_(self.cls, std=0.02)
        init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, mlp_ratio * dim)
                                      for _ in range(depth)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ConfigError(f"ViT: expected images (N, C, {self.image_size}, "
                              f"{self.image_size}), got shape {x.shape}")
        p = self.patch(x)  # (N, dim, h, w)
        N, C = p.shape[0], p.shape[1]
        tokens = p.reshape(N, C, -1).transpose(1, 2)  # (N, h * w, dim)
        x = narun.cat([self.cls.expand(N, 1, C), tokens], dim=1) + self.pos
        return self.head(self.ln(self.blocks(x))[:, 0])


@register_model("vit", {"num_classes": int, "image_size": int, "patch_size": int, "dim": int,
                        "depth": int, "heads": int, "mlp_ratio": int, "in_channels": int})
def _build(num_classes: int = 4, image_size: int = 32, patch_size: int = 4, dim: int = 64,
           depth: int = 4, heads: int = 4, mlp_ratio: int = 2, in_channels: int = 3) -> ViT:
    return ViT(num_classes, image_size, patch_size, dim, depth, heads, mlp_ratio, in_channels)
