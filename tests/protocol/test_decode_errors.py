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


def test_the_base_case_is_valid() -> None:
    got = decode(frames_with())
    np.testing.assert_array_equal(got["grads"]["w"], [1.0, 2.0])


CASES = [
    ("version", frames_with({"v": 2}),
     "unsupported protocol version 2: this peer speaks version 1"),
    ("version bool", frames_with({"v": True}), "unsupported protocol version True"),
    ("version float", frames_with({"v": 1.0}), "unsupported protocol version 1.0"),
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
