"""Layers: forward against NumPy with the module's own weights, gradients through
check_op, initial distributions, seeding, containers, and a small model that learns."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest

import narun
from narun import nn, optim
from narun.errors import ConfigError
from narun.nn import functional as F
from tests.opcheck import HAS_TORCH, check_op

if HAS_TORCH:
    import torch

    torch.set_num_threads(1)  # its spinning worker threads crawl on a shared 2-core box


def _bind(module: nn.Module, **params: narun.Tensor) -> nn.Module:
    """Use the given tensors as the module's parameters (so check_op sees their grads)."""
    module._parameters.update(params)
    return module


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(x)


# ---- Linear --------------------------------------------------------------------------------
def test_linear_forward_matches_numpy():
    lin = nn.Linear(5, 3)
    x = np.random.default_rng(0).standard_normal((2, 4, 5)).astype(np.float32)
    y = lin(narun.tensor(x))
    W, b = lin.weight.numpy().astype(np.float64), lin.bias.numpy().astype(np.float64)
    np.testing.assert_allclose(y.numpy(), x @ W.T + b, rtol=1e-5, atol=1e-6)
    assert y.dtype == np.float32 and y.shape == (2, 4, 3)
    nobias = nn.Linear(5, 3, bias=False)
    assert nobias.bias is None and [n for n, _ in nobias.named_parameters()] == ["weight"]
    np.testing.assert_allclose(nobias(narun.tensor(x)).numpy(),
                               x @ nobias.weight.numpy().T, rtol=1e-5, atol=1e-6)


def test_linear_gradients():
    rng = np.random.default_rng(1)
    lin = nn.Linear(4, 3)
    check_op(lambda x, w, b: _bind(lin, weight=w, bias=b)(x),
             lambda x, w, b: x @ w.T + b,
             [rng.standard_normal((2, 4)), rng.standard_normal((3, 4)),
              rng.standard_normal(3)],
             torch_fn=lambda x, w, b: torch.nn.functional.linear(x, w, b))


def test_linear_init_distribution():
    narun.manual_seed(0)
    lin = nn.Linear(1000, 400)
    bound = 1 / math.sqrt(1000)
    w, b = lin.weight.numpy().astype(np.float64), lin.bias.numpy().astype(np.float64)
    assert -bound <= w.min() and w.max() <= bound and w.max() > 0.99 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.01 * bound
    assert abs(w.mean()) < 5 * bound / math.sqrt(3) / math.sqrt(w.size)
    assert -bound <= b.min() and b.max() <= bound and b.std() > 0.8 * bound / math.sqrt(3)
    assert lin.weight.dtype == np.float32 and lin.weight.requires_grad


def test_linear_dtype_and_argument_errors():
    assert nn.Linear(2, 2, dtype=narun.float64).weight.dtype == np.float64
    with pytest.raises(ConfigError, match="in_features"):
        nn.Linear(-1, 2)


# ---- Embedding -----------------------------------------------------------------------------
def test_embedding_forward_padding_and_init():
    narun.manual_seed(0)
    emb = nn.Embedding(300, 200, padding_idx=-1)
    assert emb.padding_idx == 299
    W = emb.weight.numpy()
    np.testing.assert_array_equal(W[299], np.zeros(200))
    rest = W[:299].astype(np.float64)
    assert abs(rest.mean()) < 0.01 and abs(rest.std() - 1.0) < 0.01
    idx = np.array([[0, 5, 299], [5, 5, 1]])
    out = emb(narun.tensor(idx))
    np.testing.assert_array_equal(out.numpy(), W[idx])
    (out * narun.tensor(np.arange(6 * 200, dtype=np.float32).reshape(2, 3, 200))).sum().backward()
    g = emb.weight.grad.numpy()
    np.testing.assert_array_equal(g[299], np.zeros(200))  # the padding row learns nothing
    np.testing.assert_allclose(g[5], np.arange(200, 400) + np.arange(600, 800)
                               + np.arange(800, 1000))
    with pytest.raises(ConfigError, match="padding_idx"):
        nn.Embedding(4, 2, padding_idx=4)


def test_embedding_gradient():
    emb = nn.Embedding(5, 3)
    idx = np.array([[1, 4], [1, 0]])
    check_op(lambda w: _bind(emb, weight=w)(narun.tensor(idx, device=w.device)),
             lambda w: w[idx], [np.random.default_rng(2).standard_normal((5, 3))],
             torch_fn=lambda w: torch.nn.functional.embedding(torch.tensor(idx), w))


# ---- norms ---------------------------------------------------------------------------------
def _layer_norm_ref(x, w, b, eps, dims):
    axes = tuple(range(-dims, 0))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    return y if w is None else (y * w if b is None else y * w + b)


