import numpy as np
import pytest

import narun
from narun.errors import ConfigError, ShapeError
from narun.nn import functional as F
from tests.opcheck import HAS_TORCH, check_op

if HAS_TORCH:
    import torch


def hf_tables(T, D, base=10000.0, offset=0):
    """HF's LlamaRotaryEmbedding, in float64."""
    inv_freq = 1.0 / (base ** (np.arange(0, D, 2) / D))
    freqs = np.outer(np.arange(offset, offset + T), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def np_rope(x, cos, sin):
    h = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos + rotated * sin


def torch_rope(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin


def test_tables_match_hf_and_offset_slices():
    cos, sin = F.rotary_cos_sin(7, 8, base=500.0, dtype=np.float64)
    ec, es = hf_tables(7, 8, base=500.0)
    np.testing.assert_allclose(cos.numpy(), ec, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(sin.numpy(), es, rtol=1e-13, atol=1e-15)
    c2, s2 = F.rotary_cos_sin(3, 8, base=500.0, offset=40, dtype=np.float64)  # grows the cache
    ec2, es2 = hf_tables(3, 8, base=500.0, offset=40)
    np.testing.assert_allclose(c2.numpy(), ec2, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(s2.numpy(), es2, rtol=1e-13, atol=1e-15)
    c32, _ = F.rotary_cos_sin(7, 8, base=500.0)
    assert c32.dtype == np.float32
    with pytest.raises(ValueError):
        c32.numpy()[0, 0] = 2.0  # cached tables are read-only


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 2, 3, 8)])
def test_apply_rotary_emb(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    cos, sin = hf_tables(shape[-2], shape[-1])
    check_op(F.apply_rotary_emb, np_rope, [x, cos, sin], torch_fn=torch_rope)


def test_apply_rotary_emb_with_table_tensors_and_noncontiguous_heads():
    rng = np.random.default_rng(1)
    B, T, H, D = 2, 5, 3, 6
    qkv = narun.tensor(rng.standard_normal((B, T, 3, H, D)), requires_grad=True)
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # (B, H, T, D) view, as the GPT model makes it
    cos, sin = F.rotary_cos_sin(T, D, dtype=np.float64)
    out = F.apply_rotary_emb(q, cos, sin)
    assert out.numpy().flags.c_contiguous
    np.testing.assert_allclose(out.numpy(), np_rope(q.numpy(), *hf_tables(T, D)), rtol=1e-12)
    # rotation preserves the norm of every (i, i + D/2) pair, hence of every vector
    pair_norm = lambda a: a[..., :D // 2] ** 2 + a[..., D // 2:] ** 2  # noqa: E731
    np.testing.assert_allclose(pair_norm(out.numpy()), pair_norm(q.numpy()), rtol=1e-12)
    out.sum().backward()  # d/dx of sum(x*cos + rotate_half(x)*sin) = cos + rotate_half^T(sin)
    g = np.zeros((B, T, 3, H, D))
    c, s = hf_tables(T, D)
    h = D // 2
    gq = np.ones((B, H, T, D)) * c + np.concatenate([s[:, h:], -s[:, :h]], axis=-1)
    g[:, :, 0] = gq.transpose(0, 2, 1, 3)
    np.testing.assert_allclose(qkv.grad.numpy(), g, rtol=1e-12)


def test_rotation_at_offset_matches_the_full_sequence():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 10, 4)).astype(np.float32)
    full = F.apply_rotary_emb(narun.tensor(x), *F.rotary_cos_sin(10, 4))
    tail = F.apply_rotary_emb(narun.tensor(x[:, :, 7:]), *F.rotary_cos_sin(3, 4, offset=7))
    assert tail.dtype == np.float32
    np.testing.assert_allclose(tail.numpy(), full.numpy()[:, :, 7:], rtol=1e-6)


def test_rope_errors():
    with pytest.raises(ConfigError, match="even"):
        F.rotary_cos_sin(4, 5)
    x = narun.tensor(np.ones((1, 1, 4, 6)))
    with pytest.raises(ShapeError, match="do not broadcast"):
        F.apply_rotary_emb(x, *F.rotary_cos_sin(5, 6))
    with pytest.raises(ShapeError, match="D even"):
        F.apply_rotary_emb(narun.tensor(np.ones((4, 5))), np.ones((4, 5)), np.ones((4, 5)))
