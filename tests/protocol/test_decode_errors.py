"""Every validation rule of SPEC.md section 6, each with the message it must produce."""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import numpy as np
import pytest

from narun.errors import ProtocolError
from protocol import Limits, decode, refusal

GOOD: dict[str, Any] = {
    "v": 1, "type": "push_grads", "id": 9, "step": 0, "rank": 0, "version": 0,
    "grads": {"w": {"dtype": "float32", "shape": [2], "frame": 1}},
}
W = np.array([1.0, 2.0], np.float32).tobytes()


def frames_with(change: dict[str, Any] | None = None, *buffers: bytes,
                drop: str | None = None, tensor: dict[str, Any] | None = None) -> list[bytes]:
    header = copy.deepcopy(GOOD)
    header.update(change or {})
    if drop:
        del header[drop]
    if tensor is not None:
        header["grads"]["w"] = tensor
    return [msgpack.packb(header), *(buffers or (W,))]


def desc(**kw: Any) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [2], "frame": 1, **kw}


class Packed(bytes):
    """msgpack bytes, put into a ``fixmap`` as they are."""


def fixmap(*pairs: tuple[str, Any]) -> Packed:
    """A msgpack map of ``pairs`` in order, duplicates kept (msgpack.packb takes a dict)."""
    body = b"".join(msgpack.packb(k) + (v if isinstance(v, Packed) else msgpack.packb(v))
                    for k, v in pairs)
    return Packed(bytes([0x80 | len(pairs)]) + body)


def push_grads_pairs(grads: Any) -> list[tuple[str, Any]]:
    return [("v", 1), ("type", "push_grads"), ("id", 9), ("step", 0), ("rank", 0),
            ("version", 0), ("grads", grads)]


def submit_with_config_arrays(depth: int) -> list[bytes]:
    """A submit whose header nests containers ``depth`` deep: the header map, the config map,
    then arrays."""
    arrays = Packed(b"\x91" * (depth - 2) + b"\x00")
    return [fixmap(("v", 1), ("type", "submit"), ("id", 6), ("name", "n"),
                   ("config", fixmap(("k", arrays))))]


def test_the_base_case_is_valid() -> None:
    got = decode(frames_with())
    np.testing.assert_array_equal(got["grads"]["w"], [1.0, 2.0])


