"""The job config: YAML -> typed dataclasses. Every error names the key path and the fix.

    >>> cfg = load_config("configs/quickstart.yaml", ["training.lr=3e-4"])  # doctest: +SKIP
    >>> cfg.training.lr, cfg.runtime.mode                                   # doctest: +SKIP
    (0.0003, 'local')

Sections, keys and defaults: README.md, "Configuration" (a test holds the two equal); keys
may be added, never renamed. The model section holds `name` and `preset`; any other key in
it overrides a field of the model's config (e.g. `n_layer: 4`) and is kept in
`ModelConfig.overrides`. The model package owns those fields: it calls
`register_model_fields(name, GPTConfig)` so that unknown or mistyped model keys fail here
like any other key. For a model not registered (yet), overrides are
kept as given and `validate_model_overrides` must be called once it is.

YAML is read with one fix over YAML 1.1: exponent floats without a dot (`3e-4`, `1e5`) are
floats, not strings, in files and in `--set` values alike.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from narun.data._augment import AUGMENTATIONS
from narun.errors import ConfigError
from narun.tensor._backend import MLX_DEVICES

__all__ = [
    "ConfigError", "DataConfig", "JobConfig", "ModelConfig", "RuntimeConfig", "TrainingConfig",
    "apply_overrides", "check_trainable_device", "config_from_dict", "format_config",
    "load_config", "parse_yaml", "register_model_fields", "to_dict", "validate_model_overrides",
]

_DEVICE = re.compile(r"cpu|cuda|cuda:\d+|mps|mlx:cpu|auto")


def _key(default: Any, *, gt: float | None = None, ge: float | None = None,
         lt: float | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its range or allowed values (checked on construction)."""
    meta = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("choices", choices))
            if v is not None}
    return field(default=default, metadata=meta)


