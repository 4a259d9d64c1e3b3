"""CLIP (Radford et al. 2021): an image encoder and a text encoder trained so that an image and
its caption land close together in one embedding space, and zero-shot classification by
scoring an image against texts that name each class.

- Images: a ViT (narun.models.vit) whose head projects the class token to `embed_dim`.
- Texts: captions as narun's byte tokens (ids 0..255) followed by the end-of-text token
  (id 256, `EOT`) and padded with it to `context_length`; token + position embeddings,
  causal pre-norm encoder blocks (so the padding after the first EOT cannot reach it), a
  final LayerNorm, the state at the first EOT, and a linear projection (no bias) to
  `embed_dim`. A caption longer than the context is an error naming its length.
- Both embeddings are L2-normalised; logits = exp(logit_scale) * images @ texts.T, where
  `logit_scale` is a learned scalar starting at log(1 / 0.07). In the forward it is clamped
  at log(100) (OpenAI's bound, there applied to the parameter after each step; here the
  clamp is in the graph, so above the bound it gets no gradient and the parameter keeps
  the value it was given).
- The loss is the mean of the two cross-entropies, images -> texts (each row of the logits)
  and texts -> images (each column). With `soft_targets` (the default), a caption that
  occurs k times in the batch is a match for each of those k images, each with target
  probability 1/k; without it only its own row is (the usual CLIP target, the diagonal),
  which asks the model to tell identical captions apart. With distinct captions the two
  are the same loss.

Zero-shot: `classifier(prompts)` embeds every prompt of each class (prompts (C, P): texts
naming class c, e.g. every colour and size of "a small red circle"), averages each class's
normalised embeddings and normalises the mean (prompt ensembling); the returned function
scores images against those C class embeddings. The prompts come from the data
(narun.data.class_prompts), never from the model.

    >>> model = CLIP(embed_dim=64)
    >>> loss = model.loss(images, np.array(["a small red circle", "large blue stripes"]))
    >>> scores = model.classifier(prompts)(images)      # (N, C)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

import narun
from narun import nn
from narun.data import ByteTokenizer
from narun.errors import ConfigError, ShapeError
from narun.models._encoder import EncoderBlock
from narun.models._registry import register_model
from narun.models.vit import ViT
from narun.nn import functional as F
from narun.nn import init
from narun.tensor import Tensor

EOT = 256  # the end-of-text token's id, one past the bytes; it also pads
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


def tokenize(texts: Any, context_length: int) -> np.ndarray:
    """int64 (len(texts), context_length): each text's UTF-8 bytes, then EOT to the end.

        >>> tokenize(["ab"], 4).tolist()
        [[97, 98, 256, 256]]
    """
    tok = ByteTokenizer()
    ids = np.full((len(texts), context_length), EOT, dtype=np.int64)
    for row, text in enumerate(texts):
        b = tok.encode(str(text))
        if len(b) >= context_length:
            raise ConfigError(f"CLIP: caption {str(text)!r} is {len(b)} bytes; with its "
                              f"end-of-text token it needs model.context_length >= "
                              f"{len(b) + 1}, got {context_length}")
        ids[row, :len(b)] = b
    return ids


def _normalize(x: Tensor) -> Tensor:
    return x * (x * x).sum(-1, keepdim=True).rsqrt()


class CLIP(nn.Module):
    targets = "captions"  # the array of an array dataset it learns from (narun.train)

    def __init__(self, embed_dim: int = 64, image_size: int = 32, patch_size: int = 4,
                 vision_dim: int = 64, vision_depth: int = 4, vision_heads: int = 4,
                 context_length: int = 32, text_dim: int = 64, text_depth: int = 2,
                 text_heads: int = 4, mlp_ratio: int = 2, soft_targets: bool = True) -> None:
        super().__init__()
        if text_dim % text_heads:
            raise ConfigError(f"model.text_dim: {text_dim} is not divisible by "
                              f"model.text_heads {text_heads}")
        if vision_dim % vision_heads:  # checked here, so that the message names our keys
            raise ConfigError(f"model.vision_dim: {vision_dim} is not divisible by "
                              f"model.vision_heads {vision_heads}")
        if context_length < 2 or min(text_depth, vision_depth) < 1 or embed_dim < 2:
            raise ConfigError(f"model.context_length >= 2, model.text_depth and "
                              f"model.vision_depth >= 1, model.embed_dim >= 2; got "
                              f"{context_length}, {text_depth}, {vision_depth} and {embed_dim}")
        self.context_length, self.soft_targets = context_length, bool(soft_targets)
        self.visual = ViT(embed_dim, image_size, patch_size, vision_dim, vision_depth,
                          vision_heads, mlp_ratio)
        self.tok = nn.Embedding(EOT + 1, text_dim)
        self.pos = nn.Embedding(context_length, text_dim)
        init.normal_(self.tok.weight, std=0.02)
        init.normal_(self.pos.weight, std=0.01)
        self.text_blocks = nn.Sequential(*(EncoderBlock(text_dim, text_heads,
                                                        mlp_ratio * text_dim, causal=True)
                                           for _ in range(text_depth)))
        self.ln_final = nn.LayerNorm(text_dim)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(narun.tensor(INIT_LOGIT_SCALE).data)

    def tokenize(self, texts: Any) -> np.ndarray:
        return tokenize(texts, self.context_length)

    def encode_image(self, images: Tensor) -> Tensor:
        """L2-normalised embeddings (N, embed_dim) of images (N, 3, size, size)."""
        return _normalize(self.visual(images))

    def encode_text(self, texts: Any) -> Tensor:
        """L2-normalised embeddings (M, embed_dim) of texts (strings) or of their token ids
        (M, context_length) as `tokenize` makes them."""
        ids = np.asarray(texts)
        if ids.dtype.kind in "US":
            ids = self.tokenize(ids)
        if ids.ndim != 2 or ids.shape[1] != self.context_length:
            raise ShapeError(f"CLIP: expected token ids (M, {self.context_length}), got shape "
                             f"{ids.shape}")
        device = self.tok.weight.device
        x = self.tok(narun.tensor(ids, device=device))
        x = x + self.pos(narun.arange(0, self.context_length, device=device))
        x = self.ln_final(self.text_blocks(x))
        eot = (ids == EOT).argmax(axis=1)  # the first EOT: the last token that saw the text
        return _normalize(self.text_proj(x[np.arange(len(ids)), eot]))

    def scale(self) -> Tensor:
        """exp(logit_scale), the logit_scale clamped at log(100) first."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, images: Tensor, texts: Any) -> Tensor:
        """Logits (N, M): every image against every text (strings or token ids)."""
        return self.scale() * (self.encode_image(images) @ self.encode_text(texts).transpose(0, 1))

    def loss(self, images: Tensor, captions: Any) -> Tensor:
        """The contrastive loss of a batch of images and their captions (row i describes
        image i): the mean of the image -> text and text -> image cross-entropies."""
        captions = np.asarray(captions)
        if captions.ndim != 1 or len(captions) != images.shape[0]:
            raise ShapeError(f"CLIP: expected one caption per image ({images.shape[0]}), got "
                             f"captions of shape {captions.shape}")
        logits = self(images, captions)
        if not self.soft_targets:
            rows = narun.tensor(np.arange(len(captions)), device=logits.device)
            return (F.cross_entropy(logits, rows)
                    + F.cross_entropy(logits.transpose(0, 1), rows)) / 2
        same = captions[:, None] == captions[None, :]  # symmetric, so one matrix serves both
        target = narun.tensor(same / same.sum(axis=1, keepdims=True), dtype=logits.dtype,
                              device=logits.device)
        to_texts = -(target * F.log_softmax(logits, 1)).sum(1).mean()
        to_images = -(target * F.log_softmax(logits, 0)).sum(0).mean()
        return (to_texts + to_images) / 2

    def class_embeddings(self, prompts: Any) -> Tensor:
        """(C, embed_dim): per class, the normalised mean of its prompts' normalised
        embeddings; prompts (C, P) texts."""
        prompts = np.asarray(prompts)
        if prompts.ndim != 2:
            raise ShapeError(f"CLIP: expected prompts (classes, prompts per class), got shape "
                             f"{prompts.shape}")
        C, P = prompts.shape
        return _normalize(self.encode_text(prompts.reshape(-1)).reshape(C, P, -1).mean(1))

    def classifier(self, prompts: Any) -> Callable[[Tensor], Tensor]:
        """Zero-shot: a function from images (N, 3, size, size) to class scores (N, C),
        exp(logit_scale) times the cosine with each class's prompt ensemble (see
        class_embeddings); the classes are embedded once, here."""
        classes = self.class_embeddings(prompts).transpose(0, 1)
        return lambda images: self.scale() * (self.encode_image(images) @ classes)


@register_model("clip", {"embed_dim": int, "image_size": int, "patch_size": int,
                         "vision_dim": int, "vision_depth": int, "vision_heads": int,
                         "context_length": int, "text_dim": int, "text_depth": int,
                         "text_heads": int, "mlp_ratio": int, "soft_targets": bool})
def _build(embed_dim: int = 64, image_size: int = 32, patch_size: int = 4, vision_dim: int = 64,
           vision_depth: int = 4, vision_heads: int = 4, context_length: int = 32,
           text_dim: int = 64, text_depth: int = 2, text_heads: int = 4, mlp_ratio: int = 2,
           soft_targets: bool = True) -> CLIP:
    return CLIP(embed_dim, image_size, patch_size, vision_dim, vision_depth, vision_heads,
                context_length, text_dim, text_depth, text_heads, mlp_ratio, soft_targets)
