"""Golden vectors, byte for byte: a change to the wire format cannot slip in unnoticed."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from protocol import SCHEMAS, decode, encode, vectors
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
