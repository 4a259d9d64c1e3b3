"""Encode and decode messages: ``[msgpack header][buffer frames...]`` (SPEC.md, "Framing").

Pure functions, no sockets. Tensors of 64 KiB and more leave ``encode`` as memoryviews of
the caller's arrays (no copy) and come out of ``decode`` as read-only ``np.frombuffer`` views
of the received frames (no copy). Everything a peer sends is checked before anything sized
by it is allocated; every failure is a ProtocolError.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, TypeAlias

import msgpack
import numpy as np

from narun.errors import ProtocolError
from protocol.dtypes import WIRE_DTYPES, BFloat16Array, tensor_dtype, to_wire_array
from protocol.limits import DEFAULT_LIMITS, INLINE_LIMIT, Limits
from protocol.messages import (
    PROTOCOL_VERSION,
    RESERVED_KEYS,
    CheckedFields,
    Message,
    check_id,
    convert_fields,
    convert_tensors,
    error_message,
    spec_for,
)

#: Anything with the buffer protocol: bytes, bytearray, memoryview, a NumPy array, zmq.Frame.
BytesLike: TypeAlias = Any


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> list[bytes | memoryview]:
    """The frames of ``msg``: the msgpack header, then one frame per tensor >= 64 KiB.

    Buffer frames are views of the caller's arrays, so they must not be written to until
    the frames are sent (``protocol.transport.Channel.send`` waits for that). A device
    (CuPy) array is copied to the host here; a strided or big-endian array is copied into
    wire layout (C order, little-endian). Raises ProtocolError for a message that breaks
    its schema or ``limits``.
    """
    spec = spec_for(msg.type)
    frames: list[memoryview] = []

    def tensor(value: Any, where: str) -> dict[str, Any]:
        name = tensor_dtype(value, where)
        arr = to_wire_array(value, name)
        data = memoryview(arr).cast("B") if arr.size else memoryview(b"")
        if arr.nbytes < INLINE_LIMIT:
            return {"dtype": name, "shape": list(arr.shape), "data": data}
        frames.append(data)
        return {"dtype": name, "shape": list(arr.shape), "frame": len(frames)}

    if type(msg.fields) is CheckedFields:  # checked when made: only the tensors change
        header = {"v": PROTOCOL_VERSION, "type": spec.type, "id": msg.id, **msg.fields}
        convert_tensors(spec, header, tensor)
    else:
        header = {"v": PROTOCOL_VERSION, "type": spec.type, "id": check_id(msg.id),
                  **convert_fields(spec, msg.fields, tensor, limits.max_depth)}
    try:
        head = _packer().pack(header)
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. a non-str key deep in a map
        raise ProtocolError(f"{spec.type}: cannot pack header: {exc}") from exc
    if len(head) > limits.max_header_bytes:
        raise ProtocolError(f"{spec.type}: header is {len(head)} bytes, over the limit of "
                            f"{limits.max_header_bytes} (Limits.max_header_bytes)")
    if len(frames) > limits.max_frames:
        raise ProtocolError(f"{spec.type}: {len(frames)} buffer frames, over the limit of "
                            f"{limits.max_frames} (Limits.max_frames)")
    total = len(head) + sum(f.nbytes for f in frames)
    if total > limits.max_message_bytes:
        raise ProtocolError(f"{spec.type}: message is {total} bytes, over the limit of "
                            f"{limits.max_message_bytes} (Limits.max_message_bytes)")
    return [head, *frames]


_local = threading.local()


def _packer() -> msgpack.Packer:
    # msgpack.packb builds a Packer per call; one per thread (a Packer is not thread-safe)
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


def decode(frames: Sequence[BytesLike], limits: Limits = DEFAULT_LIMITS) -> Message:
    """The message in ``frames`` (routing frames already removed), or ProtocolError.

    Tensors are read-only views of the frames (BFloat16Array for bfloat16): copy before
    writing. The views keep their frames alive.
    """
    if len(frames) == 0:
        raise ProtocolError("empty message: expected a header frame")
    if len(frames) - 1 > limits.max_frames:
        raise ProtocolError(f"{len(frames) - 1} buffer frames, over the limit of "
                            f"{limits.max_frames} (Limits.max_frames)")
    views, total = [], 0
    for i, frame in enumerate(frames):
        view = _byte_view(frame, i)
        views.append(view)
        total += view.nbytes
    if total > limits.max_message_bytes:
        raise ProtocolError(f"message is {total} bytes, over the limit of "
                            f"{limits.max_message_bytes} (Limits.max_message_bytes)")
    header = _unpack_header(views[0], limits)
    if not isinstance(header, dict):
        raise ProtocolError(f"header: expected a msgpack map, got {type(header).__name__}")
    for key in RESERVED_KEYS:
        if key not in header:
            raise ProtocolError(f"header: missing {key!r}")
    version = header.pop("v")  # a fresh map: what is left of it are the fields
    if not _is_version(version):
        if _version_code(version) == "protocol":
            raise ProtocolError(f"header: v: expected a protocol version (an int >= 0), got "
                                f"{type(version).__name__} {version!r:.40}")
        raise ProtocolError(f"unsupported protocol version {version!r:.40}: this peer speaks "
                            f"version {PROTOCOL_VERSION}")
    spec = spec_for(header.pop("type"))
    msg_id = check_id(header.pop("id"))
    used = [False] * len(views)

    def tensor(desc: Any, where: str) -> np.ndarray | BFloat16Array:
        return _tensor_view(desc, where, views, used, limits)

    fields = convert_fields(spec, header, tensor, limits.max_depth)
    if not all(used[1:]):
        unused = [i for i in range(1, len(views)) if not used[i]]
        raise ProtocolError(f"{spec.type}: buffer frame(s) {unused} not referenced by any tensor")
    return Message(spec.type, msg_id, fields)


def refusal(frames: Sequence[BytesLike], error: ProtocolError,
            limits: Limits = DEFAULT_LIMITS) -> Message | None:
    """The ``error`` reply to a message that ``decode`` refused, or None if none is owed.

    It carries the refused message's id when that much could be read (else 0) and code
    ``version`` for another protocol version. A message that is, or claims to be, an error
    gets no reply, so two peers can never bounce errors at each other.
    """
    header: Any = None
    if len(frames) > 0:
        try:
            header = _unpack_header(_byte_view(frames[0], 0), limits)
        except ProtocolError:
            header = None
    if not isinstance(header, dict):
        return error_message(0, "protocol", str(error))
    if header.get("type") == "error":
        return None
    try:
        msg_id = check_id(header.get("id"))
    except ProtocolError:
        msg_id = 0
    code = _version_code(header["v"]) if "v" in header else "protocol"
    return error_message(msg_id, code, str(error))


def _is_version(value: Any) -> bool:
    return type(value) is int and value == PROTOCOL_VERSION  # not True, not 1.0


def _version_code(value: Any) -> str:
    # What a refusal answers for the header's `v` (SPEC.md 6.1): another version is an int
    # >= 0 other than ours; anything else (bool, float, str, nil, a negative int) is malformed.
    if type(value) is int and value >= 0 and value != PROTOCOL_VERSION:
        return "version"
    return "protocol"


def _byte_view(frame: BytesLike, index: int) -> memoryview:
    try:
        view = memoryview(frame)
    except TypeError:
        raise ProtocolError(f"frame {index}: expected a bytes-like object, got "
                            f"{type(frame).__name__}") from None
    if view.format == "B" and view.ndim == 1:
        return view
    if not view.c_contiguous:
        raise ProtocolError(f"frame {index}: expected a contiguous buffer")
    return view.cast("B")


def _no_extensions(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the narun protocol")


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # msgpack-python keeps the last of two equal keys; the protocol refuses such a map
    # (SPEC.md 2.2). The hook costs ~0.3 us a map: measured, decode takes ~1 us longer for a
    # small message and ~13% longer for one of 1000 small tensors.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[Any] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate map key {key!r:.40}")
            seen.add(key)
    return out


def _unpack_header(head: memoryview, limits: Limits) -> Any:
    if head.nbytes > limits.max_header_bytes:
        raise ProtocolError(f"header is {head.nbytes} bytes, over the limit of "
                            f"{limits.max_header_bytes} (Limits.max_header_bytes)")
    try:
        return msgpack.unpackb(
            head, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_extensions,
            object_pairs_hook=_unique_keys,
            max_array_len=limits.max_items, max_map_len=limits.max_items, max_ext_len=0,
        )
    except Exception as exc:  # unpackb reads untrusted bytes: whatever fails is the sender's
        detail = str(exc) or "malformed input"
        raise ProtocolError(f"header: not valid msgpack: {type(exc).__name__}: {detail:.200}") \
            from exc


def _tensor_view(desc: Any, where: str, views: list[memoryview], used: list[bool],
                 limits: Limits) -> np.ndarray | BFloat16Array:
    if not isinstance(desc, dict):
        raise ProtocolError(f"{where}: expected a tensor descriptor {{dtype, shape, frame|data}}, "
                            f"got {type(desc).__name__}")
    if len(desc) != 3 or "dtype" not in desc or "shape" not in desc \
            or ("frame" not in desc and "data" not in desc):
        got = ", ".join(sorted(f"{k!r:.20}" for k in list(desc)[:8]))
        raise ProtocolError(f"{where}: tensor descriptor has keys {{{got}}}; expected 'dtype', "
                            f"'shape' and one of 'frame', 'data'")
    name = desc["dtype"]
    dtype = WIRE_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ProtocolError(f"{where}: dtype {name!r:.40} is not allowed; allowed: "
                            + ", ".join(WIRE_DTYPES))
    shape = _checked_shape(desc["shape"], where, limits)
    count = _element_count(shape, where, limits)
    nbytes = count * dtype.itemsize
    if nbytes > limits.max_message_bytes:
        raise ProtocolError(f"{where}: {name} {tuple(shape)} is {nbytes} bytes, over the limit "
                            f"of {limits.max_message_bytes} (Limits.max_message_bytes)")
    if "frame" in desc:
        index = desc["frame"]
        last = len(views) - 1
        if type(index) is not int or not 1 <= index <= last:  # (an int subclass: bool)
            span = f"frames 1..{last}" if last else "no buffer frames"
            raise ProtocolError(f"{where}: frame index {index!r:.40} out of range: the message "
                                f"has {span}")
        if used[index]:
            raise ProtocolError(f"{where}: frame {index} is already used by another tensor")
        used[index] = True
        buf = views[index]
    else:
        data = desc["data"]
        if not isinstance(data, bytes):
            raise ProtocolError(f"{where}: inline data: expected bin, got {type(data).__name__}")
        buf = memoryview(data)
    if buf.nbytes != nbytes:
        source = f"frame {desc['frame']}" if "frame" in desc else "inline data"
        raise ProtocolError(f"{where}: {name} {tuple(shape)} needs {nbytes} bytes, {source} has "
                            f"{buf.nbytes}")
    if name == "bool" and nbytes and np.frombuffer(buf, np.uint8).max() > 1:
        raise ProtocolError(f"{where}: bool tensor holds bytes other than 0 and 1")
    arr = np.ndarray(shape, dtype, buf)  # a view of the frame: no copy
    arr.setflags(write=False)  # received frames are writable buffers; callers copy instead
    return BFloat16Array(arr) if name == "bfloat16" else arr


def _checked_shape(shape: Any, where: str, limits: Limits) -> list[int]:
    if not isinstance(shape, list):
        raise ProtocolError(f"{where}: shape: expected an array of ints, got "
                            f"{type(shape).__name__}")
    if len(shape) > limits.max_ndim:
        raise ProtocolError(f"{where}: shape has {len(shape)} dims, over the limit of "
                            f"{limits.max_ndim} (Limits.max_ndim)")
    for d in shape:
        if type(d) is not int:  # (bool is an int subclass)
            raise ProtocolError(f"{where}: shape {shape!r:.80}: dims must be ints, got "
                                f"{type(d).__name__}")
        if not 0 <= d <= limits.max_message_bytes:
            raise ProtocolError(f"{where}: shape {shape!r:.80}: dim {d} outside "
                                f"[0, {limits.max_message_bytes}]")
    return shape


def _element_count(shape: list[int], where: str, limits: Limits) -> int:
    # The non-zero dims are bounded even when a 0 makes the tensor empty: NumPy itself
    # refuses shapes like (0, 2**40, 2**40), and no honest peer sends them.
    count = 1
    for d in shape:
        count *= d or 1
        if count > limits.max_message_bytes:  # stop before the product grows absurd
            raise ProtocolError(f"{where}: shape {shape!r:.80} has more than "
                                f"{limits.max_message_bytes} elements (Limits.max_message_bytes)")
    return 0 if 0 in shape else count