class _Section:
    """Validates and coerces every field on construction, naming `section.key` on error."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            path = f"{self.section}.{f.name}"
            value = _coerce(path, getattr(self, f.name), hints[f.name])
            _check_range(path, value, f.metadata)
            setattr(self, f.name, value)


@dataclass
class ModelConfig(_Section):
    section: ClassVar[str] = "model"
    name: str = "gpt"
    preset: str = "gpt2-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # any model-config field

    def __post_init__(self) -> None:
        super().__post_init__()
        self.overrides = validate_model_overrides(self)


@dataclass
class DataConfig(_Section):
    section: ClassVar[str] = "data"
    kind: str = _key("text", choices=("text", "arrays"))
    path: str | None = None  # null: the CPython docs text (kind text); arrays need a file
    seq_len: int = _key(128, gt=0)
    val_fraction: float = _key(0.05, ge=0, lt=1)
    # arrays of images (N, C, H, W): training batches get these, drawn per (seed, step)
    # (narun.data.augment_images): hflip, vflip, shift (by up to max_shift pixels)
    augment: list[str] = field(default_factory=list)
    max_shift: int = _key(2, ge=0)

    def __post_init__(self) -> None:
        if isinstance(self.augment, str):  # --set data.augment=hflip,shift
            self.augment = [a.strip() for a in self.augment.split(",") if a.strip()]
        super().__post_init__()
        for name in self.augment:
            if name not in AUGMENTATIONS:
                raise ConfigError(_choice_message("data.augment", name, AUGMENTATIONS))
        if self.augment and self.kind != "arrays":
            raise ConfigError(f"data.augment: flips and shifts are for images (data.kind "
                              f"arrays), got data.kind {self.kind!r}; set data.augment: []")


@dataclass
class TrainingConfig(_Section):
    section: ClassVar[str] = "training"
    steps: int = _key(2000, gt=0)
    batch_size: int = _key(16, gt=0)  # global: N trainers get batch_size / N each
    optimizer: str = _key("adamw", choices=("sgd", "adam", "adamw", "lion"))
    lr: float = _key(3.0e-4, gt=0)
    weight_decay: float = _key(0.1, ge=0)
    schedule: str = _key("cosine", choices=("cosine", "linear", "constant", "step"))
    warmup_steps: int = _key(100, ge=0)
    grad_clip: float | None = _key(1.0, ge=0)  # max global grad norm; null or 0: no clipping
    grad_accum: int = _key(1, gt=0)
    # fp16 / bf16: the model computes in that dtype, float32 masters step (narun.amp);
    # fp16 with loss scaling, bf16 without and on MLX devices only (no bfloat16 in NumPy/CuPy)
    precision: str = _key("fp32", choices=("fp32", "fp16", "bf16"))
    seed: int = _key(0, ge=0)
    eval_every: int = _key(200, ge=0)  # 0: never
    checkpoint_every: int = _key(500, ge=0)  # 0: never periodically
    keep_checkpoints: int = _key(3, gt=0)
    out_dir: str = "runs/quickstart"
    tensorboard: bool = False  # TensorBoard event files in out_dir/tensorboard/


@dataclass
class RuntimeConfig(_Section):
    section: ClassVar[str] = "runtime"
    mode: str = _key("local", choices=("local", "ps-sync", "ps-async", "pipeline"))
    workers: int = _key(0, ge=0)
    ps_shards: int = _key(1, gt=0)
    max_staleness: int = _key(4, ge=0)
    # pipeline: the model cut into `stages` stage processes, each step's batch into
    # `micro_batches`, run by `schedule` (narun.pipeline.schedule)
    stages: int = _key(0, ge=0)
    micro_batches: int = _key(1, gt=0)
    schedule: str = _key("1f1b", choices=("gpipe", "1f1b"))
    device: str = "cpu"  # cpu | cuda | cuda:N | mps | mlx:cpu | auto
    heartbeat_interval: float = _key(1.0, gt=0)
    heartbeat_timeout: float = _key(10.0, gt=0)
    max_restarts: int = _key(3, ge=0)  # restarts of any process, for the whole job
    rejoin_timeout: float = _key(30.0, gt=0)  # ps-sync waits this long for a restarted trainer
    host: str = "127.0.0.1"  # where the coordinator listens (workers connect there)
    port: int = _key(0, ge=0, lt=65536)  # the coordinator's control port; 0 picks a free one
    # agents (HOST[:PORT]) `narun launch` runs the job on; empty: `narun train` runs it here
    hosts: list[str] = field(default_factory=list)
    # the job service (`narun coordinator`): a failed job is run again from its newest
    # checkpoint this many times, with a back-off; and ends `failed` (deadline) once it has
    # run this many seconds (0: no deadline)
    job_retries: int = _key(0, ge=0)
    deadline: float = _key(0.0, ge=0)

    def __post_init__(self) -> None:
        if isinstance(self.hosts, str):  # --set runtime.hosts=h1,h2
            self.hosts = [h.strip() for h in self.hosts.split(",") if h.strip()]
        super().__post_init__()
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(
                f"runtime.device: must be one of cpu, cuda, cuda:N, mps, mlx:cpu, auto, "
                f"got {self.device!r}"
            )
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError(
                f"runtime.heartbeat_timeout: must be > runtime.heartbeat_interval "
                f"({self.heartbeat_interval}), got {self.heartbeat_timeout}"
            )


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.data.kind == "arrays" and self.data.path is None:
            raise ConfigError("data.path: required when data.kind is 'arrays' (a .npy/.npz file)")
        t = self.training
        if t.batch_size % t.grad_accum:
            raise ConfigError(f"training.grad_accum: {t.grad_accum} does not divide "
                              f"training.batch_size {t.batch_size}")
        workers = self.runtime.workers
        if self.runtime.mode in ("ps-sync", "ps-async") and workers and (
                self.training.batch_size % workers):
            raise ConfigError(
                f"training.batch_size: must be divisible by runtime.workers ({workers}) in mode "
                f"{self.runtime.mode}, got {self.training.batch_size}"
            )


def check_trainable_device(device: str, mode: str = "local") -> None:
    """Refuse a `runtime.device` narun cannot train on in `mode`, with one message wherever
    it is checked (config check, one-process training, the coordinator, each trainer): MLX
    ('mps', 'mlx:cpu') trains in one process and as parameter-server trainers, whose
    gradients and values leave the device as NumPy arrays; a pipeline's stages hand
    activations to each other as NumPy or CuPy arrays, so they do not run on MLX."""
    if device in MLX_DEVICES and mode == "pipeline":
        raise ConfigError(f"runtime.device: {device!r} (MLX) does not run mode pipeline, "
                          "whose stages exchange NumPy or CuPy activations; train it in mode "
                          "local, ps-sync or ps-async, or use cpu, cuda:N or auto")


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig, "data": DataConfig, "training": TrainingConfig,
    "runtime": RuntimeConfig,
}

# ---- model fields registered by the model package ------------------------------------------

_MODEL_FIELDS: dict[str, dict[str, Any]] = {}
_MODEL_PRESETS: dict[str, tuple[str, ...]] = {}


def register_model_fields(name: str, fields: type | Mapping[str, Any],
                          presets: Iterable[str] | None = None) -> None:
    """Declare the config fields (a dataclass type or {field: type}) and optionally the preset
    names of model `name`, so config loading checks `model.*` keys against them."""
    if dataclasses.is_dataclass(fields) and isinstance(fields, type):
        hints = _hints(fields)
        _MODEL_FIELDS[name] = {f.name: hints[f.name] for f in dataclasses.fields(fields)}
    else:
        _MODEL_FIELDS[name] = dict(fields)  # type: ignore[arg-type]
    if presets is not None:
        _MODEL_PRESETS[name] = tuple(presets)


def validate_model_overrides(model: ModelConfig) -> dict[str, Any]:
    """The model overrides checked and coerced against the registered fields of
    `model.name` (returned unchanged if that model registered none)."""
    presets = _MODEL_PRESETS.get(model.name)
    if presets is not None and model.preset not in presets:
        raise ConfigError(_choice_message("model.preset", model.preset, presets))
    if not isinstance(model.overrides, dict):
        raise ConfigError(f"model.overrides: expected a mapping, got {_show(model.overrides)}")
    known = _MODEL_FIELDS.get(model.name)
    if known is None:
        return dict(model.overrides)
    out = {}
    for key, value in model.overrides.items():
        if key not in known:
            raise ConfigError(_unknown_message(f"model.{key}", key, ["name", "preset", *known]))
        out[key] = _coerce(f"model.{key}", value, known[key])
    return out


# ---- dict <-> config --------------------------------------------------------------------------


def config_from_dict(data: Mapping[str, Any] | None) -> JobConfig:
    """A validated JobConfig from plain data (sections may be missing or null: defaults)."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping of sections, got {_show(data)}")
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(_unknown_message(str(key), str(key), list(SECTIONS), "section"))
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name)
        raw = {} if raw is None else raw
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{name}: expected a mapping of keys, got {_show(raw)}")
        valid = [f.name for f in dataclasses.fields(cls) if f.name != "overrides"]
        if cls is ModelConfig:
            known = {k: v for k, v in raw.items() if k in valid}
            sections[name] = ModelConfig(**known, overrides={
                str(k): v for k, v in raw.items() if k not in valid})
            continue
        for key in raw:
            if key not in valid:
                raise ConfigError(_unknown_message(f"{name}.{key}", str(key), valid))
        sections[name] = cls(**raw)
    return JobConfig(**sections)