def test_layer_norm_forward_matches_numpy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 5))
    ln = nn.LayerNorm((4, 5), eps=1e-3, dtype=narun.float64)
    np.testing.assert_array_equal(ln.weight.numpy(), np.ones((4, 5)))
    np.testing.assert_array_equal(ln.bias.numpy(), np.zeros((4, 5)))
    ln.weight.data[...] = rng.standard_normal((4, 5))
    ln.bias.data[...] = rng.standard_normal((4, 5))
    np.testing.assert_allclose(ln(narun.tensor(x)).numpy(),
                               _layer_norm_ref(x, ln.weight.numpy(), ln.bias.numpy(), 1e-3, 2),
                               rtol=1e-10, atol=1e-12)
    plain = nn.LayerNorm(5, elementwise_affine=False)
    assert list(plain.parameters()) == []
    np.testing.assert_allclose(plain(narun.tensor(x, dtype=narun.float32)).numpy(),
                               _layer_norm_ref(x, None, None, 1e-5, 1), rtol=1e-4, atol=1e-5)
    nobias = nn.LayerNorm(5, bias=False)
    assert nobias.bias is None and nobias.weight is not None


def test_layer_norm_gradients():
    rng = np.random.default_rng(4)
    ln = nn.LayerNorm(4)
    check_op(lambda x, w, b: _bind(ln, weight=w, bias=b)(x),
             lambda x, w, b: _layer_norm_ref(x, w, b, 1e-5, 1),
             [rng.standard_normal((3, 4)), rng.standard_normal(4), rng.standard_normal(4)],
             torch_fn=lambda x, w, b: torch.nn.functional.layer_norm(x, (4,), w, b))


def _rms_ref(x, w, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def test_rms_norm_forward_and_gradients():
    rng = np.random.default_rng(5)
    rms = nn.RMSNorm(6)
    np.testing.assert_array_equal(rms.weight.numpy(), np.ones(6))
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    np.testing.assert_allclose(rms(narun.tensor(x)).numpy(),
                               _rms_ref(x.astype(np.float64), 1.0, np.finfo(np.float32).eps),
                               rtol=1e-5, atol=1e-6)
    rms2 = nn.RMSNorm(4, eps=1e-6)
    check_op(lambda x, w: _bind(rms2, weight=w)(x),
             lambda x, w: _rms_ref(x, w, 1e-6),
             [rng.standard_normal((3, 4)), rng.standard_normal(4)],
             torch_fn=lambda x, w: torch.nn.functional.rms_norm(x, (4,), w, 1e-6))
    assert list(nn.RMSNorm(4, elementwise_affine=False).parameters()) == []


# ---- Conv2d --------------------------------------------------------------------------------
def _conv2d_ref(x, w, b, stride, padding):
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    Ho = (xp.shape[2] - kh) // stride[0] + 1
    Wo = (xp.shape[3] - kw) // stride[1] + 1
    out = np.zeros((N, O, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            patch = xp[:, :, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
    return out if b is None else out + b[None, :, None, None]


def test_conv2d_forward_matches_numpy_and_init():
    narun.manual_seed(1)
    conv = nn.Conv2d(3, 4, kernel_size=(3, 2), stride=(2, 1), padding=1)
    x = np.random.default_rng(6).standard_normal((2, 3, 7, 6)).astype(np.float32)
    ref = _conv2d_ref(x.astype(np.float64), conv.weight.numpy().astype(np.float64),
                      conv.bias.numpy().astype(np.float64), (2, 1), (1, 1))
    np.testing.assert_allclose(conv(narun.tensor(x)).numpy(), ref, rtol=1e-4, atol=1e-5)
    big = nn.Conv2d(16, 64, 5)
    bound = 1 / math.sqrt(16 * 25)
    w = big.weight.numpy()
    assert big.weight.shape == (64, 16, 5, 5)
    assert -bound <= w.min() and w.max() <= bound and w.max() > 0.98 * bound
    assert np.abs(big.bias.numpy()).max() <= bound
    same = nn.Conv2d(3, 2, 3, padding="same")
    assert same(narun.tensor(x)).shape == (2, 2, 7, 6)
    with pytest.raises(ConfigError, match="padding"):
        nn.Conv2d(3, 2, 3, padding="full")


def test_conv2d_gradients():
    rng = np.random.default_rng(7)
    conv = nn.Conv2d(2, 2, 2, stride=1, padding=1)
    check_op(lambda x, w, b: _bind(conv, weight=w, bias=b)(x),
             lambda x, w, b: _conv2d_ref(x, w, b, (1, 1), (1, 1)),
             [rng.standard_normal((1, 2, 3, 3)), rng.standard_normal((2, 2, 2, 2)),
              rng.standard_normal(2)],
             torch_fn=lambda x, w, b: torch.nn.functional.conv2d(x, w, b, padding=1))


# ---- activations and dropout ---------------------------------------------------------------
ACTIVATIONS = [
    (nn.ReLU(), lambda x: np.maximum(x, 0)),
    (nn.GELU(), lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2)))),
    (nn.GELU("tanh"),
     lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    (nn.SiLU(), lambda x: x / (1 + np.exp(-x))),
    (nn.Tanh(), np.tanh),
    (nn.Sigmoid(), lambda x: 1 / (1 + np.exp(-x))),
    (nn.Identity(), lambda x: x),
]


@pytest.mark.parametrize("module,ref", ACTIVATIONS, ids=[repr(m) for m, _ in ACTIVATIONS])
def test_activation_modules(module, ref):
    x = np.random.default_rng(8).standard_normal((3, 5)) * 3
    check_op(module, ref, [x])


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ConfigError, match="approximate"):
        nn.GELU("fast")


def test_dropout_train_and_eval():
    narun.manual_seed(0)
    drop = nn.Dropout(0.25)
    x = narun.ones(200, 500)
    y = drop(x).numpy()
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.005
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    drop.eval()
    np.testing.assert_array_equal(drop(x).numpy(), x.numpy())
    with pytest.raises(ConfigError, match="Dropout"):
        nn.Dropout(1.5)


# ---- seeding and containers ----------------------------------------------------------------
def _model() -> nn.Module:
    return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16),
                         nn.Conv2d(1, 2, 3), nn.Linear(16, 4))


