"""ResNet with basic blocks (He et al. 2015, the CIFAR form): a 3x3 stem, stages of two-conv
residual blocks (the first block of every stage after the first halves the resolution and
widens the channels, its shortcut a 1x1 convolution with BatchNorm), global average
pooling and a linear classifier. Sized for small images (32 x 32).

    >>> model = ResNet(num_classes=4, channels=(16, 32, 64), blocks=(1, 1, 1))
    >>> logits = model(images)       # (N, 3, 32, 32) -> (N, 4)
"""

from __future__ import annotations

from collections.abc import Sequence

from narun import nn
from narun.errors import ConfigError
from narun.models._registry import register_model
from narun.nn import functional as F
from narun.tensor import Tensor


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), the convolutions 3x3."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    def __init__(self, num_classes: int, channels: Sequence[int] = (16, 32, 64),
                 blocks: Sequence[int] = (1, 1, 1), in_channels: int = 3) -> None:
        super().__init__()
        if len(channels) != len(blocks) or not channels or min(channels) < 1 \
                or min(blocks) < 1:
            raise ConfigError(f"model.channels and model.blocks: one positive width and one "
                              f"positive block count per stage, got {list(channels)} and "
                              f"{list(blocks)}")
        if num_classes < 2:
            raise ConfigError(f"model.num_classes: need at least 2, got {num_classes}")
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels[0])
        layers = []
        cin = channels[0]
        for i, (cout, n) in enumerate(zip(channels, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ConfigError(f"ResNet: expected images (N, C, H, W), got shape {x.shape}")
        x = self.layers(F.relu(self.bn(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))  # global average pooling


@register_model("resnet", {"num_classes": int, "channels": list[int], "blocks": list[int],
                           "in_channels": int})
def _build(num_classes: int = 4, channels: Sequence[int] = (16, 32, 64),
           blocks: Sequence[int] = (1, 1, 1), in_channels: int = 3) -> ResNet:
    return ResNet(num_classes, channels, blocks, in_channels)
