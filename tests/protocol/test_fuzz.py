"""Decoder fuzzing: on any input, decode returns a Message or raises ProtocolError, and it
never allocates anywhere near the size a message claims."""

from __future__ import annotations

import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from narun.errors import ProtocolError
from protocol import DEFAULT_LIMITS, SCHEMAS, WIRE_DTYPES, Limits, Message, decode, refusal, vectors

from .strategies import ints, plain

VECTOR_NAMES = vectors.names()
FIELD_NAMES = sorted({f.name for spec in SCHEMAS.values() for f in spec.fields})
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decodes_or_refuses(frames: list[Any], limits: Limits = DEFAULT_LIMITS) -> Message | None:
    try:
        return decode(frames, limits)
    except ProtocolError as exc:
        assert len(str(exc)) < 1000  # a peer cannot make our logs or replies huge
        refusal(frames, exc, limits)  # building the reply must not fail either
        return None


descriptors = st.fixed_dictionaries(
    {"dtype": st.sampled_from([*WIRE_DTYPES, "complex64", "object", ""]) | plain,
     "shape": st.lists(st.integers(-2, 1 << 42) | plain, max_size=6) | plain},
    optional={"frame": st.integers(-1, 4) | plain, "data": st.binary(max_size=64) | plain},
)
headers = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 2, 0, True, 1.0, "1"]),
     "type": st.sampled_from([*SCHEMAS, "nope", ""]),
     "id": ints | plain},
).flatmap(lambda h: st.dictionaries(
    st.sampled_from(FIELD_NAMES) | st.text(max_size=6),
    plain | descriptors | st.dictionaries(st.text(max_size=4), descriptors, max_size=3),
    max_size=6,
).map(lambda fields: {**h, **fields}))


def test_error_messages_stay_short_whatever_the_peer_sends() -> None:
    long = "x" * 100_000
    headers = [
        {"v": 1, "type": long, "id": 1},
        {"v": 1, "type": "cancel", "id": 1, "job": "j", "reason": "r",
         **{f"{long[:1000]}{i}": 1 for i in range(1000)}},
        {"v": 1, "type": "params", "id": 1, "version": 0,
         "params": {long: {"dtype": "float32", "shape": [1], "frame": 1}}},
        {"v": 1, "type": "params", "id": 1, "version": 0,
         "params": {"w": {str(i) * 100: 1 for i in range(1000)}}},
    ]
    deep: Any = 1
    for _ in range(40):
        deep = {long: deep}
    headers.append({"v": 1, "type": "submit", "id": 1, "name": "n", "config": deep})
    for header in headers:
        assert decodes_or_refuses([msgpack.packb(header)]) is None


@FUZZ
@given(st.lists(st.binary(max_size=96), max_size=5))
def test_random_frames(frames: list[bytes]) -> None:
    decodes_or_refuses(frames)


@FUZZ
@given(headers, st.lists(st.binary(max_size=64), max_size=3))
def test_random_headers(header: dict[str, Any], buffers: list[bytes]) -> None:
    decodes_or_refuses([msgpack.packb(header), *buffers])


@st.composite
def mutated_vectors(draw: st.DrawFn) -> list[bytes]:
    frames = [bytearray(f) for f in vectors.load(draw(st.sampled_from(VECTOR_NAMES)))[0]]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(frames) - 1))
        frame = frames[i]
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "drop", "dup"]))
        pos = draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and frame:
            frame[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del frame[pos:]
        elif op == "insert":
            frame[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "drop" and len(frames) > 1:
            del frames[i]
        elif op == "dup":
            frames.append(bytearray(frame))
    return [bytes(f) for f in frames]


@FUZZ
@given(mutated_vectors())
def test_mutated_vectors(frames: list[bytes]) -> None:
    decodes_or_refuses(frames)


@st.composite
def structurally_mutated(draw: st.DrawFn) -> list[bytes]:
    frames = vectors.load(draw(st.sampled_from(VECTOR_NAMES)))[0]
    header = msgpack.unpackb(frames[0])
    node: Any = header
    # walk down a random path, then replace, delete or add one entry there
    while isinstance(node, dict) and node and draw(st.booleans()):
        child = node[draw(st.sampled_from(sorted(node)))]
        if not isinstance(child, dict):
            break
        node = child
    if isinstance(node, dict) and node:
        key = draw(st.sampled_from(sorted(node)))
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if op == "replace":
            node[key] = draw(plain | descriptors)
        elif op == "delete":
            del node[key]
        else:
            node[draw(st.text(max_size=6))] = draw(plain)
    return [msgpack.packb(header), *frames[1:]]


@FUZZ
@given(structurally_mutated())
def test_structurally_mutated_vectors(frames: list[bytes]) -> None:
    decodes_or_refuses(frames)


SMALL = Limits(max_message_bytes=1 << 20, max_header_bytes=1 << 16, max_items=1024)
# msgpack prefixes that claim enormous containers; a careless decoder preallocates them
HUGE_CLAIMS = [b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
               b"\xdb\xff\xff\xff\xff", b"\xdc\xff\xff", b"\xde\xff\xff"]


@pytest.mark.parametrize("prefix", HUGE_CLAIMS)
def test_huge_container_claims_allocate_nothing(prefix: bytes) -> None:
    tracemalloc.start()
    try:
        for header in (prefix, b"\x81\xa1v" + prefix, prefix + bytes(100)):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            assert decodes_or_refuses([header], SMALL) is None
            assert tracemalloc.get_traced_memory()[1] - base < 64 * 1024
    finally:
        tracemalloc.stop()


big_shapes = st.lists(st.integers(0, 1 << 31), min_size=1, max_size=8)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(list(WIRE_DTYPES)), big_shapes, st.integers(0, 4096), st.booleans())
def test_claimed_sizes_are_never_allocated(dtype: str, shape: list[int], nbytes: int,
                                           inline: bool) -> None:
    tensor: dict[str, Any] = {"dtype": dtype, "shape": shape}
    tensor.update({"data": bytes(nbytes)} if inline else {"frame": 1})
    header = {"v": 1, "type": "params", "id": 1, "version": 0, "params": {"x": tensor}}
    frames = [msgpack.packb(header), *([] if inline else [bytes(nbytes)])]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        decodes_or_refuses(frames, SMALL)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < SMALL.max_message_bytes
    assert peak < 64 * 1024 + 2 * nbytes  # a few small objects, never the claimed size
