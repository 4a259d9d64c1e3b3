import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import narun
from narun.data import ByteTokenizer

tok = ByteTokenizer()


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(text):
    ids = tok.encode(text)
    assert ids.dtype == np.int64
    assert ids.tolist() == list(text.encode("utf-8"))  # ids are exactly the UTF-8 bytes
    assert tok.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(st.binary())
def test_decode_arbitrary_bytes_never_raises(raw):
    ids = np.frombuffer(raw, dtype=np.uint8)
    assert tok.decode(ids) == raw.decode("utf-8", errors="replace")
    assert tok.decode_bytes(ids) == raw


def test_invalid_utf8_becomes_replacement_character():
    assert tok.decode([0xFF, 0xFE, 0x41, 0xC3]) == "\ufffd\ufffdA\ufffd"


def test_vocab_and_dtypes():
    assert tok.vocab_size == 256
    ids = tok.encode("é€", dtype=np.uint8)
    assert ids.dtype == np.uint8 and ids.tolist() == [0xC3, 0xA9, 0xE2, 0x82, 0xAC]


def test_decode_accepts_lists_tensors_and_2d_arrays():
    ids = tok.encode("narun")
    assert tok.decode(ids.tolist()) == "narun"
    assert tok.decode(narun.tensor(ids)) == "narun"
    assert tok.decode(ids.reshape(1, -1)) == "narun"
    assert tok.decode([]) == ""


def test_lone_surrogate_encodes_and_decodes_without_raising():
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffd\ufffd\ufffdb"


def test_out_of_vocabulary_id_is_rejected_with_the_id():
    with pytest.raises(ValueError, match="token id 300"):
        tok.decode([65, 300])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode(np.array([-1]))
