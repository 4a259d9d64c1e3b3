"""Golden vectors, byte for byte: a change to the wire format cannot slip in unnoticed."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from narun.errors import ProtocolError
from protocol import SCHEMAS, decode, encode, refusal, vectors
from protocol.vectors import make_vectors

NAMES = vectors.names()


def test_every_defined_vector_is_stored_and_every_type_has_one() -> None:
    assert sorted(make_vectors.VECTORS) == NAMES
    covered = {vectors.load(name)[1]["type"] for name in NAMES}
    assert covered == set(SCHEMAS)


@pytest.mark.parametrize("name", NAMES)
def test_encoder_reproduces_the_stored_bytes(name: str) -> None:
    stored, meaning = vectors.load(name)
    assert [bytes(f) for f in encode(make_vectors.to_message(meaning))] == stored


@pytest.mark.parametrize("name", NAMES)
def test_decoder_reads_the_stored_meaning(name: str) -> None:
    stored, meaning = vectors.load(name)
    assert make_vectors.to_meaning(decode(stored)) == make_vectors.strip_input_notes(meaning)


def test_edge_cases_are_what_they_claim() -> None:
    frames, _ = vectors.load("tensor_big_endian_input")
    little, _ = vectors.load("tensor_0d")
    got = decode(frames)["params"]
    assert got["w"].dtype.str == "<f8" and got["i"].dtype.str == "<i4"
    assert decode(little)["params"]["scale"].shape == ()
    empty = decode(vectors.load("tensor_empty")[0])["params"]
    assert empty["none"].shape == (0, 3) and empty["nested"].shape == (2, 0, 4)
    frames, _ = vectors.load("tensor_two_frames")
    header = msgpack.unpackb(frames[0])
    assert [header["grads"][k].get("frame") for k in ("a", "c", "b")] == [1, None, 2]
    assert [len(f) for f in frames[1:]] == [65536, 65536]
    np.testing.assert_array_equal(decode(frames)["grads"]["a"], np.arange(8192) * 0.5)


def test_the_checker_script_agrees(capsys: pytest.CaptureFixture[str]) -> None:
    assert make_vectors.main([]) == 0
    assert f"{len(NAMES)} vectors match" in capsys.readouterr().out


def test_boundary_vectors_hold_the_forms_spec_md_names() -> None:
    # Spelled out byte by byte, not by msgpack-python: these are SPEC.md 2.1's rules.
    (head,), _ = vectors.load("plain_forms")
    uint = bytes.fromhex("9a 00 7f cc80 ccff cd0100 cdffff ce00010000 ceffffffff"
                         "cf0000000100000000 cfffffffffffffffff")
    sint = bytes.fromhex("9a ff e0 d0df d080 d1ff7f d18000 d2ffff7fff d280000000"
                         "d3ffffffff7fffffff d38000000000000000")
    floats = bytes.fromhex("95 cb0000000000000000 cb8000000000000000 cb3ff0000000000000"
                           "cb3fb999999999999a cb7e37e43c8800759c")
    strs = (b"\x95\xa0" + b"\xbf" + b"a" * 31 + b"\xd9\x20" + b"b" * 32 + b"\xd9\xff"
            + b"c" * 255 + b"\xda\x01\x00" + b"d" * 256)
    for key, packed in (("uint", uint), ("int", sint), ("float", floats), ("str", strs)):
        assert msgpack.packb(key) + packed in head, key
    (head,), _ = vectors.load("generate_greedy")
    assert b"\xabtemperature\xcb" + bytes(8) in head  # an int given: written as float64 0.0
    assert b"\xa4seed\xd1\xfc\x18" in head and b"\xaamax_tokens\xcd\x03\xe8" in head
    frames, _ = vectors.load("tensor_inline_largest")
    assert len(frames) == 1  # 65535 bytes stay inline, as bin16; 65536 take a frame
    assert b"\xa4data\xc5\xff\xff" + bytes(i % 10 for i in range(65535)) in frames[0]
    assert len(vectors.load("push_grads")[0][1]) == 65536


DECODING = vectors.load_decoding()


@pytest.mark.parametrize("name", sorted(DECODING["refused"]))
def test_decoder_refuses_and_answers_as_stated(name: str) -> None:
    frames, reply = DECODING["refused"][name]
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    answer = refusal(frames, info.value)
    assert (None if answer is None else {"code": answer["code"], "id": answer.id}) == reply


@pytest.mark.parametrize("name", sorted(DECODING["accepted"]))
def test_decoder_accepts_every_form_of_a_value(name: str) -> None:
    frames, meaning = DECODING["accepted"][name]
    got = decode(frames)
    assert make_vectors.to_meaning(got) == meaning
    assert [type(v) for v in got.fields.values()] == [type(v) for v in meaning["fields"].values()]


def test_decoder_vectors_cover_every_answer() -> None:
    replies = [r for _, r in DECODING["refused"].values()]
    assert None in replies
    assert {(r["code"], r["id"] == 0) for r in replies if r} == {
        ("version", False), ("protocol", False), ("protocol", True)}
