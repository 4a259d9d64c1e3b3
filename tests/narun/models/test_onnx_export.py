"""ONNX export checked in onnxruntime: every MLP activation, the GPT-2 and the modern GPT
(RMSNorm, SwiGLU, RoPE, no biases, untied head) at several batch sizes and sequence lengths,
within 1e-4 of narun's own forward; and `narun export --format onnx` on a trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest

import narun
import narun.models
from narun.cli import main
from narun.models import GPT, MLP, gpt_config, load_trained
from narun.models.onnx_export import export_onnx

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def narun_out(model, x):
    with narun.no_grad():
        return model(narun.tensor(x)).numpy()


def onnx_out(path, name, x):
    return ort.InferenceSession(str(path)).run(None, {name: x})[0]


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_an_mlp_runs_in_onnxruntime_as_in_narun(tmp_path, activation):
    narun.manual_seed(0)
    model = MLP([12, 32, 16, 5], activation).eval()
    path = export_onnx(model, tmp_path / "mlp.onnx")
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 12)).astype(np.float32)
        np.testing.assert_allclose(onnx_out(path, "x", x), narun_out(model, x), rtol=0,
                                   atol=1e-4)


@pytest.mark.parametrize("preset,overrides", [
    ("gpt2-tiny", {}),
    ("gpt-modern-tiny", {"tie_weights": False}),
])
def test_a_gpt_runs_in_onnxruntime_as_in_narun(tmp_path, preset, overrides):
    narun.manual_seed(0)
    model = GPT(gpt_config(preset, n_layer=2, n_embd=64, n_head=4, block_size=32,
                           **overrides)).eval()
    path = export_onnx(model, tmp_path / "gpt.onnx")
    rng = np.random.default_rng(0)
    for batch, seq in ((1, 1), (2, 17), (3, 32)):  # up to the whole block
        ids = rng.integers(0, 256, (batch, seq))
        got = onnx_out(path, "ids", ids)
        assert got.shape == (batch, seq, 256)
        np.testing.assert_allclose(got, narun_out(model, ids), rtol=0, atol=1e-4)


def test_narun_export_onnx_writes_a_trained_runs_model(tmp_path):
    run = tmp_path / "run"
    config = {"model": {"name": "gpt", "preset": "gpt-modern-tiny", "n_layer": 1,
                        "n_embd": 32, "n_head": 2, "block_size": 16},
              "data": {"kind": "text", "seq_len": 16},
              "training": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 0,
                           "out_dir": str(run)}}
    (tmp_path / "job.yaml").write_text(json.dumps(config))
    assert main(["train", str(tmp_path / "job.yaml"), "--json"]) == 0
    assert main(["export", str(run), "--format", "onnx", "--out",
                 str(tmp_path / "model.onnx")]) == 0
    ids = np.random.default_rng(0).integers(0, 256, (2, 16))
    np.testing.assert_allclose(onnx_out(tmp_path / "model.onnx", "ids", ids),
                               narun_out(load_trained(run).model, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("make", [
    lambda: narun.models.ResNet(4, channels=(8, 16), blocks=(2, 1)),
    lambda: narun.models.ViT(4, image_size=16, patch_size=4, dim=32, depth=2, heads=4),
], ids=["resnet", "vit"])
def test_an_image_classifier_runs_in_onnxruntime_as_in_narun(tmp_path, make):
    narun.manual_seed(0)
    model = make()
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    model(narun.tensor(x))  # a training-mode step moves BatchNorm's running statistics
    model.eval()
    path = export_onnx(model, tmp_path / "model.onnx")
    for batch in (1, 5):
        xb = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(
            np.float32)
        np.testing.assert_allclose(onnx_out(path, "x", xb), narun_out(model, xb), rtol=0,
                                   atol=1e-4)
