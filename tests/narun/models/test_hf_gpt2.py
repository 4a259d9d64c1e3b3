"""Export to Hugging Face's GPT-2 and back: transformers' own GPT2LMHeadModel, loaded from
what narun wrote, gives narun's logits; an imported directory gives the model back exactly;
the CLI round trip gives a run that evaluates as the original."""

from __future__ import annotations

import json

import numpy as np
import pytest

import narun
from narun.cli import main
from narun.errors import ConfigError
from narun.models import GPT, gpt_config, load_trained
from narun.models.hf_gpt2 import export_hf_gpt2, import_hf_gpt2


def small(**overrides):
    narun.manual_seed(0)
    return GPT(gpt_config("gpt2-tiny", n_layer=2, n_embd=64, n_head=4, block_size=32,
                          **overrides)).eval()


def logits(model, ids):
    with narun.no_grad():
        return model(ids).numpy()


@pytest.mark.parametrize("overrides", [{}, {"tie_weights": False, "mlp_hidden": 96}])
def test_transformers_gives_narun_s_logits(tmp_path, overrides):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = small(**overrides)
    export_hf_gpt2(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = np.random.default_rng(0).integers(0, 256, (2, 20))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, logits(model, ids), rtol=0, atol=1e-4)
    back = import_hf_gpt2(tmp_path)
    np.testing.assert_array_equal(logits(back, ids), logits(model, ids))


def test_a_gpt_that_is_not_gpt2_is_refused_by_what_differs(tmp_path):
    narun.manual_seed(0)
    modern = GPT(gpt_config("gpt-modern-tiny", n_layer=1, block_size=16))
    with pytest.raises(ConfigError, match="norm 'rmsnorm'.*mlp 'swiglu'.*position 'rope'"):
        export_hf_gpt2(modern, tmp_path)


def test_the_cli_round_trip_gives_a_run_that_evaluates_as_the_original(tmp_path, capsys):
    run = tmp_path / "run"
    config = {"model": {"name": "gpt", "preset": "gpt2-tiny", "n_layer": 1, "n_embd": 32,
                        "n_head": 2, "block_size": 32},
              "data": {"kind": "text", "seq_len": 32},
              "training": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_every": 0,
                           "out_dir": str(run)}}
    (tmp_path / "job.yaml").write_text(json.dumps(config))
    assert main(["train", str(tmp_path / "job.yaml"), "--json"]) == 0
    assert main(["export", str(run), "--format", "hf-gpt2", "--out", str(tmp_path / "hf"),
                 "--json"]) == 0
    assert main(["import", "hf-gpt2", str(tmp_path / "hf"), "--out", str(tmp_path / "back"),
                 "--json"]) == 0
    assert main(["evaluate", str(run), "--json"]) == 0
    assert main(["evaluate", str(tmp_path / "back"), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    evals = [e["val_loss"] for e in lines if e["event"] == "eval"]
    # the same weights; the imported run's config evaluates in batches of its default size
    assert len(evals) == 2 and evals[1] == pytest.approx(evals[0], rel=1e-7)
    original, imported = load_trained(run).model, load_trained(tmp_path / "back").model
    for (name, a), b in zip(original.state_dict().items(), imported.state_dict().values()):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=name)