def to_dict(cfg: JobConfig) -> dict[str, Any]:
    """Plain data of a config, model overrides flattened back into the model section, so
    `config_from_dict(to_dict(cfg)) == cfg`."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        section = dataclasses.asdict(getattr(cfg, name))
        if name == "model":
            section.update(section.pop("overrides"))
        out[name] = section
    return out


def format_config(cfg: JobConfig) -> str:
    """The resolved config as YAML text that `load_config` reads back to an equal config."""
    return yaml.dump(to_dict(cfg), Dumper=yaml.SafeDumper, sort_keys=False)


def apply_overrides(config: Mapping[str, Any] | None, overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of `config` with each `section.key=value` applied; values are YAML
    (`3e-4` -> float, `null` -> None, `[1, 2]` -> list). Unknown keys raise ConfigError."""
    out: dict[str, Any] = copy.deepcopy(dict(config or {}))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. training.lr=3e-4")
        section, name = parts
        if section not in SECTIONS:
            raise ConfigError(_unknown_message(section, section, list(SECTIONS), "section")
                              + f" [from --set {item}]")
        types = _hints(SECTIONS[section])
        if section != "model" and (name not in types or name == "section"):
            valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
            raise ConfigError(_unknown_message(key, name, valid) + f" [from --set {item}]")
        try:
            value = yaml.load(text, Loader=_Loader) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: cannot parse value {text!r} [from --set {item}]: "
                              f"{getattr(err, 'problem', err)}") from None
        if types.get(name) in (str, str | None) and isinstance(value, (int, float, bool)):
            value = text.strip()  # a string key keeps its text, e.g. out_dir=2024
        target = out.get(section)
        if not isinstance(target, dict):
            target = out[section] = {}
        target[name] = value
    return out


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    """Read a YAML job config, apply `--set` style overrides, validate. Errors are
    ConfigError prefixed with the file name (and line, for YAML syntax errors)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except (IsADirectoryError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: cannot read config: {err}") from None
    data = parse_yaml(text, str(p))
    if not data:  # an empty file, only comments, or `{}`: all defaults is not a job
        raise ConfigError(f"{p}: the config is empty; a job config needs at least its data "
                          f"and training sections (start from configs/quickstart.yaml)")
    try:
        return config_from_dict(apply_overrides(data, overrides))
    except ConfigError as err:
        raise ConfigError(f"{p}: {err}") from None


def parse_yaml(text: str, source: str = "<string>") -> dict[str, Any]:
    """Parse config YAML; syntax errors and duplicate keys become ConfigError with the line."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {_show(data)}")
    return data


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `3e-4` as a float and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line)
            except TypeError:  # unhashable key: SafeLoader reports it
                continue
            if first != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"),
)

