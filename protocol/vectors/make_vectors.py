"""Write or check the golden vectors (SPEC.md, section 10).

    python -m protocol.vectors.make_vectors           # check the stored files (exit 1 if not)
    python -m protocol.vectors.make_vectors --write   # rewrite them: only with a new version

Each vector is defined below by its JSON meaning; the encoder turns the meaning into frames.
``decoding.json`` holds the decoder vectors of ``protocol.vectors.decoding``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import msgpack
import numpy as np

from narun.errors import ProtocolError
from protocol.codec import decode, encode, refusal
from protocol.dtypes import WIRE_DTYPES, BFloat16Array
from protocol.messages import MAX_ID, SCHEMAS, Kind, Message, message
from protocol.vectors import DECODING, VECTOR_DIR, load
from protocol.vectors.decoding import ACCEPTED, REFUSED


def _t(dtype: str, shape: list[int], values: Any, **extra: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "values": values, **extra}


def _v(type_: str, id_: int, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "id": id_, "fields": fields}


_ONE_OF_EACH = {
    "f16": _t("float16", [3], [0.5, -2.0, 65504.0]),
    "bf16": _t("bfloat16", [2], [1.0, -0.0078125]),
    "f32": _t("float32", [2, 2], [[1.5, -2.25], [0.0, 2.0**-25]]),
    "f64": _t("float64", [2], [1e300, -1e-300]),
    "i8": _t("int8", [2], [-128, 127]),
    "i16": _t("int16", [2], [-32768, 32767]),
    "i32": _t("int32", [2], [-2147483648, 2147483647]),
    "i64": _t("int64", [2], [-9223372036854775808, 9223372036854775807]),
    "u8": _t("uint8", [2], [0, 255]),
    "u16": _t("uint16", [2], [0, 65535]),
    "u32": _t("uint32", [2], [0, 4294967295]),
    "u64": _t("uint64", [2], [0, 18446744073709551615]),
    "mask": _t("bool", [2, 2], [[True, False], [False, True]]),
}
# 8192 float64 = exactly 64 KiB: the smallest tensor that travels as its own frame
_FRAME_TENSOR = _t("float64", [8192], [i * 0.5 for i in range(8192)])

# 65535 uint8 = one byte under 64 KiB: the largest tensor that travels inline (as bin16)
_LARGEST_INLINE = _t("uint8", [65535], [i % 10 for i in range(65535)])
# msgpack's int and str forms at each boundary (SPEC.md 2.1): shortest form, unsigned for
# ints >= 0, signed below; fixstr, str8, str16
_FORMS = {
    "uint": [0, 127, 128, 255, 256, 65535, 65536, 4294967295, 4294967296, MAX_ID],
    "int": [-1, -32, -33, -128, -129, -32768, -32769, -2147483648, -2147483649, -(1 << 63)],
    "float": [0.0, -0.0, 1.0, 0.1, 1e300],
    "str": ["", "a" * 31, "b" * 32, "c" * 255, "d" * 256],
}

VECTORS: dict[str, dict[str, Any]] = {
    "hello": _v("hello", 1, role="trainer", rank=0, software="0.1.0"),
    "welcome": _v("welcome", 1, role="coordinator", software="0.1.0", heartbeat_interval=1.0),
    "heartbeat": _v("heartbeat", 2, role="ps", rank=3, step=-1, time=1700000000.25),
    "heartbeat_max_id": _v("heartbeat", MAX_ID, role="trainer", rank=1, step=41, time=0.0),
    "push_grads": _v("push_grads", 7, step=12, rank=1, version=11, grads={
        "layer0.w": _FRAME_TENSOR, "layer0.b": _t("float32", [3], [0.5, -1.25, 2.0])}),
    "pull_params": _v("pull_params", 8, keys=["layer0.w", "layer0.b"], min_version=12),
    "params": _v("params", 8, version=12, params={
        "layer0.b": _t("float32", [3], [0.25, -0.5, 1.0])}),
    "grad_norm": _v("grad_norm", 24, step=12, sq=0.015625),
    "apply_step": _v("apply_step", 25, step=12, rank=1, norm=0.125),
    "activation": _v("activation", 38, step=12, micro_batch=1, data=_t(
        "float32", [2, 3], [[0.5, -1.25, 2.0], [0.0, 3.75, -0.0625]])),
    "activation_grad": _v("activation_grad", 39, step=12, micro_batch=1, data=_t(
        "float32", [2, 3], [[0.015625, -0.25, 0.0], [1.5, -2.0, 0.125]])),
    "tied_grads": _v("tied_grads", 40, step=12, grads={
        "wte.weight": _t("float32", [2, 3], [[0.25, -0.5, 0.0], [-1.0, 0.75, 2.5]])}),
    "params_all_dtypes": _v("params", 9, version=1, params=_ONE_OF_EACH),
    "tensor_0d": _v("params", 10, version=0, params={"scale": _t("float64", [], 2.5)}),
    "tensor_empty": _v("params", 11, version=0, params={
        "none": _t("float32", [0, 3], []), "nested": _t("int64", [2, 0, 4], [[], []])}),
    "tensor_bfloat16": _v("params", 12, version=0, params={
        "w": _t("bfloat16", [2, 2], [[1.0, -2.5], [3.140625, 65280.0]])}),
    "tensor_big_endian_input": _v("params", 13, version=0, params={
        "w": _t("float64", [2], [1.0, -3.5], input_byteorder=">"),
        "i": _t("int32", [2], [1, -2], input_byteorder=">")}),
    "tensor_two_frames": _v("push_grads", 14, step=0, rank=0, version=0, grads={
        "a": _FRAME_TENSOR, "c": _t("bool", [1], [True]),
        "b": _t("float64", [64, 128], [[-float(i * 128 + j) for j in range(128)]
                                        for i in range(64)])}),
    "step_done": _v("step_done", 15, step=12, rank=1, loss=2.75, samples=16, timings={
        "compute": 0.125, "push": 0.0625, "pull": 0.03125, "wait": 0.0}),
    "step_done_buffers": _v("step_done", 15, step=12, rank=0, loss=2.75, samples=16,
                            timings={"compute": 0.125}, buffers={
                                "bn.running_mean": _t("float32", [2], [0.5, -0.25]),
                                "bn.num_batches_tracked": _t("int64", [], 12)}),
    "checkpoint": _v("checkpoint", 16, step=500, path="runs/quickstart/step-000500"),
    "members": _v("members", 23, ranks=[0, 2, 3]),
    "shutdown": _v("shutdown", 17, reason="job cancelled by user", drain=True),
    "error": _v("error", 0, code="protocol",
                message="push_grads.grads['w']: dtype 'complex64' is not allowed", traceback=""),
    "generate": _v("generate", 18, prompt=_t("int32", [5], [72, 101, 108, 108, 111]),
                   max_tokens=32, temperature=0.8, top_k=40, seed=1234),
    "token": _v("token", 18, index=0, token=44, logprob=-0.6931471805599453),
    "done": _v("done", 18, reason="length", tokens=32, seconds=0.5),
    "submit": _v("submit", 19, name="quickstart", config={
        "model": {"name": "gpt", "preset": "gpt2-tiny"},
        "training": {"steps": 2000, "lr": 0.0003, "schedule": "cosine", "grad_clip": 1.0},
        "data": {"path": None, "seq_len": 128}}),
    "status": _v("status", 20, job="job-0001"),
    "status_reply": _v("status", 20, job="job-0001", state="running", step=120, steps=2000,
                       message=""),
    "cancel": _v("cancel", 21, job="job-0001", reason="user request"),
    "events": _v("events", 22, job="job-0001", since=0),
    "events_reply": _v("events", 22, job="job-0001", since=0, events=[
        {"event": "step", "step": 1, "loss": 5.5, "lr": 3e-6, "tokens_per_s": 12000.0},
        {"event": "checkpoint", "step": 500, "path": "runs/quickstart/step-000500"}]),
    "jobs": _v("jobs", 35),
    "jobs_reply": _v("jobs", 35, jobs=[
        {"job": "mlp-0001", "name": "mlp", "state": "done", "step": 300, "steps": 300,
         "message": ""},
        {"job": "quickstart-0002", "name": "quickstart", "state": "queued", "step": 0,
         "steps": 600, "message": ""}]),
    "spawn": _v("spawn", 26, job="mlp-7f3a", role="ps", rank=1, incarnation=0,
                spec='{"config":{},"coordinator":"tcp://10.0.0.1:7711"}', blas_threads=1),
    "spawned": _v("spawned", 26, job="mlp-7f3a", pid=4242,
                  log="/var/lib/narun/agent/jobs/mlp-7f3a/logs/ps-1.log"),
    "output": _v("output", 27, job="mlp-7f3a", pid=4242,
                 line='{"endpoint": "tcp://10.0.0.2:40411"}'),
    "stdin": _v("stdin", 28, job="mlp-7f3a", pid=4243,
                line='{"shard_endpoints": ["tcp://10.0.0.2:40411"]}'),
    "exited": _v("exited", 29, job="mlp-7f3a", pid=4243, code=-9),
    "kill": _v("kill", 30, job="mlp-7f3a", pid=4243, signal=9),
    "log_tail": _v("log_tail", 31, job="mlp-7f3a", pid=4243, lines=15),
    "log_tail_reply": _v("log_tail", 31, job="mlp-7f3a", pid=4243, lines=15,
                         text="Traceback (most recent call last):\n  ..."),
    "file_put": _v("file_put", 33, job="mlp-7f3a", path="init.safetensors", offset=0,
                   data=_t("uint8", [4], [0x4e, 0x41, 0x52, 0x55]), last=True),
    "file_put_reply": _v("file_put", 33, job="mlp-7f3a", path="init.safetensors", offset=4),
    "file_get": _v("file_get", 34, job="mlp-7f3a", path=".shards/step-000500/ps-1.safetensors",
                   offset=0, size=8388608, remove=True),
    "file_get_reply": _v("file_get", 34, job="mlp-7f3a",
                         path=".shards/step-000500/ps-1.safetensors", offset=0, size=8388608,
                         remove=True, data=_t("uint8", [2], [123, 125]), eof=True),
    "probe": _v("probe", 32, address="tcp://10.0.0.1:7711"),
    "probe_reply": _v("probe", 32, address="tcp://10.0.0.1:7711", ok=False,
                      message="connection refused", slots=4),
    "tensor_inline_largest": _v("params", 26, version=0, params={"ids": _LARGEST_INLINE}),
    "plain_forms": _v("submit", 27, name="forms", config=_FORMS),
    "generate_greedy": _v("generate", 28, prompt=_t("int64", [2], [50256, 464]),
                          max_tokens=1000, temperature=0, top_k=0, seed=-1000),
    "generate_text": _v("generate", 36, max_tokens=64, temperature=0.7, top_k=40, seed=7,
                        text="Once upon a time", stop=["\n\n", "The end"]),
    "token_text": _v("token", 36, index=3, token=195, logprob=-1.25, text=""),
    "abort": _v("abort", 36, reason="client went away"),
    "tokens": _v("tokens", 37, ids=[5, 9, 12], tokens=[104, 105, -1],
                 logprobs=_t("float64", [3], [-0.5, -2.0, 0.0]),
                 finished=["", "length", "cancelled"]),
}


def to_message(meaning: dict[str, Any]) -> Message:
    """The Message a JSON meaning describes (tensors built as the encoder's input)."""
    spec = SCHEMAS[meaning["type"]]
    fields = dict(meaning["fields"])
    for f in spec.fields:
        if f.name in fields and f.kind is Kind.TENSOR:
            fields[f.name] = _array(fields[f.name])
        elif f.name in fields and f.kind is Kind.TENSORS:
            fields[f.name] = {k: _array(t) for k, t in fields[f.name].items()}
    return message(meaning["type"], meaning["id"], **fields)


def to_meaning(msg: Message) -> dict[str, Any]:
    """The JSON meaning of a decoded Message (inverse of to_message, less input_byteorder)."""
    fields = dict(msg.fields)
    for f in SCHEMAS[msg.type].fields:
        if f.name in fields and f.kind is Kind.TENSOR:
            fields[f.name] = _described(fields[f.name])
        elif f.name in fields and f.kind is Kind.TENSORS:
            fields[f.name] = {k: _described(t) for k, t in fields[f.name].items()}
    return {"type": msg.type, "id": msg.id, "fields": fields}


def _array(t: dict[str, Any]) -> np.ndarray | BFloat16Array:
    if t["dtype"] == "bfloat16":
        return BFloat16Array.from_float32(np.array(t["values"], np.float32).reshape(t["shape"]))
    arr = np.array(t["values"], dtype=WIRE_DTYPES[t["dtype"]]).reshape(t["shape"])
    if t.get("input_byteorder") == ">":
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    return arr


def _described(value: np.ndarray | BFloat16Array) -> dict[str, Any]:
    if isinstance(value, BFloat16Array):
        return _t("bfloat16", list(value.shape), value.to_float32().tolist())
    dtype = next(name for name, dt in WIRE_DTYPES.items() if dt == value.dtype
                 and name != "bfloat16")
    return _t(dtype, list(value.shape), value.tolist())


def strip_input_notes(meaning: Any) -> Any:
    """The meaning as a decoder sees it: encoder-input notes removed."""
    if isinstance(meaning, dict):
        return {k: strip_input_notes(v) for k, v in meaning.items() if k != "input_byteorder"}
    if isinstance(meaning, list):
        return [strip_input_notes(v) for v in meaning]
    return meaning


def _dump(obj: Any, indent: str = "") -> str:
    # JSON with lists of scalars kept on one line, so a tensor reads as a row of numbers
    inner = indent + " "
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {_dump(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj) \
            and not _numeric(obj):
        return "[\n" + ",\n".join(inner + _dump(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj, allow_nan=False)


def _numeric(obj: Any) -> bool:
    if isinstance(obj, list):
        return all(_numeric(v) for v in obj)
    return isinstance(obj, (int, float, bool))


def encoded(meaning: dict[str, Any]) -> bytes:
    frames = [bytes(f) for f in encode(to_message(meaning))]
    if to_meaning(decode(frames)) != strip_input_notes(meaning):  # e.g. 0.1 as a float32
        raise ValueError(f"{meaning['type']} {meaning['id']}: values are not exactly "
                         f"representable in their dtypes")
    return msgpack.packb(frames, use_bin_type=True)


def decoding_text() -> str:
    """decoding.json: each decoder vector's frames (hex) and the stated outcome, checked
    against this decoder (ValueError where it disagrees)."""
    refused, accepted = {}, {}
    for name, (why, frames, reply) in REFUSED.items():
        try:
            decode(frames)
        except ProtocolError as exc:
            answer = refusal(frames, exc)
        else:
            raise ValueError(f"decoder vector {name}: decoded, expected a refusal")
        got = None if answer is None else {"code": answer["code"], "id": answer.id}
        if got != reply:
            raise ValueError(f"decoder vector {name}: answered {got}, stated {reply}")
        refused[name] = {"why": why, "frames": [f.hex() for f in frames], "reply": reply}
    for name, (why, frames, meaning) in ACCEPTED.items():
        if to_meaning(decode(frames)) != meaning:
            raise ValueError(f"decoder vector {name}: decodes to {to_meaning(decode(frames))}")
        accepted[name] = {"why": why, "frames": [f.hex() for f in frames], "meaning": meaning}
    return _dump({"refused": refused, "accepted": accepted}) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the vector files")
    args = parser.parse_args(argv)
    stale = []
    for name, meaning in VECTORS.items():
        data, text = encoded(meaning), _dump(meaning) + "\n"
        if args.write:
            (VECTOR_DIR / f"{name}.msgpack").write_bytes(data)
            (VECTOR_DIR / f"{name}.json").write_text(text)
            continue
        try:
            frames, stored = load(name)
        except FileNotFoundError:
            frames, stored = [], None
        if msgpack.packb(frames, use_bin_type=True) != data or stored != meaning:
            stale.append(name)
    text = decoding_text()
    if args.write:
        DECODING.write_text(text)
    elif not DECODING.exists() or DECODING.read_text() != text:
        stale.append(DECODING.name)
    if stale:
        print(f"vectors differ from the encoder: {', '.join(stale)}", file=sys.stderr)
        return 1
    print(f"{len(VECTORS)} vectors {'written' if args.write else 'match'} in {VECTOR_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
