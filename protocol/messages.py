"""Message types and their field schemas: the table SPEC.md lists, as data.

A ``Message`` is a type, an id and a mapping of fields. ``message()`` builds one and checks
it against its schema at once, so a wrong field fails at the sender with its name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from narun.errors import ProtocolError
from protocol.dtypes import tensor_dtype
from protocol.limits import DEFAULT_LIMITS

#: The one protocol version this code speaks (header key ``v``).
PROTOCOL_VERSION = 1
#: Header keys that are not fields.
RESERVED_KEYS = ("v", "type", "id")
#: Largest message id; ids are unsigned 64-bit.
MAX_ID = (1 << 64) - 1

ROLES = ("coordinator", "agent", "ps", "trainer", "stage", "inference", "client")
ERROR_CODES = ("protocol", "version", "unsupported", "stale", "not_found", "busy",
               "cancelled", "timeout", "internal", "invalid")
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
DONE_REASONS = ("length", "stop", "cancelled")
WORKER_ROLES = ("ps", "trainer", "stage", "inference")  # what an agent may spawn
#: The float fields that may carry NaN and +-Inf: values computed from training, where a
#: non-finite one is news the receiver must see (a diverged loss, an overflowed gradient).
#: Every other float field must be finite (SPEC.md 2.2).
NONFINITE_FLOATS = frozenset({"step_done.loss", "grad_norm.sq", "apply_step.norm",
                              "token.logprob"})


class Kind(StrEnum):
    """The type of a field, as SPEC.md spells it."""

    INT = "int"  # msgpack int, -2**63 .. 2**64-1
    FLOAT = "float"  # msgpack float64 (an int is accepted and becomes a float)
    BOOL = "bool"
    STR = "str"
    TENSOR = "tensor"  # a tensor descriptor
    TENSORS = "tensors"  # map str -> tensor descriptor
    INTS = "list[int]"
    STRS = "list[str]"
    MAP = "map"  # plain data: map str -> nil/bool/int/float/str/bin/array/map
    MAPS = "list[map]"


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    optional: bool = False
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class MessageSpec:
    type: str
    sender: str  # who sends it to whom (documentation, and SPEC.md's table)
    fields: tuple[Field, ...]
    names: frozenset[str] = field(init=False)
    required: frozenset[str] = field(init=False)
    paths: tuple[str, ...] = field(init=False)  # "type.field", for error messages
    tensors: tuple[tuple[Field, str], ...] = field(init=False)  # tensor fields, with paths

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", frozenset(f.name for f in self.fields))
        object.__setattr__(self, "required",
                           frozenset(f.name for f in self.fields if not f.optional))
        object.__setattr__(self, "paths", tuple(f"{self.type}.{f.name}" for f in self.fields))
        object.__setattr__(self, "tensors", tuple(
            (f, p) for f, p in zip(self.fields, self.paths)
            if f.kind in (Kind.TENSOR, Kind.TENSORS)))


def _f(spec: str, choices: tuple[str, ...] = ()) -> Field:
    """``"name: kind"`` or ``"name?: kind"`` (optional) -> Field; keeps the table readable."""
    name, kind = (part.strip() for part in spec.split(":", 1))
    optional = name.endswith("?")
    return Field(name.rstrip("?"), Kind(kind), optional, choices)


_SPECS = (
    MessageSpec("hello", "any peer -> the server it connects to", (
        _f("role: str", ROLES), _f("rank: int"), _f("software: str"))),
    MessageSpec("welcome", "server -> peer, reply to hello", (
        _f("role: str", ROLES), _f("software: str"), _f("heartbeat_interval: float"),
        _f("buffers?: tensors"))),
    MessageSpec("heartbeat", "actor -> coordinator, coordinator -> agent, and the echo", (
        _f("role: str", ROLES), _f("rank: int"), _f("step: int"), _f("time: float"))),
    MessageSpec("push_grads", "trainer -> ps shard", (
        _f("step: int"), _f("rank: int"), _f("version: int"), _f("grads: tensors"))),
    MessageSpec("pull_params", "trainer -> ps shard", (
        _f("keys: list[str]"), _f("min_version: int"))),
    MessageSpec("params", "ps shard -> trainer, reply to pull_params, push_grads and "
                          "apply_step", (
        _f("version: int"), _f("params: tensors"))),
    MessageSpec("grad_norm", "ps shard -> trainer, reply to push_grads when clipping; "
                             "stage -> coordinator", (
        _f("step: int"), _f("sq: float"))),
    MessageSpec("apply_step", "trainer -> ps shard, when clipping; coordinator -> stage", (
        _f("step: int"), _f("rank: int"), _f("norm: float"))),
    MessageSpec("activation", "stage -> the next stage", (
        _f("step: int"), _f("micro_batch: int"), _f("data: tensor"))),
    MessageSpec("activation_grad", "stage -> the previous stage", (
        _f("step: int"), _f("micro_batch: int"), _f("data: tensor"))),
    MessageSpec("tied_grads", "first stage -> last stage, and last -> first", (
        _f("step: int"), _f("grads: tensors"))),
    MessageSpec("step_done", "trainer or stage -> coordinator", (
        _f("step: int"), _f("rank: int"), _f("loss: float"), _f("samples: int"),
        _f("timings: map"), _f("buffers?: tensors"))),
    MessageSpec("checkpoint", "coordinator -> ps shard, and the shard's reply", (
        _f("step: int"), _f("path: str"))),
    MessageSpec("members", "coordinator -> ps shard, and the shard's reply", (
        _f("ranks: list[int]"),)),
    MessageSpec("shutdown", "coordinator -> actor, or client -> server", (
        _f("reason: str"), _f("drain: bool"))),
    MessageSpec("error", "any -> the sender of a refused or failed message", (
        _f("code: str", ERROR_CODES), _f("message: str"), _f("traceback: str"))),
    MessageSpec("generate", "client -> inference server, and server -> inference worker", (
        _f("prompt?: tensor"), _f("max_tokens: int"), _f("temperature: float"),
        _f("top_k: int"), _f("seed: int"), _f("text?: str"), _f("stop?: list[str]"))),
    MessageSpec("token", "inference server -> client", (
        _f("index: int"), _f("token: int"), _f("logprob: float"), _f("text?: str"))),
    MessageSpec("done", "inference server -> client, after the last token", (
        _f("reason: str", DONE_REASONS), _f("tokens: int"), _f("seconds: float"))),
    MessageSpec("abort", "client -> inference server, and server -> inference worker", (
        _f("reason: str"),)),
    MessageSpec("tokens", "inference worker -> inference server, once per decode step", (
        _f("ids: list[int]"), _f("tokens: list[int]"), _f("logprobs: tensor"),
        _f("finished: list[str]"))),
    MessageSpec("submit", "client -> coordinator", (
        _f("name: str"), _f("config: map"))),
    MessageSpec("status", "client -> coordinator (job alone), coordinator -> client", (
        _f("job: str"), _f("state?: str", JOB_STATES), _f("step?: int"), _f("steps?: int"),
        _f("message?: str"))),
    MessageSpec("cancel", "client -> coordinator", (
        _f("job: str"), _f("reason: str"))),
    MessageSpec("events", "client -> coordinator (subscribe), coordinator -> client", (
        _f("job: str"), _f("since: int"), _f("events?: list[map]"))),
    MessageSpec("jobs", "client -> coordinator, and the coordinator's reply", (
        _f("jobs?: list[map]"),)),
    MessageSpec("spawn", "coordinator -> agent", (
        _f("job: str"), _f("role: str", WORKER_ROLES), _f("rank: int"), _f("incarnation: int"),
        _f("spec: str"), _f("blas_threads: int"))),
    MessageSpec("spawned", "agent -> coordinator, reply to spawn", (
        _f("job: str"), _f("pid: int"), _f("log: str"))),
    MessageSpec("output", "agent -> coordinator", (
        _f("job: str"), _f("pid: int"), _f("line: str"))),
    MessageSpec("stdin", "coordinator -> agent, and the agent's reply", (
        _f("job: str"), _f("pid: int"), _f("line: str"))),
    MessageSpec("exited", "agent -> coordinator", (
        _f("job: str"), _f("pid: int"), _f("code: int"))),
    MessageSpec("kill", "coordinator -> agent, and the agent's reply", (
        _f("job: str"), _f("pid: int"), _f("signal: int"))),
    MessageSpec("log_tail", "coordinator -> agent, and the agent's reply", (
        _f("job: str"), _f("pid: int"), _f("lines: int"), _f("text?: str"))),
    MessageSpec("file_put", "coordinator -> agent, and the agent's reply", (
        _f("job: str"), _f("path: str"), _f("offset: int"), _f("data?: tensor"),
        _f("last?: bool"))),
    MessageSpec("file_get", "coordinator -> agent, and the agent's reply", (
        _f("job: str"), _f("path: str"), _f("offset: int"), _f("size: int"),
        _f("remove?: bool"), _f("data?: tensor"), _f("eof?: bool"))),
    MessageSpec("probe", "coordinator -> agent, and the agent's reply", (
        _f("address: str"), _f("ok?: bool"), _f("message?: str"), _f("slots?: int"))),
)

#: type -> schema, in SPEC.md's order.
SCHEMAS: Mapping[str, MessageSpec] = MappingProxyType({s.type: s for s in _SPECS})
#: Optional fields that only the reply form of a type carries, all of them together; the
#: request form carries none (SPEC.md 4.1). Any other mix is refused.
REPLY_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "status": ("state", "step", "steps", "message"), "events": ("events",),
    "jobs": ("jobs",)})


@dataclass(frozen=True, eq=False, slots=True)
class Message:
    """One protocol message. Tensors in a decoded message are read-only views of the
    received frames: copy (``np.array(x)``) before writing to them."""

    type: str
    id: int
    fields: Mapping[str, Any]

    def __getitem__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise KeyError(f"{self.type} message has no field {name!r}; it has "
                           f"{sorted(self.fields)}") from None

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


def spec_for(type_: object) -> MessageSpec:
    spec = SCHEMAS.get(type_) if isinstance(type_, str) else None
    if spec is None:
        raise ProtocolError(f"unknown message type {type_!r:.40}; known: {', '.join(SCHEMAS)}")
    return spec


def check_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise ProtocolError(f"message id: expected an int in [0, 2**64), got {value!r:.40}")
    return int(value)


TensorHook = Callable[[Any, str], Any]


class CheckedFields(dict):  # type: ignore[type-arg]
    """Fields that passed their schema (made by ``message()`` or ``decode``): encode
    converts only their tensors. Receivers check every message they decode regardless."""

    __slots__ = ()


def convert_fields(spec: MessageSpec, fields: Mapping[str, Any], tensor: TensorHook,
                   max_depth: int) -> dict[str, Any]:
    """Check ``fields`` against ``spec`` and convert each value, in the schema's order.

    Shared by both directions: the encoder's ``tensor`` hook turns an array into a wire
    descriptor, the decoder's turns a descriptor into an array view.
    """
    if not spec.names.issuperset(fields):
        extra = [name for name in fields if name not in spec.names]
        raise ProtocolError(f"{spec.type}: unexpected field(s) {_names(extra)}; "
                            f"expected {_names([f.name for f in spec.fields])}")
    if not spec.required.issubset(fields):
        missing = [f.name for f in spec.fields if f.name in spec.required - set(fields)]
        raise ProtocolError(f"{spec.type}: missing field(s) {_names(missing)}")
    together = REPLY_FIELDS.get(spec.type)
    if together is not None and len(fields) != len(spec.required):
        have = [name for name in together if name in fields]
        if len(have) != len(together):
            raise ProtocolError(f"{spec.type}: a reply carries all of {_names(list(together))} "
                                f"and a request none of them; got only {_names(have)}")
    out = CheckedFields()
    for f, where in zip(spec.fields, spec.paths):
        if f.name in fields:
            out[f.name] = _CONVERT[f.kind](f, fields[f.name], where, tensor, max_depth)
    return out


def _int(f: Field, value: Any, where: str, *_: Any) -> int:
    if type(value) is not int:
        if isinstance(value, bool) or not (isinstance(value, int) or _numpy_scalar(value, "iu")):
            raise _wrong(f.kind, value, where)
        value = int(value)
    if not -(1 << 63) <= value <= MAX_ID:
        raise ProtocolError(f"{where}: {value} does not fit msgpack's 64-bit ints")
    return value


def _float(f: Field, value: Any, where: str, *_: Any) -> float:
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
                _numpy_scalar(value, "fiu")):
            raise _wrong(f.kind, value, where)
        try:
            value = float(value)  # an int, or a NumPy scalar such as a loss as np.float32
        except OverflowError:
            raise ProtocolError(f"{where}: {value} does not fit a float64") from None
    if not math.isfinite(value) and where not in NONFINITE_FLOATS:
        raise ProtocolError(f"{where}: expected a finite float, got {value}")
    return value


def _bool(f: Field, value: Any, where: str, *_: Any) -> bool:
    if not isinstance(value, bool):
        raise _wrong(f.kind, value, where)
    return value


def _str(f: Field, value: Any, where: str, *_: Any) -> str:
    if not isinstance(value, str):
        raise _wrong(f.kind, value, where)
    if f.choices and value not in f.choices:
        raise ProtocolError(f"{where}: expected one of {', '.join(f.choices)}, got {value!r:.80}")
    return value


def _tensor(f: Field, value: Any, where: str, tensor: TensorHook, _: int) -> Any:
    return tensor(value, where)


def _tensors(f: Field, value: Any, where: str, tensor: TensorHook, _: int) -> dict[str, Any]:
    out = {}
    for key, item in _str_map(value, where):
        try:
            out[key] = tensor(item, where)
        except ProtocolError as exc:  # the key's path, built only now: this is per tensor
            text = str(exc)
            text = text[len(where):] if text.startswith(where) else f": {text}"
            raise ProtocolError(f"{where}[{key!r:.60}]{text}") from None
    return out


def convert_tensors(spec: MessageSpec, fields: dict[str, Any], tensor: TensorHook) -> None:
    """Convert the tensors of ``fields`` in place, and nothing else: for checked fields."""
    for f, where in spec.tensors:
        if f.name in fields:
            fields[f.name] = _CONVERT[f.kind](f, fields[f.name], where, tensor, 0)


def _map(f: Field, value: Any, where: str, _: TensorHook, max_depth: int) -> Any:
    if type(value) is not dict and not isinstance(value, Mapping):
        raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
    check_plain(value, where, max_depth)
    return value


def _list_of(item_kind: Kind) -> Callable[..., list[Any]]:
    def convert(f: Field, value: Any, where: str, tensor: TensorHook, depth: int) -> list[Any]:
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"{where}: expected {f.kind.value}, got {type(value).__name__}")
        item, one = Field(f.name, item_kind), _CONVERT[item_kind]
        return [one(item, x, f"{where}[{i}]", tensor, depth) for i, x in enumerate(value)]
    return convert


_CONVERT: dict[Kind, Callable[..., Any]] = {
    Kind.INT: _int, Kind.FLOAT: _float, Kind.BOOL: _bool, Kind.STR: _str,
    Kind.TENSOR: _tensor, Kind.TENSORS: _tensors, Kind.MAP: _map,
    Kind.INTS: _list_of(Kind.INT), Kind.STRS: _list_of(Kind.STR), Kind.MAPS: _list_of(Kind.MAP),
}


def _numpy_scalar(value: Any, kinds: str) -> bool:
    return getattr(value, "shape", None) == () and getattr(value, "dtype", None) is not None \
        and value.dtype.kind in kinds


def _wrong(kind: Kind, value: Any, where: str) -> ProtocolError:
    return ProtocolError(f"{where}: expected {kind.value}, got {type(value).__name__} "
                         f"{value!r:.80}")


_PLAIN_SCALARS = (type(None), bool, float, str, bytes)


def check_plain(value: Any, where: str, max_depth: int) -> None:
    """Plain data only (what msgpack maps to without extensions), nested at most max_depth."""
    problem = _plain_problem(value, 0, max_depth)
    if problem is not None:
        if len(problem) > 400:  # a deep path: keep where it starts and what is wrong
            problem = f"{problem[:150]}...{problem[-250:]}"
        raise ProtocolError(where + problem)


def _plain_problem(item: Any, depth: int, max_depth: int) -> str | None:
    # Returns the path below `item` and what is wrong there; paths are only built on error.
    if type(item) in _PLAIN_SCALARS:
        return None
    if type(item) is int or (isinstance(item, int) and not isinstance(item, bool)):
        return None if -(1 << 63) <= item <= MAX_ID else \
            f": {item} does not fit msgpack's 64-bit ints"
    if depth > max_depth:  # only containers count (SPEC.md 2.2), scalars are no level
        return f": nested deeper than {max_depth} levels"
    if isinstance(item, (list, tuple)):
        for i, x in enumerate(item):
            problem = _plain_problem(x, depth + 1, max_depth)
            if problem is not None:
                return f"[{i}]{problem}"
        return None
    if isinstance(item, Mapping):
        for key, x in item.items():
            if not isinstance(key, str):
                return f": map keys must be str, got {type(key).__name__} {key!r:.40}"
            problem = _plain_problem(x, depth + 1, max_depth)
            if problem is not None:
                return f"[{key!r:.60}]{problem}"
        return None
    if isinstance(item, _PLAIN_SCALARS):  # subclasses, e.g. a str enum
        return None
    return (": expected plain data (nil, bool, int, float, str, bytes, list, map), "
            f"got {type(item).__name__}")


def _str_map(value: Any, where: str) -> list[tuple[str, Any]]:
    if type(value) is not dict and not isinstance(value, Mapping):  # (the ABC check is slow)
        raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
    items = list(value.items())
    for key, _ in items:
        if type(key) is not str and not isinstance(key, str):
            raise ProtocolError(f"{where}: map keys must be str, got {type(key).__name__} "
                                f"{key!r:.40}")
    return items


def _names(names: list[Any]) -> str:
    # names may come from a peer: show a few, each cut short
    shown = ", ".join(f"{n!r:.40}" for n in names[:8])
    return shown + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _check_tensor(value: Any, where: str) -> Any:
    tensor_dtype(value, where)
    return value


def message(type_: str, id_: int, /, **fields: Any) -> Message:
    """Build a message and check it against its schema now (ProtocolError names the field).

    >>> message("token", 7, index=0, token=104, logprob=-0.5)["token"]
    104
    """
    spec = spec_for(type_)
    checked = convert_fields(spec, fields, _check_tensor, DEFAULT_LIMITS.max_depth)
    return Message(type_, check_id(id_), checked)


def token_message(id_: int, index: int, token: int, logprob: float, text: str) -> Message:
    """The `token` message that ``message("token", id_, ...)`` makes, built without the
    schema walk: an inference server sends one per generated token, and the walk was a
    fifth of the server's cost per token. Each value is converted to its field's type
    here; `id_` must be a checked id (the generate's, as decoded)."""
    if not 0 <= index <= MAX_ID or not -(1 << 63) <= token <= MAX_ID:
        raise ProtocolError(f"token: index {index} or token {token} out of the int range")
    return Message("token", id_, CheckedFields(index=int(index), token=int(token),
                                               logprob=float(logprob), text=str(text)))


def reply(to: Message, type_: str, /, **fields: Any) -> Message:
    """A message answering ``to``: it carries ``to``'s id, which is how peers pair them."""
    return message(type_, to.id, **fields)


def error_message(id_: int, code: str, text: str, traceback: str = "") -> Message:
    """An ``error`` message answering the message ``id_`` (0 when its id is unknown)."""
    return message("error", id_, code=code, message=text, traceback=traceback)
