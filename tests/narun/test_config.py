import dataclasses
import pathlib
import re
import typing

import pytest
import yaml

from narun import config as C
from narun.config import (
    ConfigError,
    JobConfig,
    TrainingConfig,
    apply_overrides,
    config_from_dict,
    format_config,
    load_config,
    to_dict,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def readme_defaults() -> dict:
    """The YAML block of README.md's "Configuration" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Configuration"):]
    return yaml.safe_load(section[section.index("```yaml") + 7:section.index("```\n")])


def error_of(data):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return str(info.value)


def test_defaults_are_the_readmes():
    defaults = readme_defaults()
    assert to_dict(config_from_dict({})) == defaults
    assert to_dict(JobConfig()) == defaults
    assert config_from_dict({"training": None}) == JobConfig()  # an empty section


def test_values_are_coerced_to_their_types():
    cfg = config_from_dict({"training": {"lr": 1, "steps": 1e3},
                            "runtime": {"heartbeat_interval": 2}})
    assert cfg.training.lr == 1.0 and type(cfg.training.lr) is float
    assert cfg.training.steps == 1000 and type(cfg.training.steps) is int
    assert type(cfg.runtime.heartbeat_interval) is float


def test_unknown_key_suggests_the_closest():
    msg = error_of({"training": {"lrr": 0.1}})
    assert msg.startswith("training.lrr: unknown key; did you mean 'lr'? (valid: batch_size,")
    assert "weight_decay" in msg
    assert "did you mean" not in error_of({"training": {"zzzz": 1}})
    assert error_of({"trainig": {}}).startswith(
        "trainig: unknown section; did you mean 'training'? (valid: data, model, runtime, "
        "training)")


@pytest.mark.parametrize("data, message", [
    ({"training": {"lr": "abc"}}, "training.lr: expected a number, got 'abc' (str)"),
    ({"training": {"steps": 2.5}}, "training.steps: expected an integer, got 2.5 (float)"),
    ({"training": {"steps": True}}, "training.steps: expected an integer, got True (bool)"),
    ({"training": {"grad_clip": "x"}},
     "training.grad_clip: expected a number or null, got 'x' (str)"),
    ({"training": {"out_dir": 5}}, "training.out_dir: expected a string, got 5 (int)"),
    ({"data": {"path": ["a"]}}, "data.path: expected a string or null, got ['a'] (list)"),
    ({"runtime": 3}, "runtime: expected a mapping of keys, got 3 (int)"),
])
def test_wrong_type_names_key_value_and_type(data, message):
    assert error_of(data) == message


@pytest.mark.parametrize("data, message", [
    ({"training": {"steps": -5}}, "training.steps: must be > 0, got -5"),
    ({"training": {"lr": 0}}, "training.lr: must be > 0, got 0.0"),
    ({"training": {"weight_decay": -0.1}}, "training.weight_decay: must be >= 0, got -0.1"),
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction: must be < 1, got 1.0"),
    ({"data": {"val_fraction": -0.1}}, "data.val_fraction: must be >= 0, got -0.1"),
    ({"runtime": {"ps_shards": 0}}, "runtime.ps_shards: must be > 0, got 0"),
    ({"runtime": {"heartbeat_interval": 5, "heartbeat_timeout": 5}},
     "runtime.heartbeat_timeout: must be > runtime.heartbeat_interval (5.0), got 5.0"),
    ({"runtime": {"mode": "ps-sync", "workers": 3}},
     "training.batch_size: must be divisible by runtime.workers (3) in mode ps-sync, got 16"),
    ({"data": {"kind": "arrays"}},
     "data.path: required when data.kind is 'arrays' (a .npy/.npz file)"),
])
def test_out_of_range_names_key_and_value(data, message):
    assert error_of(data) == message


def test_bad_enum_lists_valid_values_with_nested_path():
    assert error_of({"runtime": {"mode": "ps_sync"}}) == (
        "runtime.mode: must be one of local, ps-sync, ps-async, pipeline, got 'ps_sync'; "
        "did you mean 'ps-sync'?")
    assert error_of({"training": {"schedule": "exp"}}) == (
        "training.schedule: must be one of cosine, linear, constant, step, got 'exp'")
    assert error_of({"runtime": {"device": "gpu"}}) == (
        "runtime.device: must be one of cpu, cuda, cuda:N, mps, mlx:cpu, auto, got 'gpu'")
    for device in ("cpu", "cuda", "cuda:3", "mps", "auto"):
        assert config_from_dict({"runtime": {"device": device}}).runtime.device == device


def test_dataclasses_validate_when_built_directly():
    with pytest.raises(ConfigError, match=re.escape("training.lr: must be > 0, got -1.0")):
        TrainingConfig(lr=-1)
    with pytest.raises(ConfigError, match="training.lr"):
        dataclasses.replace(JobConfig().training, lr="fast")


def test_overrides_are_yaml_typed():
    d = apply_overrides({"training": {"lr": 0.1}}, [
        "training.lr=3e-4", "training.steps=1e4", "training.seed=7", "data.path=null",
        "training.out_dir=2024", "runtime.mode=ps-async", "training.grad_clip=1E-2",
        "model.n_layer=2",
    ])
    assert d["training"] == {"lr": 3e-4, "steps": 1e4, "seed": 7, "out_dir": "2024",
                             "grad_clip": 0.01}
    assert type(d["training"]["lr"]) is float
    cfg = config_from_dict(d)
    assert (cfg.training.lr, cfg.training.steps, cfg.training.out_dir) == (3e-4, 10000, "2024")
    assert cfg.data.path is None and cfg.runtime.mode == "ps-async"
    assert cfg.model.overrides == {"n_layer": 2}


def test_overrides_do_not_mutate_the_input():
    base = {"training": {"lr": 0.1}}
    apply_overrides(base, ["training.lr=0.2"])
    assert base == {"training": {"lr": 0.1}}


def test_bad_overrides():
    with pytest.raises(ConfigError, match=re.escape(
            "training.lrr: unknown key; did you mean 'lr'?")) as info:
        apply_overrides({}, ["training.lrr=3e-4"])
    assert "[from --set training.lrr=3e-4]" in str(info.value)
    with pytest.raises(ConfigError, match="runtim: unknown section; did you mean 'runtime'"):
        apply_overrides({}, ["runtim.mode=local"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["training.lr"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["lr=1"])
    with pytest.raises(ConfigError, match="training.lr: cannot parse value '\\[1'"):
        apply_overrides({}, ["training.lr=[1"])


def test_yaml_file_with_exponent_floats_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: {name: gpt, preset: gpt2-tiny, n_layer: 2}\n"
                    "training:\n  lr: 3e-4\n  steps: 20\n")
    cfg = load_config(path, ["training.steps=40"])
    assert cfg.training.lr == 3e-4 and cfg.training.steps == 40
    assert cfg.model.overrides == {"n_layer": 2}


def test_format_config_round_trips(tmp_path):
    cfg = config_from_dict(apply_overrides({}, [
        "training.lr=1e-10", "model.n_head=4", "runtime.device=cuda:1", "data.path=x.txt"]))
    text = format_config(cfg)
    assert "n_head: 4" in text and "device: cuda:1" in text
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert load_config(path) == cfg


def test_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  lr: 0.1\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:4:1: invalid YAML")):
        load_config(path)
    path.write_text("training:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"{path}:3:3: invalid YAML: duplicate key 'lr' (first at line 2)")):
        load_config(path)
    path.write_text("training:\n  lr: abc\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"{path}: training.lr: expected a number, got 'abc' (str)")):
        load_config(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    for empty in ("", "# to do\n", "{}\n"):  # not a silent 2000-step run into runs/quickstart
        path.write_text(empty)
        with pytest.raises(ConfigError, match=re.escape(f"{path}: the config is empty")):
            load_config(path)


def test_registered_model_fields_are_checked(monkeypatch):
    monkeypatch.setattr(C, "_MODEL_FIELDS", {})
    monkeypatch.setattr(C, "_MODEL_PRESETS", {})

    @dataclasses.dataclass
    class FakeGPTConfig:
        n_layer: int = 2
        n_embd: int = 64
        dropout: float = 0.0
        bias: bool = True
        activation: typing.Literal["gelu", "relu"] = "gelu"
        window: tuple[int, int] = (0, 0)

    assert config_from_dict({"model": {"n_layr": 3}}).model.overrides == {"n_layr": 3}
    C.register_model_fields("gpt", FakeGPTConfig, presets=["gpt2-tiny", "gpt2"])
    cfg = config_from_dict({"model": {"n_layer": 3, "dropout": 0}})
    assert cfg.model.overrides == {"n_layer": 3, "dropout": 0.0}
    assert type(cfg.model.overrides["dropout"]) is float
    assert error_of({"model": {"n_layr": 3}}).startswith(
        "model.n_layr: unknown key; did you mean 'n_layer'? (valid: activation, bias, dropout,")
    assert error_of({"model": {"bias": "yes please"}}) == (
        "model.bias: expected true or false, got 'yes please' (str)")
    assert error_of({"model": {"preset": "gpt2-tine"}}) == (
        "model.preset: must be one of gpt2-tiny, gpt2, got 'gpt2-tine'; did you mean 'gpt2-tiny'?")
    assert error_of({"model": {"activation": "gelo"}}) == (
        "model.activation: must be one of gelu, relu, got 'gelo'; did you mean 'gelu'?")
    assert config_from_dict({"model": {"window": [2, 3]}}).model.overrides == {"window": (2, 3)}
    with pytest.raises(ConfigError, match="model.n_layr: unknown key"):
        load_config_from_overrides(["model.n_layr=3"])


def load_config_from_overrides(overrides):
    return config_from_dict(apply_overrides({}, overrides))