CASES = [
    ("version", frames_with({"v": 2}),
     "unsupported protocol version 2: this peer speaks version 1"),
    ("version zero", frames_with({"v": 0}), "unsupported protocol version 0"),
    ("version bool", frames_with({"v": True}),
     "header: v: expected a protocol version (an int >= 0), got bool True"),
    ("version float", frames_with({"v": 1.0}), "v: expected a protocol version (an int >= 0), "
                                               "got float 1.0"),
    ("version negative", frames_with({"v": -1}), "got int -1"),
    ("version str", frames_with({"v": "1"}), "got str '1'"),
    ("no version", frames_with(drop="v"), "header: missing 'v'"),
    ("no id", frames_with(drop="id"), "header: missing 'id'"),
    ("unknown type", frames_with({"type": "nope"}), "unknown message type 'nope'"),
    ("negative id", frames_with({"id": -1}), "message id: expected an int in [0, 2**64), got -1"),
    ("missing field", frames_with(drop="step"), "push_grads: missing field(s) 'step'"),
    ("extra field", frames_with({"bogus": 1}), "push_grads: unexpected field(s) 'bogus'"),
    ("field type", frames_with({"step": "3"}), "push_grads.step: expected int, got str '3'"),
    ("bool is not int", frames_with({"rank": True}), "push_grads.rank: expected int, got bool"),
    ("tensors not a map", frames_with({"grads": [1]}),
     "push_grads.grads: expected a map, got list"),
    ("dtype", frames_with(tensor=desc(dtype="complex64")),
     "push_grads.grads['w']: dtype 'complex64' is not allowed; allowed: float16, bfloat16, "),
    ("dtype big-endian spelling", frames_with(tensor=desc(dtype=">f4")), "dtype '>f4' is not"),
    ("negative dim", frames_with(tensor=desc(shape=[-1])), "dim -1 outside [0, 1073741824]"),
    ("absurd dim", frames_with(tensor=desc(shape=[1 << 40])), "dim 1099511627776 outside"),
    ("absurd product", frames_with(tensor=desc(shape=[1 << 20, 1 << 20, 1 << 20])),
     "has more than 1073741824 elements"),
    ("absurd empty", frames_with(None, b"", tensor=desc(shape=[0, 1 << 30, 1 << 30])),
     "shape [0, 1073741824, 1073741824] has more than 1073741824 elements"),
    ("absurd bytes", frames_with(tensor=desc(dtype="float64", shape=[1 << 28])),
     "float64 (268435456,) is 2147483648 bytes, over the limit of 1073741824"),
    ("shape type", frames_with(tensor=desc(shape="2")),
     "shape: expected an array of ints, got str"),
    ("dim type", frames_with(tensor=desc(shape=[1.5])), "dims must be ints, got float"),
    ("too many dims", frames_with(tensor=desc(shape=[1] * 33)),
     "shape has 33 dims, over the limit of 32 (Limits.max_ndim)"),
    ("byte count", frames_with(tensor=desc(shape=[3])),
     "push_grads.grads['w']: float32 (3,) needs 12 bytes, frame 1 has 8"),
    ("frame index high", frames_with(tensor=desc(frame=2)),
     "frame index 2 out of range: the message has frames 1..1"),
    ("frame index zero", frames_with(tensor=desc(frame=0)), "frame index 0 out of range"),
    ("no frames at all", [msgpack.packb(GOOD)], "the message has no buffer frames"),
    ("frame used twice", frames_with({"grads": {"a": desc(), "b": desc()}}),
     "push_grads.grads['b']: frame 1 is already used by another tensor"),
    ("unused frame", frames_with(None, W, W), "buffer frame(s) [2] not referenced by any tensor"),
    ("frame and data", frames_with(tensor=desc(data=W)),
     "tensor descriptor has keys {'data', 'dtype', 'frame', 'shape'}"),
    ("descriptor type", frames_with(tensor=[1]), "expected a tensor descriptor"),
    ("inline data type", frames_with({"grads": {"w": {"dtype": "uint8", "shape": [1],
                                                      "data": "x"}}}),
     "inline data: expected bin, got str"),
    ("bool bytes", frames_with(None, b"\x01\x02", tensor=desc(dtype="bool")),
     "bool tensor holds bytes other than 0 and 1"),
    ("header not a map", [msgpack.packb([1, 2])], "header: expected a msgpack map, got list"),
    ("header not msgpack", [b"\xc1"], "header: not valid msgpack"),
    ("trailing bytes", [msgpack.packb(GOOD) + b"\x00", W], "header: not valid msgpack: ExtraData"),
    ("duplicate header key", [fixmap(*push_grads_pairs({"w": desc()}), ("id", 10)), W],
     "header: not valid msgpack: ValueError: duplicate map key 'id'"),
    ("duplicate tensors key", [fixmap(*push_grads_pairs(fixmap(("w", desc()), ("w", desc())))),
                               W, W], "duplicate map key 'w'"),
    ("duplicate config key", [fixmap(("v", 1), ("type", "submit"), ("id", 1), ("name", "n"),
                                     ("config", fixmap(("a", fixmap(("b", 1), ("b", 2))))))],
     "duplicate map key 'b'"),
    ("float field NaN", [msgpack.packb({"v": 1, "type": "done", "id": 1, "reason": "stop",
                                        "tokens": 1, "seconds": float("nan")})],
     "done.seconds: expected a finite float, got nan"),
    ("float field Inf", [msgpack.packb({"v": 1, "type": "heartbeat", "id": 1, "role": "ps",
                                        "rank": 0, "step": 0, "time": float("-inf")})],
     "heartbeat.time: expected a finite float, got -inf"),
    ("status half a reply", [msgpack.packb({"v": 1, "type": "status", "id": 1, "job": "j",
                                            "state": "done"})],
     "status: a reply carries all of 'state', 'step', 'steps', 'message' and a request none "
     "of them; got only 'state'"),
    ("header nested 1025 deep", submit_with_config_arrays(1025), "header: not valid msgpack"),
    ("header nested 1024 deep", submit_with_config_arrays(1024), "nested deeper than 32 levels"),
    ("extension type", [msgpack.packb(msgpack.ExtType(5, b"x"))], "header: not valid msgpack"),
    ("timestamp", [b"\xd6\xff\x00\x00\x00\x01"], "header: not valid msgpack"),
    ("huge array claim", [b"\xdd\xff\xff\xff\xff"], "header: not valid msgpack"),
    ("empty", [], "empty message: expected a header frame"),
    ("frame not bytes", [msgpack.packb(GOOD), 5], "frame 1: expected a bytes-like object, got int"),
]


