"""MLP: forward against a NumPy reference with the model's own weights; bad configs."""

import math

import numpy as np
import pytest

import narun
from narun.errors import ConfigError
from narun.models import MLP, build_model

_erf = np.vectorize(math.erf)
NP_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),  # exact, as torch's GELU
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
}


def np_mlp(weights, biases, x, activation):
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = x @ w.T + (0.0 if b is None else b)
        if i < len(weights) - 1:
            x = NP_ACTIVATIONS[activation](x)
    return x


def linear_weights(model):
    layers = [m for m in model.net if hasattr(m, "weight")]
    return ([m.weight.numpy() for m in layers],
            [None if m.bias is None else m.bias.numpy() for m in layers])


@pytest.mark.parametrize("activation", sorted(NP_ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_numpy(activation, bias):
    narun.manual_seed(0)
    model = MLP([5, 7, 6, 3], activation, bias=bias).to(dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((9, 5)) * 2.0
    weights, biases = linear_weights(model)
    assert [w.shape for w in weights] == [(7, 5), (6, 7), (3, 6)]
    assert all((b is None) != bias for b in biases)
    out = model(narun.tensor(x))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.numpy(), np_mlp(weights, biases, x, activation),
                               rtol=1e-12, atol=1e-12)


def test_float32_forward_and_two_layer_net_without_hidden_activation():
    narun.manual_seed(1)
    model = MLP([4, 3])  # one Linear: no activation at all
    assert len(model.net) == 1
    x = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    out = model(narun.tensor(x))
    assert out.dtype == np.float32
    weights, biases = linear_weights(model)
    np.testing.assert_allclose(out.numpy(), x @ weights[0].T + biases[0], rtol=1e-5, atol=1e-6)


def test_gradients_match_central_differences():
    narun.manual_seed(2)
    model = MLP([3, 4, 2], "tanh").to(dtype=np.float64)
    x = np.random.default_rng(2).standard_normal((5, 3))
    w = np.random.default_rng(3).standard_normal((5, 2))  # a loss with distinct weights

    def loss_value():
        return float((model(narun.tensor(x)).numpy() * w).sum())

    (model(narun.tensor(x)) * narun.tensor(w)).sum().backward()
    for name, p in model.named_parameters():
        numeric = np.zeros(p.shape)
        for i in np.ndindex(p.shape):
            orig = p.data[i]
            p.data[i] = orig + 1e-6
            up = loss_value()
            p.data[i] = orig - 1e-6
            down = loss_value()
            p.data[i] = orig
            numeric[i] = (up - down) / 2e-6
        np.testing.assert_allclose(p.grad.numpy(), numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def test_registry_builds_the_configured_mlp():
    model = build_model("mlp", sizes=[16, 8, 4], activation="gelu")
    assert isinstance(model, MLP) and model.sizes == [16, 8, 4]
    assert sum(p.numel() for p in model.parameters()) == 16 * 8 + 8 + 8 * 4 + 4
    assert isinstance(model.net[1], narun.nn.GELU)


@pytest.mark.parametrize("sizes", [[], [5], [3, 0, 2], [-1, 2], [3.5, 2], ["16", 4],
                                   "16,4", None, [True, 2]])
def test_bad_sizes_are_config_errors(sizes):
    with pytest.raises(ConfigError, match="model.sizes"):
        MLP(sizes)


def test_bad_activation_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.activation: unknown 'sigmoid'.*relu"):
        MLP([3, 2], activation="sigmoid")
