"""Round trips for every message type and dtype, zero-copy behaviour, the inline/frame rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from narun.errors import ProtocolError
from protocol import (
    INLINE_LIMIT,
    SCHEMAS,
    WIRE_DTYPES,
    BFloat16Array,
    Limits,
    decode,
    encode,
    error_message,
    message,
    reply,
)

from .conftest import assert_same_message, tensor_bits
from .strategies import messages, tensors


@pytest.mark.parametrize("type_", list(SCHEMAS))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_round_trip_every_type(type_: str, data: st.DataObject) -> None:
    msg = data.draw(messages(type_))
    assert_same_message(msg, decode(encode(msg)))


@pytest.mark.parametrize("dtype", list(WIRE_DTYPES))
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_round_trip_every_dtype(dtype: str, data: st.DataObject) -> None:
    value = data.draw(tensors(dtype))
    msg = message("params", 1, version=0, params={"x": value})
    got = decode(encode(msg))["params"]["x"]
    assert tensor_bits(got)[0] == dtype
    assert tensor_bits(got) == tensor_bits(value)
    arr = got.bits if isinstance(got, BFloat16Array) else got
    assert not arr.flags.writeable


def test_large_tensor_is_a_view_on_both_sides() -> None:
    x = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)
    frames = encode(message("push_grads", 3, step=1, rank=0, version=0, grads={"w": x}))
    assert len(frames) == 2
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), x)  # encode: no copy
    received = bytearray(frames[1])  # as if from the socket
    got = decode([frames[0], received])["grads"]["w"]
    assert np.shares_memory(got, np.frombuffer(received, np.uint8))  # decode: no copy
    assert not got.flags.writeable
    np.testing.assert_array_equal(got, x)
    with pytest.raises(ValueError):
        got[0, 0] = 1.0  # callers copy before writing


@pytest.mark.parametrize(("nbytes", "frames"), [(INLINE_LIMIT - 4, 1), (INLINE_LIMIT, 2)])
def test_tensors_under_64k_are_inline(nbytes: int, frames: int) -> None:
    x = np.ones(nbytes // 4, np.float32)
    assert len(encode(message("params", 1, version=0, params={"x": x}))) == frames


def test_strided_and_big_endian_inputs_go_out_in_wire_layout() -> None:
    base = np.arange(12, dtype=">f8").reshape(3, 4)
    msg = message("params", 1, version=0, params={"t": base.T, "b": base})
    got = decode(encode(msg))["params"]
    np.testing.assert_array_equal(got["t"], base.T)
    np.testing.assert_array_equal(got["b"], base)
    assert got["b"].dtype.str == "<f8"


def test_numpy_scalars_become_fields_and_0d_tensors() -> None:
    msg = message("step_done", 2, step=np.int64(3), rank=0, loss=np.float32(0.5), samples=4,
                  timings={})
    got = decode(encode(msg))
    assert (got["step"], got["loss"]) == (3, 0.5)
    assert type(got["step"]) is int and type(got["loss"]) is float
    zero_d = decode(encode(message("params", 1, version=0, params={"s": np.float16(1.5)})))
    assert zero_d["params"]["s"].shape == () and zero_d["params"]["s"] == 1.5


class FakeDeviceArray:
    """Stands in for a CuPy array: the encoder must call .get() (explicit host copy)."""

    def __init__(self, host: np.ndarray) -> None:
        self._host, self.dtype, self.gets = host, host.dtype, 0
        self.__cuda_array_interface__ = {"shape": host.shape, "typestr": host.dtype.str}

    def get(self) -> np.ndarray:
        self.gets += 1
        return self._host.copy()


def test_device_arrays_are_copied_to_host_once() -> None:
    dev = FakeDeviceArray(np.arange(6, dtype=np.int32).reshape(2, 3))
    got = decode(encode(message("generate", 5, prompt=dev, max_tokens=1, temperature=0.0,
                                top_k=0, seed=0)))
    np.testing.assert_array_equal(got["prompt"], dev._host)
    assert dev.gets == 1


@pytest.mark.cuda
def test_cupy_array_round_trip() -> None:
    cp = pytest.importorskip("cupy")
    x = cp.arange(1 << 15, dtype=cp.float32)
    got = decode(encode(message("params", 1, version=0, params={"x": x})))["params"]["x"]
    np.testing.assert_array_equal(got, cp.asnumpy(x))


def test_bfloat16_rounding_and_values() -> None:
    values = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, np.inf, 3.4e38, 1e-40, np.nan],
                      np.float32)
    bf = BFloat16Array.from_float32(values)
    # ties go to even: 1+2^-8 -> 1.0, 1+3*2^-8 -> 1+2^-6; 3.4e38 rounds past the max to inf
    # 1e-40 is subnormal (0x000116C2) and rounds to the smallest bfloat16 subnormal, 2^-133
    expected = np.array([1.0, 1.0, 1 + 2**-6, -2.5, np.inf, np.inf, 2.0**-133], np.float32)
    np.testing.assert_array_equal(bf.to_float32()[:7], expected)
    assert np.isnan(bf.to_float32()[7])
    got = decode(encode(message("params", 1, version=0, params={"w": bf})))["params"]["w"]
    assert isinstance(got, BFloat16Array)
    np.testing.assert_array_equal(got.bits, bf.bits)


def test_bfloat16_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096)).astype(np.float32)
    ours = BFloat16Array.from_float32(x).to_float32()
    theirs = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(("build", "expected"), [
    (lambda: message("nope", 1), "unknown message type 'nope'"),
    (lambda: message("cancel", 1, job="j"), "cancel: missing field(s) 'reason'"),
    (lambda: message("cancel", 1, job="j", reason="r", extra=1),
     "cancel: unexpected field(s) 'extra'"),
    (lambda: message("cancel", 1, job=3, reason="r"), "cancel.job: expected str, got int"),
    (lambda: message("hello", 1, role="boss", rank=0, software="x"),
     "hello.role: expected one of coordinator"),
    (lambda: message("token", -1, index=0, token=1, logprob=0.0), "message id: expected an int"),
    (lambda: message("token", 1, index=1 << 64, token=1, logprob=0.0), "does not fit"),
    (lambda: message("params", 1, version=0, params={"c": np.zeros(2, np.complex64)}),
     "params.params['c']: dtype complex64 is not allowed on the wire; allowed: float16"),
    (lambda: message("params", 1, version=0, params={"l": [1.0]}),
     "params.params['l']: expected a NumPy array, CuPy array or BFloat16Array, got list"),
    (lambda: message("submit", 1, name="n", config={"k": object()}),
     "submit.config['k']: expected plain data"),
    (lambda: message("submit", 1, name="n", config={1: 2}), "map keys must be str"),
])
def test_sender_side_errors_name_the_field(build, expected: str) -> None:
    with pytest.raises(ProtocolError) as info:
        build()
    assert expected in str(info.value)


def test_encode_enforces_limits() -> None:
    msg = message("params", 1, version=0, params={"x": np.zeros(1 << 18, np.uint8)})
    with pytest.raises(ProtocolError, match=r"over the limit of 100000 \(Limits.max_message"):
        encode(msg, Limits(max_message_bytes=100_000, max_header_bytes=50_000))
    many = {str(i): np.zeros(INLINE_LIMIT, np.uint8) for i in range(3)}
    with pytest.raises(ProtocolError, match="3 buffer frames, over the limit of 2"):
        encode(message("params", 1, version=0, params=many), Limits(max_frames=2))


def test_reply_and_error_helpers_keep_the_request_id() -> None:
    request = message("pull_params", 41, keys=[], min_version=0)
    answer = reply(request, "params", version=3, params={})
    assert (answer.type, answer.id) == ("params", 41)
    err = error_message(41, "stale", "push of version 1 is 5 versions old")
    assert decode(encode(err)).fields == {"code": "stale", "message": err["message"],
                                          "traceback": ""}
    with pytest.raises(KeyError, match="params message has no field 'grads'"):
        answer["grads"]


@pytest.mark.parametrize("index, token, logprob, text", [
    (0, 104, -0.5, "h"), (3, 195, -1.25, ""), (2**40, 0, float("-inf"), "é"),
    (7, 50256, 0, "\n")])
def test_token_message_encodes_as_message_does(index, token, logprob, text):
    from protocol import token_message

    fast = token_message(36, index, token, logprob, text)
    checked = message("token", 36, index=index, token=token, logprob=logprob, text=text)
    assert encode(fast) == encode(checked)
    assert decode(encode(fast)).fields == checked.fields
