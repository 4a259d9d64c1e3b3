import math

import numpy as np
import pytest

import narun
from narun.errors import ConfigError, ShapeError
from narun.nn import functional as F
from tests.opcheck import HAS_TORCH, check_op, compare_with_torch

if HAS_TORCH:
    import torch
    import torch.nn.functional as TF


def np_attention(q, k, v, mask=None, causal=False, scale=None, keep=None, p=0.0):
    L, S = q.shape[-2], k.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ np.swapaxes(k, -1, -2) * scale
    if causal:
        mask = np.tril(np.ones((L, S), dtype=bool))
    if mask is not None and mask.dtype == bool:
        s = np.where(mask, s, -np.inf)
    elif mask is not None:
        s = s + mask
    with np.errstate(invalid="ignore"):
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        w = e / e.sum(axis=-1, keepdims=True)
    w = np.nan_to_num(w)  # a row that sees nothing gets zeros, as torch
    if keep is not None:
        w = w * keep / (1 - p)
    return w @ v


def qkv(rng, batch, L, S, E, Ev):
    return (rng.standard_normal(batch + (L, E)), rng.standard_normal(batch + (S, E)),
            rng.standard_normal(batch + (S, Ev)))


@pytest.mark.parametrize("batch,L,S", [((), 3, 4), ((2,), 4, 4), ((2, 2), 3, 5)])
def test_attention_plain(batch, L, S):
    q, k, v = qkv(np.random.default_rng(0), batch, L, S, 4, 3)
    check_op(F.scaled_dot_product_attention, np_attention, [q, k, v],
             torch_fn=lambda *a: TF.scaled_dot_product_attention(*a))


@pytest.mark.parametrize("L,S", [(4, 4), (3, 5)])
def test_attention_causal(L, S):
    q, k, v = qkv(np.random.default_rng(1), (2, 2), L, S, 4, 2)
    check_op(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
             lambda a, b, c: np_attention(a, b, c, causal=True), [q, k, v],
             torch_fn=lambda a, b, c: TF.scaled_dot_product_attention(a, b, c, is_causal=True))


def test_attention_bool_mask_broadcast_with_a_fully_masked_row():
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, (2, 3), 4, 5, 4, 3)
    mask = rng.random((2, 1, 4, 5)) < 0.7  # broadcast over heads
    mask[0, 0, 1] = False  # query 1 of batch 0 sees nothing: zeros out, zero gradient
    check_op(lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m),
             lambda a, b, c, m: np_attention(a, b, c, mask=m), [q, k, v, mask],
             torch_fn=lambda a, b, c, m: TF.scaled_dot_product_attention(a, b, c, attn_mask=m))


def test_attention_float_mask_is_added_and_differentiated():
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, (2, 2), 3, 4, 4, 2)
    mask = rng.standard_normal((3, 4))  # (L, S), broadcast over batch and heads
    check_op(lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m,
                                                               scale=0.3),
             lambda a, b, c, m: np_attention(a, b, c, mask=m, scale=0.3), [q, k, v, mask],
             torch_fn=lambda a, b, c, m: TF.scaled_dot_product_attention(a, b, c, attn_mask=m,
                                                                         scale=0.3))


def test_attention_key_value_broadcast_over_heads():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 3, 4, 4))
    k, v = rng.standard_normal((2, 1, 5, 4)), rng.standard_normal((2, 1, 5, 3))
    check_op(F.scaled_dot_product_attention, np_attention, [q, k, v])


def test_attention_dropout_reproduces_the_seeded_mask():
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, (2, 2), 3, 4, 4, 2)
    p = 0.4

    def fn(a, b, c):
        narun.manual_seed(7)
        return F.scaled_dot_product_attention(a, b, c, dropout_p=p, is_causal=True)

    def ref(a, b, c):
        keep = np.random.default_rng(7).random((2, 2, 3, 4), dtype=np.float32) >= p
        return np_attention(a, b, c, causal=True, keep=keep, p=p)

    check_op(fn, ref, [q, k, v])
    assert not np.allclose(fn(*map(narun.tensor, (q, k, v))).numpy(), np_attention(q, k, v,
                                                                                   causal=True))


def test_attention_float32_gradients_and_gpt_layout():
    rng = np.random.default_rng(8)
    B, H, T, D = 2, 2, 8, 4
    # q, k, v as the GPT model makes them: views into one (B, T, 3, H, D) projection
    qkv_all = rng.standard_normal((B, T, 3, H, D)).astype(np.float32)
    base = narun.tensor(qkv_all, requires_grad=True)
    parts = base.permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(parts[0], parts[1], parts[2], is_causal=True)
    assert out.dtype == np.float32
    g = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(narun.tensor(g))
    assert base.grad.dtype == np.float32
    if compare_with_torch("float32 attention on permuted views"):
        tb = torch.tensor(qkv_all, dtype=torch.float32, requires_grad=True)
        tp = tb.permute(2, 0, 3, 1, 4)
        tout = TF.scaled_dot_product_attention(tp[0], tp[1], tp[2], is_causal=True)
        tout.backward(torch.tensor(g))
        np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(base.grad.numpy(), tb.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_attention_errors():
    q = narun.tensor(np.ones((2, 3, 4)))
    with pytest.raises(ShapeError, match="must be"):
        F.scaled_dot_product_attention(q, narun.tensor(np.ones((2, 3, 5))), q)
    with pytest.raises(ShapeError, match="attn_mask of shape"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=narun.tensor(np.ones((4, 4), bool)))
    with pytest.raises(ShapeError, match="attn_mask of shape"):  # as torch: no new batch dims
        F.scaled_dot_product_attention(q, q, q, attn_mask=np.zeros((5, 2, 3, 3)))
    with pytest.raises(ConfigError, match="not both"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=np.ones((3, 3), bool), is_causal=True)
    with pytest.raises(ConfigError, match="dropout_p"):
        F.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
