"""A GPT-2 of narun to and from Hugging Face's layout: `model.safetensors` with
transformers' GPT-2 names plus a `config.json`, so that
`transformers.GPT2LMHeadModel.from_pretrained(DIR)` gives the same logits, and such a
directory loads back into narun.

The architectures match where narun's GPT is GPT-2: LayerNorm (eps 1e-5) with biases, the
tanh GELU ("gelu_new"), learned positions, a fused q, k, v projection split q | k | v and then
by heads. Hugging Face's GPT-2 keeps its projections as Conv1D, whose weight is (in, out):
narun's Linear weights (out, in) travel transposed. Other GPT variants (RMSNorm, SwiGLU,
RoPE, no biases) have no GPT-2 equivalent and are refused by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from narun.checkpoint._fs import atomic_write
from narun.errors import CheckpointError, ConfigError
from narun.models.gpt import GPT, GPTConfig, gpt_config

WEIGHTS, CONFIG = "model.safetensors", "config.json"
EPS = 1e-5  # narun's LayerNorm default, and GPT-2's layer_norm_epsilon

# narun name suffix -> (Hugging Face name suffix, transposed: a Conv1D weight)
_BLOCK = {
    "ln_1.weight": ("ln_1.weight", False), "ln_1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False), "ln_2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True), "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True), "mlp.proj.bias": ("mlp.c_proj.bias", False),
}
_TOP = {"wte.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight",
        "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight"}


def check_gpt2(cfg: GPTConfig) -> None:
    """ConfigError naming what keeps a narun GPT from being a Hugging Face GPT-2."""
    wrong = [f"{key} {getattr(cfg, key)!r} (GPT-2: {want!r})" for key, want in
             (("norm", "layernorm"), ("mlp", "gelu"), ("position", "learned"), ("bias", True))
             if getattr(cfg, key) != want]
    if wrong:
        raise ConfigError(f"hf-gpt2: this GPT is not a GPT-2: {', '.join(wrong)}; only the "
                          f"gpt2-* presets' architecture exports to Hugging Face's GPT-2")


def _name_map(cfg: GPTConfig) -> dict[str, tuple[str, bool]]:
    names = {k: (v, False) for k, v in _TOP.items()}
    if cfg.tie_weights:
        del names["lm_head.weight"]
    for i in range(cfg.n_layer):
        for ours, (theirs, transposed) in _BLOCK.items():
            names[f"h.{i}.{ours}"] = (f"transformer.h.{i}.{theirs}", transposed)
    return names


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """transformers' GPT2Config of a narun GPTConfig, as config.json holds it."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size,
            "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.hidden, "activation_function": "gelu_new",
            "layer_norm_epsilon": EPS, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout, "tie_word_embeddings": cfg.tie_weights,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "bos_token_id": 0, "eos_token_id": 0,
            "torch_dtype": "float32"}


def export_hf_gpt2(model: GPT, out: str | os.PathLike[str]) -> Path:
    """Write `model` to directory `out` as Hugging Face's GPT-2 (float32); returns `out`."""
    cfg = model.config
    check_gpt2(cfg)
    state = {k: np.asarray(v) for k, v in model.state_dict().items()}
    tensors = {}
    for ours, (theirs, transposed) in _name_map(cfg).items():
        value = state[ours].astype(np.float32)
        tensors[theirs] = np.ascontiguousarray(value.T if transposed else value)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    # transformers reads only archives whose metadata says which framework wrote them
    atomic_write(d / WEIGHTS, lambda tmp: safetensors.numpy.save_file(
        tensors, str(tmp), {"format": "pt"}))
    atomic_write(d / CONFIG, lambda tmp: tmp.write_text(json.dumps(hf_config(cfg), indent=2)))
    return d


def import_hf_gpt2(path: str | os.PathLike[str]) -> GPT:
    """A narun GPT (gpt2-tiny's architecture, the sizes of config.json) with the weights of
    a Hugging Face GPT-2 directory."""
    d = Path(path)
    try:
        hf = json.loads((d / CONFIG).read_text())
        tensors = safetensors.numpy.load_file(str(d / WEIGHTS))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{d}: not a Hugging Face GPT-2 directory ({CONFIG} and "
                              f"{WEIGHTS}): {err}") from None
    if hf.get("model_type") != "gpt2" or hf.get("activation_function", "gelu_new") not in (
            "gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{d}: model_type {hf.get('model_type')!r} with activation "
                              f"{hf.get('activation_function')!r}; narun imports GPT-2 "
                              f"with the tanh GELU")
    cfg = gpt_config("gpt2-tiny", vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                     n_embd=hf["n_embd"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                     mlp_hidden=hf.get("n_inner") or 4 * hf["n_embd"], dropout=0.0,
                     tie_weights=hf.get("tie_word_embeddings", True))
    state = {}
    for ours, (theirs, transposed) in _name_map(cfg).items():
        if theirs not in tensors:
            raise CheckpointError(f"{d / WEIGHTS}: no tensor {theirs!r}")
        value = tensors[theirs].astype(np.float32)
        state[ours] = np.ascontiguousarray(value.T if transposed else value)
    model = GPT(cfg)
    model.load_state_dict(state)
    return model.eval()
