"""Module and Parameter: registration, names (against torch), state dicts, modes, devices."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

import narun
from narun import nn, optim
from narun.errors import CheckpointError, DTypeError
from tests.opcheck import HAS_TORCH

if HAS_TORCH:
    import torch

    torch.set_num_threads(1)  # its spinning worker threads crawl on a shared 2-core box


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.register_buffer("scale", narun.ones(d))
        self.register_buffer("cache", narun.zeros(d), persistent=False)

    def forward(self, x: narun.Tensor) -> narun.Tensor:
        return self.norm(self.fc(x)) * self.scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList([Block(4) for _ in range(2)])
        self.heads = nn.ModuleDict({"cls": nn.Linear(4, 3), "reg": nn.Linear(4, 1, bias=False)})
        self.seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        self.temperature = nn.Parameter(narun.ones(1))


if HAS_TORCH:
    class TBlock(torch.nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(d, d)
            self.norm = torch.nn.LayerNorm(d)
            self.register_buffer("scale", torch.ones(d))
            self.register_buffer("cache", torch.zeros(d), persistent=False)

    class TNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.blocks = torch.nn.ModuleList([TBlock(4) for _ in range(2)])
            self.heads = torch.nn.ModuleDict({"cls": torch.nn.Linear(4, 3),
                                              "reg": torch.nn.Linear(4, 1, bias=False)})
            self.seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(),
                                           torch.nn.Linear(4, 2))
            self.temperature = torch.nn.Parameter(torch.ones(1))


EXPECTED_PARAMS = [
    "temperature", "embed.weight", "blocks.0.fc.weight", "blocks.0.fc.bias",
    "blocks.0.norm.weight", "blocks.0.norm.bias", "blocks.1.fc.weight", "blocks.1.fc.bias",
    "blocks.1.norm.weight", "blocks.1.norm.bias", "heads.cls.weight", "heads.cls.bias",
    "heads.reg.weight", "seq.0.weight", "seq.0.bias", "seq.2.weight", "seq.2.bias",
]


def test_named_parameters_and_state_dict_names():
    net = Net()
    assert [n for n, _ in net.named_parameters()] == EXPECTED_PARAMS
    keys = list(net.state_dict())
    assert "blocks.0.scale" in keys and "blocks.0.cache" not in keys
    assert [n for n, _ in net.named_buffers()] == ["blocks.0.scale", "blocks.0.cache",
                                                   "blocks.1.scale", "blocks.1.cache"]
    assert [n for n, _ in net.named_children()] == ["embed", "blocks", "heads", "seq"]
    assert [n for n, _ in net.named_modules()][:5] == ["", "embed", "blocks", "blocks.0",
                                                       "blocks.0.fc"]
    assert len(list(net.parameters(recurse=False))) == 1
    assert [n for n, _ in net.blocks[0].named_parameters(prefix="b")][0] == "b.fc.weight"


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_names_match_torch():
    net, tnet = Net(), TNet()
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in tnet.named_parameters()]
    assert list(net.state_dict()) == list(tnet.state_dict())
    assert [n for n, _ in net.named_buffers()] == [n for n, _ in tnet.named_buffers()]
    assert [n for n, _ in net.named_modules()] == [n for n, _ in tnet.named_modules()]
    for (n, p), (_, tp) in zip(net.named_parameters(), tnet.named_parameters()):
        assert p.shape == tuple(tp.shape), n


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_load_torch_state_dict_values():
    net, tnet = Net(), TNet()
    sd = {k: v.detach().numpy() for k, v in tnet.state_dict().items()}
    net.load_state_dict(sd)
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), sd[k].astype(np.float32), err_msg=k)


def test_shared_parameters_listed_once_but_in_state_dict_twice():
    a = nn.Linear(3, 3)
    seq = nn.Sequential(a, nn.ReLU(), a)
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias"]
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(list(seq.modules())) == 3


def test_state_dict_is_detached_and_shares_memory():
    lin = nn.Linear(2, 3)
    sd = lin.state_dict()
    assert isinstance(sd, OrderedDict)
    assert not sd["weight"].requires_grad and type(sd["weight"]) is narun.Tensor
    assert np.shares_memory(sd["weight"].data, lin.weight.data)


def test_load_state_dict_copies_in_place():
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2)
    weight_array = dst.weight.data
    opt = optim.SGD(dst.parameters(), lr=0.5)
    dst.load_state_dict({k: v.numpy().astype(np.float64) for k, v in src.state_dict().items()})
    assert dst.weight.data is weight_array and dst.weight.dtype == np.float32
    np.testing.assert_array_equal(dst.weight.numpy(), src.weight.numpy())
    # The optimizer still updates the same arrays the module uses.
    dst.weight.grad = narun.ones(2, 3)
    opt.step()
    np.testing.assert_allclose(dst.weight.numpy(), src.weight.numpy() - 0.5, rtol=1e-6)


def test_load_state_dict_strict_errors_name_everything():
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    del sd["1.bias"]
    sd["extra.weight"] = np.zeros(3)
    sd["0.weight"] = np.zeros((3, 3), np.float32)
    before = model[0].bias.numpy().copy()
    sd["0.bias"] = np.full(2, 7.0, np.float32)
    with pytest.raises(CheckpointError) as info:
        model.load_state_dict(sd)
    msg = str(info.value)
    assert "Missing key(s) in state_dict: '1.bias'" in msg
    assert "Unexpected key(s) in state_dict: 'extra.weight'" in msg
    assert "size mismatch for 0.weight" in msg and "(3, 3)" in msg and "(2, 3)" in msg
    np.testing.assert_array_equal(model[0].bias.numpy(), before)  # nothing was copied

    # strict=False reports keys instead of raising, but shape mismatches still raise.
    with pytest.raises(CheckpointError, match="size mismatch for 0.weight"):
        model.load_state_dict(sd, strict=False)
    sd["0.weight"] = np.ones((2, 3), np.float32)
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["1.bias"] and result.unexpected_keys == ["extra.weight"]
    np.testing.assert_array_equal(model[0].weight.numpy(), np.ones((2, 3)))
    np.testing.assert_array_equal(model[0].bias.numpy(), np.full(2, 7.0))


def test_load_state_dict_rejects_non_arrays_and_wrong_kinds():
    lin = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="'weight' is a list"):
        lin.load_state_dict({"weight": [[1, 2], [3, 4]], "bias": np.zeros(2)})
    with pytest.raises(CheckpointError, match="dtype mismatch for bias"):
        lin.load_state_dict({"weight": np.zeros((2, 2)), "bias": np.zeros(2, complex)})


def test_buffers_follow_module_and_persistent_flag():
    b = Block(3)
    assert [n for n, _ in b.named_buffers()] == ["scale", "cache"]
    b.scale = narun.full((3,), 2.0)
    np.testing.assert_array_equal(b.scale.numpy(), [2, 2, 2])
    with pytest.raises(TypeError, match="buffer 'scale'"):
        b.scale = np.ones(3)
    b.double()
    assert b.scale.dtype == np.float64 and b.fc.weight.dtype == np.float64


def test_setattr_registration_and_errors():
    m = nn.Module()
    m.w = nn.Parameter(narun.zeros(2))
    m.sub = nn.Linear(2, 2)
    m.plain = 3
    assert list(m._parameters) == ["w"] and list(m._modules) == ["sub"]
    assert m.plain == 3 and "plain" not in m._parameters
    with pytest.raises(TypeError, match="parameter 'w'"):
        m.w = narun.zeros(2)
    m.w = None
    assert m.w is None and list(m.parameters()) == list(m.sub.parameters())
    with pytest.raises(AttributeError, match="'Module' object has no attribute 'missing'"):
        _ = m.missing
    with pytest.raises(KeyError, match="already exists"):
        m.register_buffer("sub", narun.zeros(1))
    with pytest.raises(KeyError, match="'.'"):
        m.register_parameter("a.b", None)
    del m.sub
    assert "sub" not in m._modules

    class Forgot(nn.Module):
        def __init__(self) -> None:
            self.fc = nn.Linear(1, 1)

    with pytest.raises(AttributeError, match="super\\(\\).__init__"):
        Forgot()


def test_forward_missing_and_call():
    with pytest.raises(NotImplementedError, match="forward"):
        nn.Module()(narun.zeros(1))
    x = narun.tensor([[1.0, -2.0]])
    np.testing.assert_array_equal(nn.Sequential(nn.ReLU(), nn.Identity())(x).numpy(),
                                  [[1.0, 0.0]])


def test_train_eval_propagate():
    net = Net()
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    net.blocks.train()
    assert net.blocks[1].fc.training and not net.training


def test_zero_grad_and_requires_grad():
    lin = nn.Linear(2, 2)
    lin(narun.ones(1, 2)).sum().backward()
    lin.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(lin.weight.grad.numpy(), np.zeros((2, 2)))
    lin.zero_grad()
    assert lin.weight.grad is None and lin.bias.grad is None
    lin.requires_grad_(False)
    assert not lin.weight.requires_grad


def test_to_dtype_keeps_parameter_objects():
    net = Net()
    params = list(net.parameters())
    net.blocks[0].fc(narun.ones(1, 4)).sum().backward()
    assert net.to(narun.float64) is net
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]
    assert all(p.dtype == np.float64 for p in params)
    assert net.blocks[0].fc.weight.grad.dtype == np.float64
    net.to("cpu", dtype=narun.float32)
    assert all(p.dtype == np.float32 for p in params)
    with pytest.raises(DTypeError):
        net.to(narun.int64)


def test_apply_visits_children_first():
    seen = []
    Net().apply(lambda m: seen.append(type(m).__name__))
    assert seen[-1] == "Net" and seen.index("Block") > seen.index("LayerNorm")


def test_get_submodule():
    net = Net()
    assert net.get_submodule("blocks.1.fc") is net.blocks[1].fc
    with pytest.raises(AttributeError, match="no submodule 'nope'"):
        net.get_submodule("blocks.nope")


def test_parameter_is_tensor_requiring_grad():
    p = nn.Parameter(narun.tensor([1.0, 2.0]))
    assert isinstance(p, narun.Tensor) and p.requires_grad and p.is_leaf
    assert repr(p).startswith("Parameter containing:\ntensor([1., 2.]")
    arr = np.zeros(3, np.float32)
    assert nn.Parameter(arr).data is arr
    assert not nn.Parameter(arr, requires_grad=False).requires_grad
    assert nn.Parameter([1.0]).dtype == np.float32


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_repr_matches_torch():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False),
                        nn.ModuleList([nn.GELU(approximate="tanh"), nn.SiLU()]))
    tnet = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
                               torch.nn.Linear(4, 2, bias=False),
                               torch.nn.ModuleList([torch.nn.GELU(approximate="tanh"),
                                                    torch.nn.SiLU()]))
    assert repr(net) == repr(tnet)
    assert repr(nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])) == repr(
        torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)]))
    assert repr(nn.LayerNorm(5)) == repr(torch.nn.LayerNorm(5))
    assert repr(nn.Embedding(5, 3, padding_idx=0)) == repr(torch.nn.Embedding(5, 3,
                                                                               padding_idx=0))
    assert repr(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)) == repr(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False))
    assert repr(nn.RMSNorm(5)) == repr(torch.nn.RMSNorm(5))
    assert repr(nn.LayerNorm(5, bias=False)) == repr(torch.nn.LayerNorm(5, bias=False))


def test_deepcopy_gives_independent_parameters():
    import copy

    net = Net()
    twin = copy.deepcopy(net)
    assert [n for n, _ in twin.named_parameters()] == EXPECTED_PARAMS
    assert isinstance(twin.blocks[0].fc.weight, nn.Parameter)
    twin.blocks[0].fc.weight.data[...] = 0
    assert np.abs(net.blocks[0].fc.weight.numpy()).max() > 0


def test_missing_attribute_suggests_a_name():
    with pytest.raises(AttributeError, match="'Linear' object has no attribute 'wieght'; did "
                                             "you mean 'weight'"):
        _ = nn.Linear(2, 2).wieght
