"""What a peer can make a receiver hold (SPEC.md section 8), on real sockets over tcp
loopback with small limits: the largest message the limits allow arrives whole; one byte or
one frame more is refused, and the receiver serves the next message."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from narun.errors import ConfigError, WaitTimeout
from protocol import Channel, Limits, encode, message, open_channel
from protocol.transport import DEFAULT_HWM

LOOPBACK = "tcp://127.0.0.1:0"
MIB = 1 << 20
LIMITS = Limits(max_message_bytes=MIB, max_header_bytes=64 << 10, max_frames=4,
                max_queued_bytes=3 * MIB)
ROOMY = Limits(max_message_bytes=4 * MIB, max_header_bytes=MIB, max_frames=8,
               max_queued_bytes=8 * MIB)


def params(nbytes: list[int], id_: int) -> list[bytes]:
    """The frames of a params message with one uint8 tensor of each size (all >= 64 KiB, so
    each is a buffer frame)."""
    tensors = {f"t{i}": np.full(n, i + 1, np.uint8) for i, n in enumerate(nbytes)}
    return [bytes(f) for f in encode(message("params", id_, version=0, params=tensors), ROOMY)]


def exactly(total: int, frames: int, id_: int) -> list[bytes]:
    """A params message of exactly ``total`` bytes in ``frames`` buffer frames."""
    sizes = [1 << 16] * frames
    head = len(params(sizes, id_)[0])  # the sizes below keep the header's length
    sizes[-1] = total - head - (frames - 1) * (1 << 16)
    got = params(sizes, id_)
    assert sum(len(f) for f in got) == total and len(got) == frames + 1
    return got


def test_limits_bound_the_receive_queue() -> None:
    assert Limits().receive_hwm(DEFAULT_HWM) == 3  # (3 + 1) * 1 GiB = max_queued_bytes
    assert LIMITS.receive_hwm(64) == 2 and LIMITS.receive_hwm(1) == 1
    assert LIMITS.receive_hwm(0) == 2  # ZeroMQ's "no limit" still gets the byte bound
    assert Limits(max_message_bytes=MIB, max_header_bytes=MIB).receive_hwm(64) == 64
    with pytest.raises(ConfigError, match=r"max_queued_bytes \(1048576\) must be at least "
                                          r"2 \* max_message_bytes \(2097152\)"):
        Limits(max_message_bytes=MIB, max_header_bytes=MIB, max_queued_bytes=MIB)


@pytest.mark.timeout(30)
async def test_largest_message_arrives_and_one_more_byte_or_frame_is_refused(ctx) -> None:
    async with open_channel(ctx, "router", bind=LOOPBACK, limits=LIMITS) as server, \
            open_channel(ctx, "dealer", connect=server.endpoint, limits=ROOMY) as client:
        sock = server.socket
        assert (sock.maxmsgsize, sock.rcvhwm, sock.sndhwm) == (MIB, 2, DEFAULT_HWM)
        largest = exactly(MIB, 4, id_=1)
        await client.socket.send_multipart(largest)
        got = (await server.recv(timeout=5)).msg
        assert got.id == 1 and [bytes(t) for t in got["params"].values()] == largest[1:]

        # one byte more, in frames each under the per-frame limit: read, refused, answered
        await client.socket.send_multipart(exactly(MIB + 1, 4, id_=2))
        # one frame more, within the byte limit: read, refused, answered
        await client.socket.send_multipart(exactly(MIB, 5, id_=3))
        ok = message("params", 4, version=0, params={"x": np.arange(3, dtype=np.float32)})
        await client.send(ok)
        assert (await server.recv(timeout=5)).msg.id == 4
        errors = [(await client.recv(timeout=5)).msg for _ in range(2)]
        assert [(e.type, e.id, e["code"]) for e in errors] == [("error", 2, "protocol"),
                                                               ("error", 3, "protocol")]
        assert "message over the limit of 1048576 bytes" in errors[0]["message"]
        assert "more than 4 buffer frames" in errors[1]["message"]
        assert server.refused == 2

        # one frame over the per-frame limit: ZeroMQ drops the connection before buffering
        # it; no reply, nothing reaches the receiver, and the peer's next message (after
        # its DEALER reconnects) is served
        header = params([MIB + 1], 5)[0]
        await client.socket.send_multipart([header, bytes(MIB + 1)])
        for attempt in range(50):
            await client.send(message("params", 100 + attempt, version=0,
                                      params={"x": np.ones(2, np.float32)}))
            try:
                inc = await server.recv(timeout=0.2)
                break
            except WaitTimeout:  # still reconnecting
                continue
        assert inc.msg.id >= 100 and server.refused == 2
        assert await _nothing_more(client)


async def _nothing_more(client: Channel) -> bool:
    try:
        await client.recv(timeout=0.3)
    except WaitTimeout:
        return True
    return False


def test_zeromq_counts_neither_frames_nor_bytes_of_a_message() -> None:
    # Why SPEC.md section 8 cannot bound a hostile peer by max_frames: MAXMSGSIZE applies to
    # each frame, and a multipart message is delivered whole, so ZeroMQ buffers all of it
    # before the receiver sees its first frame (here 2000 frames of 1000 bytes past a
    # MAXMSGSIZE of 1000).
    ctx = zmq.Context()
    try:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.maxmsgsize, pull.rcvhwm, pull.rcvtimeo = 1000, 1, 5000
        push.connect(f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}")
        push.send_multipart([bytes(1000)] * 2000)
        assert len(pull.recv_multipart()) == 2000
    finally:
        ctx.destroy(linger=0)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def _hold_unread(limits: Limits, out: Any, go: Any) -> None:
    # A receiver that never reads: what ZeroMQ queues for it is all it holds.
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        channel = open_channel(ctx, "pull", bind=LOOPBACK, limits=limits)
        before = _rss_mib()
        out.put(channel.endpoint)
        await asyncio.get_running_loop().run_in_executor(None, go.wait, 20)
        await asyncio.sleep(1.0)  # let the I/O thread read what it will
        out.put(_rss_mib() - before)
        channel.close()
        ctx.term()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_receiver_that_does_not_read_holds_at_most_the_bound() -> None:
    limits = Limits(max_message_bytes=4 * MIB, max_header_bytes=MIB, max_frames=4,
                    max_queued_bytes=12 * MIB)  # receive_hwm: 2 messages
    spawn = mp.get_context("spawn")
    out, go = spawn.Queue(), spawn.Event()
    proc = spawn.Process(target=_hold_unread, args=(limits, out, go))
    proc.start()
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.sndhwm = 100
        push.connect(out.get(timeout=30))
        payload = bytes(4 * MIB - 1024)  # one max-size message, sent 16 times (64 MiB)
        for i in range(16):
            push.send_multipart([b"header %d" % i, payload], copy=False)
        go.set()
        held = out.get(timeout=30)
    finally:
        ctx.destroy(linger=0)
        proc.join(10)
    # (2 + 1) * 4 MiB = 12 MiB; without the bound (RCVHWM 64) all 64 MiB would be held
    assert 4 < held < 12 + 4, held
