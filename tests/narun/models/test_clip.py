"""CLIP against an independent PyTorch implementation with the same weights (float64): logits,
the contrastive loss (with and without soft targets) and every parameter's gradient; its
tokenization, its zero-shot scores against a NumPy computation, and a short training run."""

from __future__ import annotations

import json

import numpy as np
import pytest

import narun
from narun.config import config_from_dict
from narun.data import make_shapes_npz, shape_prompts
from narun.errors import ConfigError
from narun.events import JsonLinesReporter
from narun.models import CLIP
from narun.models.clip import EOT, tokenize
from narun.train import build_job, check_job, train

torch = pytest.importorskip("torch")
tnn = torch.nn
TF = torch.nn.functional
from tests.narun.models.test_resnet import TorchResNet  # noqa: E402
from tests.narun.models.test_vit import TorchViT  # noqa: E402
from tests.narun.models.torch_encoder import TorchBlock  # noqa: E402

SIZES = {"embed_dim": 16, "image_size": 16, "patch_size": 4, "vision_dim": 32,
         "vision_depth": 2, "vision_heads": 4, "vision_channels": [4, 8], "vision_blocks": [1, 2],
         "context_length": 16, "text_dim": 24, "text_depth": 2, "text_heads": 3, "mlp_ratio": 2}


class TorchCLIP(tnn.Module):
    def __init__(self, vision, embed_dim, image_size, patch_size, vision_dim, vision_depth,
                 vision_heads, vision_channels, vision_blocks, context_length, text_dim,
                 text_depth, text_heads, mlp_ratio):
        super().__init__()
        self.visual = (TorchResNet(embed_dim, vision_channels, vision_blocks) if vision == "resnet"
                       else TorchViT(embed_dim, image_size, patch_size, vision_dim, vision_depth,
                                     vision_heads, mlp_ratio))
        self.tok, self.pos = tnn.Embedding(257, text_dim), tnn.Embedding(context_length, text_dim)
        self.text_blocks = tnn.Sequential(*(TorchBlock(text_dim, text_heads, mlp_ratio * text_dim,
                                                       causal=True)
                                            for _ in range(text_depth)))
        self.ln_final = tnn.LayerNorm(text_dim)
        self.text_proj = tnn.Linear(text_dim, embed_dim, bias=False)
        self.logit_scale = tnn.Parameter(torch.tensor(0.0))

    def forward(self, images, ids):
        img = TF.normalize(self.visual(images), dim=-1)
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        x = self.ln_final(self.text_blocks(x))
        first_eot = (ids == 256).int().argmax(dim=1)
        txt = TF.normalize(self.text_proj(x[torch.arange(len(ids)), first_eot]), dim=-1)
        return self.logit_scale.clamp(max=np.log(100)).exp() * img @ txt.T

    def loss(self, images, ids, captions, soft):
        logits = self(images, ids)
        if soft:  # probability targets: uniform over the rows with the same caption
            same = torch.tensor(captions[:, None] == captions[None, :], dtype=torch.float64)
            target = same / same.sum(1, keepdim=True)
        else:
            target = torch.arange(len(ids))
        return logits, (TF.cross_entropy(logits, target) + TF.cross_entropy(logits.T, target)) / 2


def float64_clip(vision="vit", **options):
    narun.set_default_dtype(narun.float64)
    try:
        narun.manual_seed(0)
        return CLIP(vision=vision, **SIZES, **options)
    finally:
        narun.set_default_dtype(narun.float32)


@pytest.mark.parametrize("vision, soft", [("resnet", True), ("resnet", False), ("vit", True)])
def test_clip_matches_torch(vision, soft):
    ours = float64_clip(vision, soft_targets=soft)
    theirs = TorchCLIP(vision, **SIZES).double()
    theirs.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in ours.state_dict().items()})
    theirs.train()  # a ResNet's BatchNorm: batch statistics, as ours in training mode
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 3, 16, 16))
    # a repeated caption (rows 0 and 3) is where soft and hard targets differ
    captions = np.array(["a red circle", "big blue square", "x", "a red circle",
                         "stripes", "a héllo"])
    logits = ours(narun.tensor(images), captions)
    loss = ours.loss(narun.tensor(images), captions)
    loss.backward()
    t_logits, t_loss = theirs.loss(torch.tensor(images), torch.tensor(tokenize(captions, 16)),
                                   captions, soft)
    t_loss.backward()
    np.testing.assert_allclose(logits.numpy(), t_logits.detach().numpy(), rtol=1e-10,
                               atol=1e-12)
    assert loss.item() == pytest.approx(t_loss.item(), rel=1e-12)
    named = dict(theirs.named_parameters())
    assert sorted(named) == sorted(name for name, _ in ours.named_parameters())
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), named[name].grad.numpy(), rtol=1e-8,
                                   atol=1e-12, err_msg=name)
    # both directions count: without the text -> image term the loss would differ
    rows = theirs(torch.tensor(images), torch.tensor(tokenize(captions, 16)))
    assert abs(TF.cross_entropy(rows, torch.arange(6)).item() - t_loss.item()) > 1e-3


def test_soft_and_hard_targets_agree_on_distinct_captions():
    soft, hard = float64_clip(soft_targets=True), float64_clip(soft_targets=False)
    images = narun.tensor(np.random.default_rng(1).standard_normal((4, 3, 16, 16)))
    captions = np.array(["a", "b", "c", "d"])
    assert soft.loss(images, captions).item() == pytest.approx(
        hard.loss(images, captions).item(), rel=1e-12)