@pytest.mark.parametrize(("frames", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_with_a_precise_message(frames: list[Any], expected: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert expected in str(info.value)


def test_limits_are_configurable() -> None:
    small = Limits(max_message_bytes=4096, max_header_bytes=1024, max_frames=2)
    big_frame = frames_with(None, bytes(8000), tensor=desc(dtype="uint8", shape=[8000]))
    with pytest.raises(ProtocolError, match=r"message is \d+ bytes, over the limit of 4096"):
        decode(big_frame, small)
    with pytest.raises(ProtocolError, match="3 buffer frames, over the limit of 2"):
        decode(frames_with(None, W, W, W), small)
    with pytest.raises(ProtocolError, match="header is 2000 bytes, over the limit of 1024"):
        decode([bytes(2000)], small)
    deep: Any = 1
    for _ in range(40):
        deep = {"k": deep}
    with pytest.raises(ProtocolError, match="nested deeper than 32 levels"):
        decode([msgpack.packb({"v": 1, "type": "submit", "id": 1, "name": "n", "config": deep})])
    with pytest.raises(ProtocolError, match=r"submit.config: map keys must be str, got bytes"):
        decode([msgpack.packb({"v": 1, "type": "submit", "id": 1, "name": "n",
                               "config": {b"k": 1}})])


@pytest.mark.parametrize(("frames", "reply"), [
    (frames_with({"id": 77, "step": "x"}), ("protocol", 77)),
    (frames_with({"id": 78, "v": 2}), ("version", 78)),
    ([b"\xc1garbage"], ("protocol", 0)),
    (frames_with({"id": -5, "step": "x"}), ("protocol", 0)),
    ([msgpack.packb({"v": 1, "type": "error", "id": 3, "code": 5})], None),
    (frames_with({"id": 79, "v": 0}), ("version", 79)),
    (frames_with({"id": 80, "v": -1}), ("protocol", 80)),
    (frames_with({"id": 81, "v": True}), ("protocol", 81)),
    (frames_with({"id": 82, "v": 1.0}), ("protocol", 82)),
    (frames_with({"id": 83, "v": None}), ("protocol", 83)),
    (frames_with({"id": 84}, drop="v"), ("protocol", 84)),
    ([fixmap(*push_grads_pairs({"w": desc()}), ("id", 10)), W], ("protocol", 0)),
    ([msgpack.packb(GOOD) + b"\x00", W], ("protocol", 0)),
    (submit_with_config_arrays(1025), ("protocol", 0)),
    (submit_with_config_arrays(1024), ("protocol", 6)),
    ([msgpack.packb({"v": 9, "type": "error", "id": 3})], None),
])
def test_refusal_reply(frames: list[bytes], reply: tuple[str, int] | None) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    answer = refusal(frames, info.value)
    if reply is None:
        assert answer is None  # never answer an error with an error
    else:
        assert answer is not None
        assert (answer["code"], answer.id) == reply
        assert answer["message"] == str(info.value)


def nested_config(levels: int, leaf: Any) -> list[bytes]:
    config: Any = leaf
    for _ in range(levels):
        config = {"k": config}
    return [msgpack.packb({"v": 1, "type": "submit", "id": 1, "name": "n", "config": config})]


@pytest.mark.parametrize("leaf", [7, "s", 1.5, None])
def test_map_depth_counts_containers_only(leaf: Any) -> None:
    # the field's own map and 32 nested in it pass, whatever scalar sits at the bottom
    got = decode(nested_config(33, leaf))["config"]
    for _ in range(33):
        got = got["k"]
    assert got == leaf
    with pytest.raises(ProtocolError, match="nested deeper than 32 levels"):
        decode(nested_config(34, leaf))


def test_float_fields_take_float32_ints_and_nonfinite_only_where_listed() -> None:
    def grad_norm(sq: Any, **pack: Any) -> list[bytes]:
        return [msgpack.packb({"v": 1, "type": "grad_norm", "id": 1, "step": 0, "sq": sq},
                              **pack)]

    single = grad_norm(0.1, use_single_float=True)
    assert b"\xca" in single[0]  # msgpack float32 on the wire
    assert decode(single)["sq"] == float(np.float32(0.1))
    got = decode(grad_norm(3))["sq"]  # an int in a float field becomes a float
    assert type(got) is float and got == 3.0
    assert np.isnan(decode(grad_norm(float("nan")))["sq"])
    assert decode(grad_norm(float("inf")))["sq"] == float("inf")
    loss = {"v": 1, "type": "step_done", "id": 2, "step": 0, "rank": 0, "loss": float("nan"),
            "samples": 1, "timings": {"compute": float("inf")}}
    got = decode([msgpack.packb(loss)])
    assert np.isnan(got["loss"]) and got["timings"]["compute"] == float("inf")


def test_ints_and_floats_in_map_fields_keep_their_type() -> None:
    config = {"steps": 2000, "lr": 1.0, "neg": -1000, "big": (1 << 64) - 1}
    got = decode([msgpack.packb({"v": 1, "type": "submit", "id": 1, "name": "n",
                                 "config": config})])["config"]
    assert [(type(v), v) for v in got.values()] == [(type(v), v) for v in config.values()]
