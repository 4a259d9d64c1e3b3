"""narun models as ONNX graphs (opset 20), for onnxruntime and the runtimes that read ONNX:
an MLP (input `x` (batch, features) -> `y`), a ResNet or a ViT (input `x` images (batch, 3,
H, W) -> `y` logits), and a GPT's logits for a token sequence (input `ids` int64 (batch,
seq) -> `logits` (batch, seq, vocab), any batch and seq <= block_size).

The graph is written from the model's modules, op for op as their forward computes in eval
mode (no dropout): LayerNorm as LayerNormalization, RMSNorm from its reductions, GPT-2's
tanh GELU and the exact one as Gelu, SwiGLU as x * sigmoid(x) * gate, RoPE as x * cos +
rotate_half(x) * sin with the model's own tables, attention with the causal mask as a
constant sliced to the sequence. Weights are initializers, float32.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from narun import nn
from narun.errors import ConfigError
from narun.models.gpt import GPT
from narun.models.mlp import MLP
from narun.models.resnet import ResNet
from narun.models.vit import ViT

OPSET = 20


class _Graph:
    """Nodes and initializers under fresh names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value: Any, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        value = np.asarray(value)  # (ascontiguousarray would make a scalar 1-D)
        self.inits.append(numpy_helper.from_array(value.copy(order="C"), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def linear(self, x: str, layer: Any) -> str:
        """x @ W^T + b of a narun Linear (W (out, in) stored transposed once)."""
        y = self.op("MatMul", x, self.const(_f32(layer.weight).T, "w"))
        if layer.bias is not None:
            y = self.op("Add", y, self.const(_f32(layer.bias), "b"))
        return y


def export_onnx(model: Any, path: str | os.PathLike[str]) -> Path:
    """Write `model` (an MLP, a ResNet, a ViT or a GPT) as an ONNX file at `path`; returns
    the path."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        raise ConfigError("export --format onnx: needs the onnx package; pip install "
                          "'narun[onnx]'") from None

    g = _Graph()
    if isinstance(model, MLP):
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                ["batch", model.sizes[0]])]
        g.op("Identity", _mlp(g, model, "x"), out="y")
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                 ["batch", model.sizes[-1]])]
    elif isinstance(model, (ResNet, ViT)):
        channels = (model.stem if isinstance(model, ResNet) else model.patch).in_channels
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                ["batch", channels, "height", "width"])]
        g.op("Identity", (_resnet if isinstance(model, ResNet) else _vit)(g, model, "x"),
             out="y")
        classes = (model.fc if isinstance(model, ResNet) else model.head).weight.shape[0]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])]
    elif isinstance(model, GPT):
        inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])]
        g.op("Identity", _gpt(g, model, "ids"), out="logits")
        outputs = [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch", "seq", model.config.vocab_size])]
    else:
        raise ConfigError(f"export --format onnx: exports an MLP, a ResNet, a ViT or a GPT, "
                          f"not {type(model).__name__}")
    graph = helper.make_graph(g.nodes, type(model).__name__.lower(), inputs, outputs,
                              g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="narun")
    onnx.checker.check_model(proto)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(p))
    return p


def _f32(t: Any) -> np.ndarray:
    return np.asarray(t.numpy() if hasattr(t, "numpy") else t, dtype=np.float32)


def _mlp(g: _Graph, model: MLP, x: str) -> str:
    for layer in model.net:
        if isinstance(layer, nn.Linear):
            x = g.linear(x, layer)
        elif isinstance(layer, nn.ReLU):
            x = g.op("Relu", x)
        elif isinstance(layer, nn.GELU):
            x = g.op("Gelu", x, approximate=layer.approximate)
        elif isinstance(layer, nn.SiLU):
            x = g.op("Mul", x, g.op("Sigmoid", x))
        elif isinstance(layer, nn.Tanh):
            x = g.op("Tanh", x)
        else:
            raise ConfigError(f"export --format onnx: no ONNX form for {type(layer).__name__}")
    return x


def _gpt(g: _Graph, model: GPT, ids: str) -> str:
    cfg = model.config
    C, H = cfg.n_embd, cfg.n_head
    seq = g.op("Gather", g.op("Shape", ids), g.const(np.array(1, np.int64)), axis=0)  # T
    seq1 = g.op("Unsqueeze", seq, g.const(np.array([0], np.int64)))  # [T]
    zero = g.const(np.array([0], np.int64))
    x = g.op("Gather", g.const(_f32(model.wte.weight), "wte"), ids, axis=0)  # (B, T, C)
    rope = None
    if cfg.position == "learned":
        wpe = g.op("Slice", g.const(_f32(model.wpe.weight), "wpe"), zero, seq1, zero)
        x = g.op("Add", x, wpe)
    else:
        cos, sin = model.rope_for(cfg.block_size, model.wte.weight)
        rope = tuple(g.op("Slice", g.const(_f32(t), n), zero, seq1, zero)  # (T, D)
                     for t, n in ((cos, "cos"), (sin, "sin")))
    # True above the diagonal: a query never sees a later key
    future = np.triu(np.ones((cfg.block_size, cfg.block_size), dtype=bool), k=1)
    both = g.const(np.array([0, 1], np.int64))
    ends = g.op("Concat", seq1, seq1, axis=0)
    mask = g.op("Slice", g.const(future, "future"), g.const(np.zeros(2, np.int64)), ends, both)
    for block in model.h:
        attn = block.attn
        x = g.op("Add", x, _attention(g, _norm(g, block.ln_1, x), attn.qkv, attn.proj, H, C,
                                      mask, rope))
        x = g.op("Add", x, _mlp_block(g, block.mlp, _norm(g, block.ln_2, x)))
    x = _norm(g, model.ln_f, x)
    head = model.wte if cfg.tie_weights else model.lm_head
    return g.op("MatMul", x, g.const(_f32(head.weight).T, "head"))


def _attention(g: _Graph, h: str, qkv_layer: Any, proj: Any, H: int, C: int,
               future: str | None = None, rope: tuple[str, str] | None = None) -> str:
    """proj(softmax(q k^T / sqrt(D)) v) of the fused projection `qkv_layer` of h (B, T, C),
    by heads; `future` (bool (T, T), True above the diagonal) masks later keys."""
    D = C // H
    qkv = g.op("Reshape", g.linear(h, qkv_layer), g.const(np.array([0, 0, 3, H, D], np.int64)))
    q, k, v = (g.op("Transpose", g.op("Gather", qkv, g.const(np.array(i, np.int64)), axis=2),
                    perm=[0, 2, 1, 3]) for i in range(3))  # (B, H, T, D)
    if rope is not None:
        q, k = _rotate(g, q, rope, D), _rotate(g, k, rope, D)
    scale = g.const(np.array(1.0 / math.sqrt(D), np.float32))
    s = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale)
    if future is not None:
        s = g.op("Where", future, g.const(np.array(-np.inf, np.float32)), s)
    y = g.op("Transpose", g.op("MatMul", g.op("Softmax", s, axis=-1), v), perm=[0, 2, 1, 3])
    return g.linear(g.op("Reshape", y, g.const(np.array([0, 0, C], np.int64))), proj)


def _norm(g: _Graph, norm: Any, x: str) -> str:
    w = g.const(_f32(norm.weight), "norm_w") if norm.weight is not None else None
    if isinstance(norm, nn.LayerNorm):
        if w is None:
            w = g.const(np.ones(norm.normalized_shape, np.float32), "norm_w")
        args = [x, w] + ([g.const(_f32(norm.bias), "norm_b")] if norm.bias is not None else [])
        return g.op("LayerNormalization", *args, axis=-1, epsilon=float(norm.eps))
    eps = norm.eps if norm.eps is not None else float(np.finfo(np.float32).eps)
    ms = g.op("ReduceMean", g.op("Mul", x, x), g.const(np.array([-1], np.int64)), keepdims=1)
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", ms, g.const(np.array(eps, np.float32)))))
    return g.op("Mul", y, w) if w is not None else y


def _mlp_block(g: _Graph, mlp: Any, h: str) -> str:
    if mlp.kind == "swiglu":
        a = g.linear(h, mlp.w1)
        u = g.op("Mul", g.op("Mul", a, g.op("Sigmoid", a)), g.linear(h, mlp.w3))
        return g.linear(u, mlp.w2)
    return g.linear(g.op("Gelu", g.linear(h, mlp.fc), approximate="tanh"), mlp.proj)


def _rotate(g: _Graph, x: str, rope: tuple[str, str], D: int) -> str:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1) for the halves x1 | x2."""
    cos, sin = rope
    half = g.const(np.array([D // 2, D // 2], np.int64))
    x1 = g.name("x1")
    x2 = g.name("x2")
    from onnx import helper

    g.nodes.append(helper.make_node("Split", [x, half], [x1, x2], axis=-1))
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def _conv(g: _Graph, conv: Any, x: str) -> str:
    w = g.const(_f32(conv.weight), "conv_w")
    args = [x, w] + ([g.const(_f32(conv.bias), "conv_b")] if conv.bias is not None else [])
    kh, kw = conv.weight.shape[2:]
    if isinstance(conv.padding, str):
        raise ConfigError(f"export --format onnx: Conv2d padding {conv.padding!r}; give the "
                          f"padding in pixels")
    (ph, pw), (sh, sw) = conv.padding, conv.stride
    return g.op("Conv", *args, kernel_shape=[kh, kw], pads=[ph, pw, ph, pw], strides=[sh, sw],
                dilations=list(conv.dilation))


def _batchnorm(g: _Graph, bn: Any, x: str) -> str:
    """Eval mode: the running statistics."""
    C = bn.num_features
    scale = _f32(bn.weight) if bn.weight is not None else np.ones(C, np.float32)
    shift = _f32(bn.bias) if bn.bias is not None else np.zeros(C, np.float32)
    return g.op("BatchNormalization", x, g.const(scale, "bn_scale"), g.const(shift, "bn_b"),
                g.const(_f32(bn.running_mean), "bn_mean"),
                g.const(_f32(bn.running_var), "bn_var"), epsilon=bn.eps)


def _resnet(g: _Graph, model: ResNet, x: str) -> str:
    x = g.op("Relu", _batchnorm(g, model.bn, _conv(g, model.stem, x)))
    for block in model.layers:
        out = g.op("Relu", _batchnorm(g, block.bn1, _conv(g, block.conv1, x)))
        out = _batchnorm(g, block.bn2, _conv(g, block.conv2, out))
        if block.shortcut is not None:
            x = _batchnorm(g, block.shortcut[1], _conv(g, block.shortcut[0], x))
        x = g.op("Relu", g.op("Add", out, x))
    pooled = g.op("Flatten", g.op("GlobalAveragePool", x), axis=1)
    return g.linear(pooled, model.fc)


def _vit(g: _Graph, model: ViT, x: str) -> str:
    C = model.pos.shape[-1]
    p = _conv(g, model.patch, x)  # (N, C, h, w)
    tokens = g.op("Transpose", g.op("Reshape", p, g.const(np.array([0, C, -1], np.int64))),
                  perm=[0, 2, 1])  # (N, h * w, C)
    batch = g.op("Slice", g.op("Shape", x), g.const(np.array([0], np.int64)),
                 g.const(np.array([1], np.int64)))
    cls_shape = g.op("Concat", batch, g.const(np.array([1, C], np.int64)), axis=0)
    cls = g.op("Expand", g.const(_f32(model.cls), "cls"), cls_shape)
    h = g.op("Add", g.op("Concat", cls, tokens, axis=1), g.const(_f32(model.pos), "pos"))
    for block in model.blocks:
        h = g.op("Add", h, _attention(g, _norm(g, block.ln_1, h), block.qkv, block.proj,
                                      block.heads, C))
        u = g.op("Gelu", g.linear(_norm(g, block.ln_2, h), block.fc), approximate=block.gelu)
        h = g.op("Add", h, g.linear(u, block.out))
    first = g.op("Gather", _norm(g, model.ln, h), g.const(np.array(0, np.int64)), axis=1)
    return g.linear(first, model.head)
