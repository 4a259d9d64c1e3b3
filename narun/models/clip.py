"""CLIP (Radford et al. 2021): an image encoder and a text encoder trained so that an image and
its caption land close together in one embedding space, and zero-shot classification by
scoring an image against texts that name each class.

- Images (`vision`): a ResNet (narun.models.resnet, sized by `vision_channels` and
  `vision_blocks`) or a ViT (narun.models.vit: `patch_size`, `vision_dim`, `vision_depth`,
  `vision_heads`), its head projecting to `embed_dim`. The ResNet is the default: on the
  rendered shapes (configs/clip.yaml) it reached 96.6% zero-shot accuracy in 400 steps,
  where a 4-block ViT reached 87% in 800 (it also stays below the ResNet when trained as a
  classifier there: README's Models).
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
  are the same loss. Identical captions have identical embeddings, so only the text ->
  image term differs; on configs/clip.yaml (64 distinct captions, batches of 64) the two
  trained equally well (ViT image encoder, 600 steps: 84.9% best-caption accuracy each).

Zero-shot: `classifier(prompts)` scores images against texts naming each class (prompts
(C, P), e.g. every colour and size of "a small red circle" for circles): class c's score is
the logsumexp of the image's logits against c's prompts, so its softmax probability is the
summed probability of those prompts. Averaging each class's prompt embeddings instead (CLIP's
prompt ensembling, meant for templates that all describe the same images) scores much worse
where a class's prompts describe different images: configs/clip.yaml's trained model gets
58.5% zero-shot that way, 96.6% this way. The prompts come from the data
(narun.data.class_prompts), never from the model.

    >>> model = CLIP(embed_dim=64)
    >>> loss = model.loss(images, np.array(["a small red circle", "large blue stripes"]))
    >>> scores = model.classifier(prompts)(images)      # (N, C)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import narun
from narun import nn
from narun.data import ByteTokenizer
from narun.errors import ConfigError, ShapeError
from narun.models._encoder import EncoderBlock
from narun.models._registry import register_model
from narun.models.resnet import ResNet
from narun.models.vit import ViT
from narun.nn import functional as F
from narun.nn import init
from narun.tensor import Tensor

EOT = 256  # the end-of-text token's id, one past the bytes; it also pads
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)
VISIONS = ("resnet", "vit")  # the image encoders (model.vision)


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

    def __init__(self, embed_dim: int = 64, vision: str = "resnet", image_size: int = 32,
                 patch_size: int = 4, vision_dim: int = 64, vision_depth: int = 4,
                 vision_heads: int = 4, vision_channels: Sequence[int] = (16, 32, 64),
                 vision_blocks: Sequence[int] = (1, 1, 1), context_length: int = 32,
                 text_dim: int = 64, text_depth: int = 2, text_heads: int = 4,
                 mlp_ratio: int = 2, soft_targets: bool = True) -> None:
        super().__init__()
        if vision not in VISIONS:
            raise ConfigError(f"model.vision: expected one of {', '.join(VISIONS)}, got "
                              f"{vision!r}")
        if text_dim % text_heads:
            raise ConfigError(f"model.text_dim: {text_dim} is not divisible by "
                              f"model.text_heads {text_heads}")
        if context_length < 2 or text_depth < 1 or embed_dim < 2:
            raise ConfigError(f"model.context_length >= 2, model.text_depth >= 1 and "
                              f"model.embed_dim >= 2, got {context_length}, {text_depth} and "
                              f"{embed_dim}")
        self.context_length, self.soft_targets = context_length, bool(soft_targets)
        if vision == "vit":  # the sizes checked here, so that the messages name our keys
            if vision_dim % vision_heads or vision_depth < 1:
                raise ConfigError(f"model.vision_dim: {vision_dim} must be divisible by "
                                  f"model.vision_heads {vision_heads}, and model.vision_depth "
                                  f"{vision_depth} >= 1")
            self.visual: nn.Module = ViT(embed_dim, image_size, patch_size, vision_dim,
                                         vision_depth, vision_heads, mlp_ratio)
        else:
            self.visual = ResNet(embed_dim, vision_channels, vision_blocks)
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

    def classifier(self, prompts: Any) -> Callable[[Tensor], Tensor]:
        """Zero-shot: a function from images (N, 3, size, size) to class scores (N, C): for
        class c, log sum over its prompts p of exp(logit(image, p)), the logits those of
        `forward` against all C * P prompts (prompts (C, P): texts naming each class). Under
        the softmax over every prompt, class c's probability is the summed probability of
        its own prompts. The prompts are embedded once, here."""
        prompts = np.asarray(prompts)
        if prompts.ndim != 2:
            raise ShapeError(f"CLIP: expected prompts (classes, prompts per class), got shape "
                             f"{prompts.shape}")
        C, P = prompts.shape
        texts = self.encode_text(prompts.reshape(-1)).transpose(0, 1)

        def scores(images: Tensor) -> Tensor:
            logits = (self.scale() * (self.encode_image(images) @ texts)).reshape(-1, C, P)
            peak = logits.detach().max(-1, keepdim=True)[0]  # a constant shift: exp stays finite
            return (logits - peak).exp().sum(-1).log() + peak.reshape(-1, C)

        return scores


@register_model("clip", {"embed_dim": int, "vision": str, "image_size": int, "patch_size": int,
                         "vision_dim": int, "vision_depth": int, "vision_heads": int,
                         "vision_channels": list[int], "vision_blocks": list[int],
                         "context_length": int, "text_dim": int, "text_depth": int,
                         "text_heads": int, "mlp_ratio": int, "soft_targets": bool})
def _build(**options: Any) -> CLIP:
    return CLIP(**options)