def test_the_learned_temperature_starts_at_1_over_0_07_and_is_clamped_at_100():
    model = float64_clip()
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-12)
    model.logit_scale.data[...] = np.log(1000.0)
    scale = model.scale()
    scale.backward()
    assert scale.item() == pytest.approx(100.0, rel=1e-12)
    assert model.logit_scale.grad.item() == 0.0


def test_captions_are_bytes_then_end_of_text_padding():
    ids = tokenize(["ab", "é", ""], 5)
    assert ids.tolist() == [[97, 98, EOT, EOT, EOT], [0xC3, 0xA9, EOT, EOT, EOT],
                            [EOT] * 5]
    with pytest.raises(ConfigError, match=r"'abcde' is 5 bytes; .* model.context_length >= 6, "
                                          r"got 5"):
        tokenize(["ab", "abcde"], 5)


def test_padding_after_the_end_of_text_token_cannot_change_a_caption():
    model = float64_clip()
    ids = tokenize(["a red circle"], 16)
    other = ids.copy()
    other[0, -1] = ord("z")  # after the first EOT: causal attention keeps it out
    np.testing.assert_array_equal(model.encode_text(ids).numpy(),
                                  model.encode_text(other).numpy())
    other[0, 0] = ord("b")
    assert not np.allclose(model.encode_text(ids).numpy(), model.encode_text(other).numpy())


def test_zero_shot_scores_sum_each_class_prompts_probabilities():
    model = float64_clip()
    prompts = np.array([["a red circle", "a blue circle"], ["red stripes", "blue stripes"],
                        ["a red square", "a blue square"]])
    images = narun.tensor(np.random.default_rng(2).standard_normal((5, 3, 16, 16)))
    model.logit_scale.data[...] = np.log(50.0)  # peaked softmaxes: the shift must hold
    scores = model.classifier(prompts)(images).numpy()

    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    logits = 50.0 * unit(model.visual(images).numpy()) @ unit(
        model.encode_text(prompts.reshape(-1)).numpy()).T
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # over all 6 prompts
    class_p = p.reshape(5, 3, 2).sum(axis=2)
    np.testing.assert_allclose(np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True),
                               class_p, rtol=1e-10)
    np.testing.assert_allclose(scores, np.log(np.exp(logits).reshape(5, 3, 2).sum(axis=2)),
                               rtol=1e-10)


def tiny_config(tmp_path, **training):
    path = make_shapes_npz(tmp_path / "shapes.npz", n=96, size=16, seed=0)
    return config_from_dict({
        "model": {"name": "clip", **SIZES, "vision_dim": 16, "vision_depth": 1,
                  "text_dim": 12, "text_depth": 1, "context_length": 25},
        "data": {"kind": "arrays", "path": str(path), "val_fraction": 0.25},
        "training": {"steps": 12, "batch_size": 16, "lr": 3e-3, "warmup_steps": 0,
                     "eval_every": 0, "checkpoint_every": 0, "out_dir": str(tmp_path / "run"),
                     **training},
    })


def test_job_accuracy_is_zero_shot_on_the_validation_split(tmp_path):
    job = build_job(tiny_config(tmp_path))
    arrays = np.load(tmp_path / "shapes.npz")
    x, y = arrays["x"][72:], arrays["y"][72:]  # the last quarter: the validation rows
    accuracy = job.accuracy()
    assert job.model.training  # accuracy puts it back
    job.model.eval()  # the ResNet's BatchNorm with its running statistics, as accuracy does
    with narun.no_grad():
        scores = job.model.classifier(shape_prompts())(narun.tensor(x)).numpy()
    assert accuracy == pytest.approx(np.mean(scores.argmax(axis=1) == y))
    assert len(job.val_data) == 24 and job.val_data.names == ("x", "captions")


class Events(JsonLinesReporter):
    def __init__(self):
        self.events = []

    def emit(self, event, **fields):
        self.events.append({"event": event, **fields})


def test_training_on_captions_lowers_the_contrastive_loss(tmp_path):
    events = Events()
    done = train(tiny_config(tmp_path), events)
    losses = [e["loss"] for e in events.events if e["event"] == "step"]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    json.dumps(done)  # the done event's fields are plain values
    assert done["val_loss"] > 0


@pytest.mark.parametrize("runtime, training, match", [
    ({"mode": "ps-sync", "workers": 2}, {}, "compares each image with every caption.*mode local"),
    ({"mode": "pipeline"}, {}, "mode pipeline splits.*mode local"),
    ({}, {"grad_accum": 2}, "training.grad_accum: .*set grad_accum 1"),
])
def test_modes_that_split_the_batch_are_refused(tmp_path, runtime, training, match):
    cfg = tiny_config(tmp_path, **training)
    data = {"model": {"name": "clip"}, "data": {"kind": "arrays", "path": cfg.data.path},
            "runtime": runtime, "training": training}
    with pytest.raises(ConfigError, match=match):
        check_job(config_from_dict(data))


@pytest.mark.parametrize("options, match", [
    ({"vision": "cnn"}, "model.vision: expected one of resnet, vit, got 'cnn'"),
    ({"vision": "vit", "vision_dim": 30}, "model.vision_dim: 30 must be divisible by "
                                          "model.vision_heads 4"),
    ({"text_dim": 30}, "model.text_dim: 30 is not divisible by model.text_heads 4"),
])
def test_sizes_that_do_not_fit_are_refused_naming_the_key(options, match):
    with pytest.raises(ConfigError, match=match):
        CLIP(**options)
