"""ResNet and BatchNorm2d against an independent PyTorch implementation with the same weights
(float64): logits, loss, every parameter's gradient and the running statistics in training
mode, and the logits in eval mode."""

from __future__ import annotations

import numpy as np
import pytest

import narun
from narun.errors import ConfigError
from narun.models import ResNet
from narun.nn import BatchNorm2d
from narun.nn import functional as F

torch = pytest.importorskip("torch")
tnn = torch.nn


class TorchBlock(tnn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(cout)
        self.conv2 = tnn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                           tnn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class TorchResNet(tnn.Module):
    def __init__(self, num_classes, channels, blocks):
        super().__init__()
        self.stem = tnn.Conv2d(3, channels[0], 3, padding=1, bias=False)
        self.bn = tnn.BatchNorm2d(channels[0])
        layers, cin = [], channels[0]
        for i, (cout, n) in enumerate(zip(channels, blocks)):
            for j in range(n):
                layers.append(TorchBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.layers = tnn.Sequential(*layers)
        self.fc = tnn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.layers(torch.relu(self.bn(self.stem(x)))).mean(dim=(2, 3)))


@pytest.fixture
def float64():
    narun.set_default_dtype(narun.float64)
    yield
    narun.set_default_dtype(narun.float32)


def test_resnet_matches_torch_in_training_and_eval(float64):
    narun.manual_seed(0)
    ours = ResNet(4, channels=(8, 16), blocks=(2, 1))
    theirs = TorchResNet(4, (8, 16), (2, 1)).double()
    state = {k: torch.tensor(np.asarray(v)) for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state)  # the same names, the same weights
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 16, 16))
    y = rng.integers(0, 4, 6)
    for _ in range(2):  # twice: the running statistics move as torch's
        loss = F.cross_entropy(ours(narun.tensor(x)), narun.tensor(y))
        loss.backward()
        tl = tnn.functional.cross_entropy(theirs(torch.tensor(x)), torch.tensor(y))
        tl.backward()
        assert loss.item() == pytest.approx(tl.item(), rel=1e-12)
    named = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), named[name].grad.numpy(), rtol=1e-9,
                                   atol=1e-12, err_msg=name)
    buffers = dict(theirs.named_buffers())
    for name, b in ours.named_buffers():
        np.testing.assert_allclose(np.asarray(b.numpy(), dtype=np.float64),
                                   buffers[name].numpy(), rtol=1e-12, err_msg=name)
    ours.eval()
    theirs.eval()
    with narun.no_grad(), torch.no_grad():
        np.testing.assert_allclose(ours(narun.tensor(x)).numpy(),
                                   theirs(torch.tensor(x)).numpy(), rtol=1e-10, atol=1e-12)


def test_batchnorm_gradients_match_finite_differences(float64):
    rng = np.random.default_rng(1)
    bn = BatchNorm2d(3)
    bn.weight.data[...] = rng.standard_normal(3)
    bn.bias.data[...] = rng.standard_normal(3)
    x = rng.standard_normal((4, 3, 2, 2))
    g = rng.standard_normal((4, 3, 2, 2))
    for training in (True, False):
        bn.train(training)
        xt = narun.tensor(x, requires_grad=True)
        F.batch_norm(xt, bn.running_mean, bn.running_var, bn.weight, bn.bias, training,
                     0.0).backward(narun.tensor(g))
        num = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            d = np.zeros_like(x)
            d[i] = 1e-6
            f = [float((F.batch_norm(narun.tensor(x + s * d), bn.running_mean,
                                     bn.running_var, bn.weight, bn.bias, training,
                                     0.0).numpy() * g).sum()) for s in (1, -1)]
            num[i] = (f[0] - f[1]) / 2e-6
        np.testing.assert_allclose(xt.grad.numpy(), num, rtol=1e-6, atol=1e-8)


def test_bad_shapes_and_sizes_are_refused():
    with pytest.raises(ConfigError, match="channels and model.blocks"):
        ResNet(4, channels=(8, 16), blocks=(1,))
    with pytest.raises(ConfigError, match=r"BatchNorm2d: expected \(N, C, H, W\)"):
        BatchNorm2d(3)(narun.randn(2, 3))
