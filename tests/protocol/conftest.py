"""Fixtures and helpers for the protocol tests: an asyncio ZeroMQ context with linger 0,
and a strict message comparison (tensors compared bit for bit)."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import zmq.asyncio

from protocol import SCHEMAS, BFloat16Array, Kind, Message


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    context.setsockopt(zmq.LINGER, 0)
    yield context
    context.destroy(linger=0)


def tensor_bits(value: Any) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype, shape, little-endian bytes): what the wire carries for a tensor."""
    if isinstance(value, BFloat16Array):
        return "bfloat16", value.shape, value.bits.astype("<u2").tobytes()
    arr = np.asarray(value)
    return arr.dtype.newbyteorder("<").name, arr.shape, arr.astype(arr.dtype.newbyteorder("<"),
                                                                    copy=False).tobytes()


def _same_plain(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # NaN == NaN, -0.0 != 0.0
    if isinstance(a, (list, tuple)) and isinstance(b, list):
        return len(a) == len(b) and all(_same_plain(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same_plain(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def assert_same_message(sent: Message, got: Message) -> None:
    assert (got.type, got.id) == (sent.type, sent.id)
    assert list(got.fields) == list(sent.fields)
    for f in SCHEMAS[sent.type].fields:
        if f.name not in sent.fields:
            continue
        a, b = sent[f.name], got[f.name]
        if f.kind is Kind.TENSOR:
            assert tensor_bits(b) == tensor_bits(a), f.name
        elif f.kind is Kind.TENSORS:
            assert list(b) == list(a), f.name
            for key in a:
                assert tensor_bits(b[key]) == tensor_bits(a[key]), (f.name, key)
        elif f.kind is Kind.FLOAT:
            assert _same_plain(float(a), b), (f.name, a, b)
        else:
            assert _same_plain(a, b), (f.name, a, b)