def test_seed_reproduces_model():
    narun.manual_seed(1234)
    a = _model().state_dict()
    narun.manual_seed(1234)
    b = _model().state_dict()
    c = _model().state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
    assert not np.array_equal(a["1.weight"].numpy(), c["1.weight"].numpy())


def test_sequential_indexing():
    a, b, c = nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)
    seq = nn.Sequential(a, b, c)
    assert len(seq) == 3 and seq[0] is a and seq[-1] is c and list(seq) == [a, b, c]
    head = seq[:2]
    assert isinstance(head, nn.Sequential) and list(head) == [a, b]
    x = narun.tensor([[1.0, -1.0]])
    np.testing.assert_allclose(seq(x).numpy(), c(b(a(x))).numpy())
    del seq[1]
    assert [n for n, _ in seq.named_children()] == ["0", "1"] and seq[1] is c
    named = nn.Sequential(OrderedDict([("enc", a), ("act", b)]))
    assert [n for n, _ in named.named_parameters()] == ["enc.weight", "enc.bias"]
    with pytest.raises(IndexError, match="out of range"):
        seq[5]


def test_module_list_and_dict():
    layers = nn.ModuleList([nn.Linear(2, 2)])
    layers.append(nn.ReLU())
    layers.extend([nn.Tanh()])
    layers.insert(0, nn.Identity())
    assert [type(m).__name__ for m in layers] == ["Identity", "Linear", "ReLU", "Tanh"]
    assert [n for n, _ in layers.named_parameters()] == ["1.weight", "1.bias"]
    assert len(layers[1:]) == 3
    del layers[0]
    assert isinstance(layers[0], nn.Linear)
    with pytest.raises(TypeError, match="append"):
        layers.extend(nn.Linear(1, 1))
    with pytest.raises(NotImplementedError):
        layers(narun.zeros(1))

    d = nn.ModuleDict({"b": nn.Linear(1, 1)})
    d["a"] = nn.Linear(1, 2)
    assert list(d) == ["b", "a"] and "a" in d and len(d) == 2
    assert [n for n, _ in d.named_parameters()][-1] == "a.bias"
    assert isinstance(d.pop("b"), nn.Linear) and list(d.keys()) == ["a"]
    with pytest.raises(KeyError, match="keys are"):
        d["zz"]


# ---- learning ------------------------------------------------------------------------------
def test_mlp_memorises_a_batch_with_adam():
    narun.manual_seed(0)
    rng = np.random.default_rng(0)
    x = narun.tensor(rng.standard_normal((32, 20)).astype(np.float32))
    y = narun.tensor(rng.integers(0, 5, 32))
    model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 5))
    opt = optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.0
    assert losses[-1] < 1e-2, losses[-1]
    assert all(p.dtype == np.float32 for p in model.parameters())


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_layers_match_torch_with_same_weights():
    rng = np.random.default_rng(9)
    pairs = [
        (nn.Linear(4, 3), torch.nn.Linear(4, 3, dtype=torch.float64), (2, 4)),
        (nn.LayerNorm(4), torch.nn.LayerNorm(4, dtype=torch.float64), (2, 4)),
        (nn.RMSNorm(4), torch.nn.RMSNorm(4, dtype=torch.float64), (2, 4)),
        (nn.Conv2d(2, 3, 3, stride=2, padding=1),
         torch.nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=torch.float64), (1, 2, 5, 5)),
    ]
    for mine, theirs, shape in pairs:
        for p in theirs.parameters():
            torch.nn.init.normal_(p)
        mine.double().load_state_dict({k: v.detach().numpy() for k, v in
                                       theirs.state_dict().items()})
        x = rng.standard_normal(shape)
        np.testing.assert_allclose(mine(narun.tensor(x, dtype=narun.float64)).numpy(),
                                   theirs(torch.tensor(x)).detach().numpy(), rtol=1e-10,
                                   atol=1e-12, err_msg=type(mine).__name__)