# ---- checks and messages ------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """`value` as type `tp` (int, float, str, bool, dict, list, tuple, Literal, X | None), or
    ConfigError; other types pass through unchecked."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else tp
    origin = typing.get_origin(tp) or tp
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(_choice_message(path, value, [str(a) for a in typing.get_args(tp)]))
        return value
    if origin is tuple and isinstance(value, list):  # YAML has no tuples
        return tuple(value)
    if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if origin is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # steps: 1e4
            return int(value)
    if origin in (str, bool, dict, list, tuple) and isinstance(value, origin):
        return value
    if origin not in (int, float, str, bool, dict, list, tuple):
        return value  # a type this checker does not know: leave it to the consumer
    what = _TYPE_WORDS.get(origin, f"a {origin.__name__}")
    if type(None) in args:
        what += " or null"
    raise ConfigError(f"{path}: expected {what}, got {_show(value)}")


def _check_range(path: str, value: Any, meta: Mapping[str, Any]) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(_choice_message(path, value, meta["choices"]))
    if "gt" in meta and not value > meta["gt"]:
        raise ConfigError(f"{path}: must be > {meta['gt']}, got {value!r}")
    if "ge" in meta and not value >= meta["ge"]:
        raise ConfigError(f"{path}: must be >= {meta['ge']}, got {value!r}")
    if "lt" in meta and not value < meta["lt"]:
        raise ConfigError(f"{path}: must be < {meta['lt']}, got {value!r}")


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _suggest(word: str, valid: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.6)
    return match[0] if match else None


def _unknown_message(path: str, word: str, valid: Iterable[str], what: str = "key") -> str:
    valid = sorted(valid)
    hint = _suggest(word, valid)
    did = f"; did you mean {hint!r}?" if hint else ""
    return f"{path}: unknown {what}{did} (valid: {', '.join(valid)})"


def _choice_message(path: str, value: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    hint = _suggest(str(value), choices)
    did = f"; did you mean {hint!r}?" if hint else ""
    return f"{path}: must be one of {', '.join(choices)}, got {value!r}{did}"
