"""Decoder vectors (SPEC.md, sections 2.2 and 6.1): frames no conforming encoder writes, with
what every decoder must make of them.

``REFUSED``: each must be refused, answered with the stated ``error`` code and id (or not
answered: ``None``). ``ACCEPTED``: each must decode to the stated meaning, though its bytes
differ from what an encoder writes (decoders accept every msgpack form of a value).
``make_vectors`` writes and checks them as ``decoding.json``; the reply and the meaning are
written here by hand, and the generator fails if this decoder disagrees.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

PACK = msgpack.Packer(use_bin_type=True)


class Packed(bytes):
    """msgpack bytes, placed in a ``raw_map`` as they are."""


def raw_map(*pairs: tuple[Any, Any]) -> Packed:
    """A msgpack map of ``pairs`` in order, duplicates kept (a dict cannot hold them)."""
    assert len(pairs) < 16  # a fixmap
    body = b"".join(PACK.pack(k) + (v if isinstance(v, Packed) else PACK.pack(v))
                    for k, v in pairs)
    return Packed(bytes([0x80 | len(pairs)]) + body)


def _head(type_: str, id_: Any, *fields: tuple[Any, Any], v: Any = 1) -> Packed:
    return raw_map(("v", v), ("type", type_), ("id", id_), *fields)


def _members(id_: Any = 5, v: Any = 1) -> list[bytes]:
    return [_head("members", id_, ("ranks", [0, 1]), v=v)]


def _nested_config(arrays: int) -> list[bytes]:
    # the header map, the config map, then `arrays` arrays around a 0
    return [_head("submit", 6, ("name", "n"),
                  ("config", raw_map(("k", Packed(b"\x91" * arrays + b"\x00")))))]


def _reply(code: str, id_: int) -> dict[str, Any]:
    return {"code": code, "id": id_}


_W = struct.pack("<2f", 1.0, 2.0)
_DESC = {"dtype": "float32", "shape": [2], "frame": 1}


def _push(grads: Any, *buffers: bytes) -> list[bytes]:
    return [_head("push_grads", 9, ("step", 0), ("rank", 0), ("version", 0), ("grads", grads)),
            *buffers]


#: name -> (why, frames, reply or None)
REFUSED: dict[str, tuple[str, list[bytes], dict[str, Any] | None]] = {
    "v_other_version": ("an int v other than 1", _members(v=2), _reply("version", 5)),
    "v_zero": ("0 is an int >= 0: another version", _members(v=0), _reply("version", 5)),
    "v_negative": ("a negative v is malformed", _members(v=-1), _reply("protocol", 5)),
    "v_bool": ("true is not an int", _members(v=True), _reply("protocol", 5)),
    "v_float": ("1.0 is not an int", _members(v=1.0), _reply("protocol", 5)),
    "v_str": ("'1' is not an int", _members(v="1"), _reply("protocol", 5)),
    "v_missing": ("no v", [raw_map(("type", "members"), ("id", 5), ("ranks", []))],
                  _reply("protocol", 5)),
    "v_bin_key": ("a bin key equals no name: no v", [raw_map(
        (b"v", 1), ("type", "members"), ("id", 5), ("ranks", []))], _reply("protocol", 5)),
    "id_negative": ("an id outside [0, 2^64) is answered with 0", _members(id_=-5),
                    _reply("protocol", 0)),
    "id_float": ("a float id is answered with 0", _members(id_=5.0), _reply("protocol", 0)),
    "unknown_type": ("a type not in section 5",
                     [_head("nope", 7)], _reply("protocol", 7)),
    "trailing_byte": ("a byte after the header object: unreadable",
                      [_members()[0] + b"\x00"], _reply("protocol", 0)),
    "duplicate_key": ("id twice: unreadable, whichever id a library keeps",
                      [raw_map(("v", 1), ("type", "members"), ("id", 5), ("ranks", []),
                               ("id", 6))], _reply("protocol", 0)),
    "duplicate_tensor_key": ("a tensors map holding w twice: unreadable",
                             _push(raw_map(("w", _DESC), ("w", _DESC)), _W, _W),
                             _reply("protocol", 0)),
    "int_map_key": ("a map key neither str nor bin: unreadable",
                    [_head("submit", 6, ("name", "n"), ("config", raw_map((1, 2))))],
                    _reply("protocol", 0)),
    "invalid_utf8": ("a str that is not UTF-8: unreadable",
                     [_head("checkpoint", 5, ("step", 0), ("path", Packed(b"\xa1\xff")))],
                     _reply("protocol", 0)),
    "extension_type": ("a msgpack extension: unreadable",
                       [_head("submit", 6, ("name", "n"),
                              ("config", Packed(b"\xd4\x05\x00")))], _reply("protocol", 0)),
    "nested_1025": ("containers nested 1025 deep: unreadable", _nested_config(1023),
                    _reply("protocol", 0)),
    "nested_1024": ("1024 deep is readable; the config is too deep", _nested_config(1022),
                    _reply("protocol", 6)),
    "not_a_map": ("the header is an array", [PACK.pack([1, "members", 5])],
                  _reply("protocol", 0)),
    "nonfinite_float": ("done.seconds must be finite", [_head(
        "done", 8, ("reason", "stop"), ("tokens", 1), ("seconds", float("nan")))],
                        _reply("protocol", 8)),
    "half_a_reply": ("a status with state but not step, steps, message",
                     [_head("status", 9, ("job", "j"), ("state", "done"))],
                     _reply("protocol", 9)),
    "role_not_listed": ("hello.role is a closed set",
                        [_head("hello", 10, ("role", "root"), ("rank", 0),
                               ("software", "x"))], _reply("protocol", 10)),
    "unused_frame": ("a buffer frame no descriptor uses", _push({"w": _DESC}, _W, _W),
                     _reply("protocol", 9)),
    "too_many_frames": ("4097 buffer frames: over max_frames, the header is still read",
                        _push({}, *[b""] * 4097), _reply("protocol", 9)),
    "error_is_never_answered": ("a refused message claiming to be an error",
                                [_head("error", 3, ("code", 5))], None),
    "error_of_another_version": ("an error of another version",
                                 [_head("error", 3, v=9)], None),
}

#: name -> (why, frames, meaning)
ACCEPTED: dict[str, tuple[str, list[bytes], dict[str, Any]]] = {
    "int_in_float_field": ("an int in a float field is that float",
                           [_head("grad_norm", 1, ("step", 2), ("sq", 3))],
                           {"type": "grad_norm", "id": 1, "fields": {"step": 2, "sq": 3.0}}),
    "float32_in_float_field": ("a msgpack float32 (ca) widens exactly", [_head(
        "grad_norm", 1, ("step", 2), ("sq", Packed(b"\xca" + struct.pack(">f", 0.1))))],
                               {"type": "grad_norm", "id": 1,
                                "fields": {"step": 2, "sq": 0.10000000149011612}}),
    "long_int_forms": ("ints in longer forms than needed (uint64 id, int16 step)", [
        raw_map(("v", 1), ("type", "grad_norm"), ("id", Packed(b"\xcf" + bytes(7) + b"\x07")),
                ("step", Packed(b"\xd1\x00\x02")), ("sq", 0.5))],
                        {"type": "grad_norm", "id": 7, "fields": {"step": 2, "sq": 0.5}}),
    "str16_short": ("a 3-byte str as str16", [_head(
        "checkpoint", 4, ("step", 1), ("path", Packed(b"\xda\x00\x03abc")))],
                    {"type": "checkpoint", "id": 4, "fields": {"step": 1, "path": "abc"}}),
    "keys_reordered": ("header keys in another order", [raw_map(
        ("path", "p"), ("id", 4), ("step", 1), ("type", "checkpoint"), ("v", 1))],
                       {"type": "checkpoint", "id": 4, "fields": {"step": 1, "path": "p"}}),
    "small_tensor_in_a_frame": ("1 byte as its own frame, frames numbered in reverse", [
        _head("push_grads", 9, ("step", 0), ("rank", 0), ("version", 0), ("grads", raw_map(
            ("a", {"dtype": "float32", "shape": [2], "frame": 2}),
            ("b", {"dtype": "uint8", "shape": [1], "frame": 1})))), b"\x07", _W],
                                {"type": "push_grads", "id": 9, "fields": {
                                    "step": 0, "rank": 0, "version": 0, "grads": {
                                        "a": {"dtype": "float32", "shape": [2],
                                              "values": [1.0, 2.0]},
                                        "b": {"dtype": "uint8", "shape": [1],
                                              "values": [7]}}}}),
}
