"""Channels on real sockets over tcp loopback: serving through garbage, limits, zero-copy
sends that survive the caller's writes, routing, timeouts."""

from __future__ import annotations

import asyncio
import random

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from narun.errors import ActorDiedError, ConfigError, ProtocolError, WaitTimeout
from protocol import Channel, Limits, decode, message, open_channel, refusal, reply, vectors

LOOPBACK = "tcp://127.0.0.1:0"
VECTOR_FRAMES = [vectors.load(name)[0] for name in vectors.names()]


def garbage(rng: random.Random, limits: Limits) -> list[bytes]:
    """One invalid message: random bytes, a damaged vector, or a header that breaks a rule."""
    while True:
        frames = _candidate(rng)
        try:
            decode(frames, limits)
        except ProtocolError:
            return frames  # a flipped bit can leave a valid message: draw again


def _candidate(rng: random.Random) -> list[bytes]:
    kind = rng.randrange(5)
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 4))]
    frames = [bytearray(f) for f in rng.choice(VECTOR_FRAMES)]
    if kind == 1:
        head = frames[0]
        head[rng.randrange(len(head))] ^= 1 << rng.randrange(8)
        return [bytes(f) for f in frames]
    header = {"v": 1, "type": "pull_params", "id": rng.randrange(1 << 20), "keys": [],
              "min_version": 0}
    if kind == 2:
        header[rng.choice(["v", "type", "min_version", "keys"])] = rng.choice([2, "x", None, [1]])
    elif kind == 3:
        header = {"v": 1, "type": "params", "id": 5, "version": 0, "params": {"x": {
            "dtype": "float32", "shape": [rng.randrange(1 << 40)], "frame": 1}}}
    else:
        return [msgpack.packb(header)] + [b"x"] * 20  # over the server's max_frames
    return [msgpack.packb(header), *frames[1:]]


async def serve_params(server: Channel) -> None:
    """A tiny parameter server: answers pull_params with one tensor named by the request."""
    while True:
        inc = await server.recv()
        if inc.msg.type == "pull_params":
            value = np.full(3, float(inc.msg["min_version"]), np.float32)
            await server.send(reply(inc.msg, "params", version=inc.msg["min_version"],
                                    params={"w": value}), to=inc.route)


@pytest.mark.timeout(60)
async def test_router_keeps_serving_through_10000_garbage_messages(ctx) -> None:
    limits = Limits(max_frames=8)
    server = open_channel(ctx, "router", bind=LOOPBACK, limits=limits, hwm=1000)
    client = open_channel(ctx, "dealer", connect=server.endpoint, hwm=1000)
    task = asyncio.create_task(serve_params(server))
    rng = random.Random(1234)
    expected_errors = errors = 0
    try:
        for batch in range(100):
            for _ in range(100):
                frames = garbage(rng, limits)
                expected_errors += refusal(frames, ProtocolError("x"), limits) is not None
                await client.socket.send_multipart(frames)
            await client.send(message("pull_params", 1_000_000 + batch, keys=[],
                                      min_version=batch))
            while True:  # errors for this batch's garbage come first, then the answer
                got = (await client.recv(timeout=10)).msg
                if got.type == "error":
                    assert got["code"] in ("protocol", "version")
                    errors += 1
                    continue
                assert (got.type, got.id, got["version"]) == ("params", 1_000_000 + batch, batch)
                np.testing.assert_array_equal(got["params"]["w"], [batch] * 3)
                break
        assert server.refused == 10_000
        assert errors == expected_errors > 9000  # only error-typed garbage went unanswered
    finally:
        task.cancel()
        server.close()
        client.close()


@pytest.mark.timeout(30)
async def test_an_error_is_never_answered(ctx) -> None:
    async with open_channel(ctx, "router", bind=LOOPBACK) as server, \
            open_channel(ctx, "dealer", connect=server.endpoint) as client:
        await client.socket.send_multipart([msgpack.packb({"v": 1, "type": "error", "id": 4})])
        await client.send(message("heartbeat", 5, role="trainer", rank=0, step=0, time=0.0))
        assert (await server.recv(timeout=5)).msg.id == 5
        assert server.refused == 1
        with pytest.raises(WaitTimeout):
            await client.recv(timeout=0.3)


@pytest.mark.timeout(30)
async def test_send_waits_until_zero_copy_buffers_are_released(ctx) -> None:
    async with open_channel(ctx, "pull", bind=LOOPBACK) as pull, \
            open_channel(ctx, "push", connect=pull.endpoint) as push:
        x = np.arange(1 << 21, dtype=np.float32)  # 8 MB: sent from x itself, no copy
        original = x.copy()
        for step in range(3):
            await push.send(message("push_grads", step, step=step, rank=0, version=0,
                                    grads={"w": x}))
            x[:] = -1.0  # the caller writes at once, as an optimizer would
            got = (await pull.recv(timeout=10)).msg["grads"]["w"]
            np.testing.assert_array_equal(got, original)
            x[:] = original


@pytest.mark.timeout(30)
async def test_oversized_frames_and_too_many_frames_are_refused(ctx) -> None:
    limits = Limits(max_message_bytes=1 << 20, max_header_bytes=1 << 16, max_frames=4)
    async with open_channel(ctx, "router", bind=LOOPBACK, limits=limits) as server, \
            open_channel(ctx, "dealer", connect=server.endpoint) as client:
        received: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(_forward(server, received))
        try:
            await client.socket.send_multipart([msgpack.packb({"v": 1})] + [b"x"] * 6)
            got = (await client.recv(timeout=5)).msg
            assert got.type == "error" and "more than 4 buffer frames" in got["message"]
            big = np.zeros(1 << 19, np.float32)  # a 2 MB frame: over MAXMSGSIZE, peer dropped
            await client.send(message("params", 1, version=0, params={"x": big}),
                              wait_sent=False)
            ok = message("params", 2, version=0, params={"x": np.ones(1000, np.float32)})
            for _ in range(50):  # the DEALER reconnects after being dropped
                await client.send(ok)
                try:
                    inc = await asyncio.wait_for(received.get(), 0.2)
                    break
                except TimeoutError:
                    continue
            assert inc.msg.id == 2
            # The reconnection takes 0.1-0.2 s, so an earlier copy of `ok` may still come
            # (measured here: up to 0.195 s): only copies of `ok` may follow.
            await asyncio.sleep(0.3)
            while not received.empty():
                assert received.get_nowait().msg.id == 2  # the 2 MB message never came
            assert server.refused == 1
        finally:
            task.cancel()


async def _forward(channel: Channel, queue: asyncio.Queue) -> None:
    while True:
        await queue.put(await channel.recv())


@pytest.mark.timeout(30)
async def test_router_send_to_a_vanished_peer_raises(ctx) -> None:
    async with open_channel(ctx, "router", bind=LOOPBACK) as server:
        with pytest.raises(ActorDiedError, match="peer b'ghost' is not connected"):
            await server.send(message("shutdown", 1, reason="x", drain=False), to=b"ghost")
        with pytest.raises(ValueError, match="send needs to=<peer identity>"):
            await server.send(message("shutdown", 1, reason="x", drain=False))


@pytest.mark.timeout(30)
async def test_waits_have_timeouts_that_name_the_socket(ctx) -> None:
    async with open_channel(ctx, "dealer", connect="tcp://127.0.0.1:1", hwm=2) as lonely:
        with pytest.raises(WaitTimeout, match=r"dealer tcp://127.0.0.1:1.*within 0.2 s"):
            await lonely.recv(timeout=0.2)
        beat = message("heartbeat", 1, role="trainer", rank=0, step=0, time=0.0)
        with pytest.raises(WaitTimeout, match="send not accepted within 0.2 s"):
            for _ in range(3):  # two queue up for the peer that never comes, then it blocks
                await lonely.send(beat, timeout=0.2)


@pytest.mark.timeout(30)
async def test_pub_sub_topics_and_dealer_identity(ctx) -> None:
    async with open_channel(ctx, "pub", bind=LOOPBACK) as pub, \
            open_channel(ctx, "sub", connect=pub.endpoint, subscribe=[b"metrics"]) as sub:
        event = message("events", 1, job="j", since=0, events=[{"event": "step", "step": 1}])
        for _ in range(100):  # a SUB misses what is published before it has joined
            await pub.send(message("status", 0, job="noise"), to=b"other")
            await pub.send(event, to=b"metrics")
            try:
                inc = await sub.recv(timeout=0.05)
                break
            except WaitTimeout:
                continue
        assert inc.route == b"metrics" and inc.msg["events"] == [{"event": "step", "step": 1}]
    async with open_channel(ctx, "router", bind=LOOPBACK) as server, \
            open_channel(ctx, "dealer", connect=server.endpoint, identity=b"trainer-3") as c:
        await c.send(message("hello", 1, role="trainer", rank=3, software="0.1.0"))
        assert (await server.recv(timeout=5)).route == b"trainer-3"


@pytest.mark.timeout(30)
async def test_pull_drops_garbage_without_reply(ctx) -> None:
    async with open_channel(ctx, "pull", bind=LOOPBACK) as pull, \
            open_channel(ctx, "push", connect=pull.endpoint) as push:
        await push.socket.send_multipart([b"junk"])
        await push.send(message("token", 9, index=0, token=1, logprob=0.0))
        assert (await pull.recv(timeout=5)).msg.id == 9
        assert pull.refused == 1
        with pytest.raises(ValueError, match="a pull socket only receives"):
            await pull.send(message("token", 9, index=0, token=1, logprob=0.0))


def test_open_channel_fails_fast_with_the_address(ctx) -> None:
    server = open_channel(ctx, "router", bind=LOOPBACK)
    try:
        with pytest.raises(ConfigError, match=f"router socket on {server.endpoint}"):
            open_channel(ctx, "router", bind=server.endpoint)  # port in use
    finally:
        server.close()
    with pytest.raises(ConfigError, match="expected one of router, dealer"):
        open_channel(ctx, "req", bind=LOOPBACK)
    with pytest.raises(ConfigError, match="exactly one of bind= and connect="):
        open_channel(ctx, "dealer")
    with pytest.raises(ConfigError, match="expected a zmq.asyncio.Context"):
        open_channel(zmq.Context.instance(), "dealer", connect=LOOPBACK)


async def test_socket_options(ctx) -> None:
    limits = Limits(max_message_bytes=123_456_789, max_header_bytes=1 << 20)
    async with open_channel(ctx, "router", bind=LOOPBACK, limits=limits, hwm=7) as ch:
        sock = ch.socket
        assert (sock.linger, sock.maxmsgsize, sock.sndhwm, sock.rcvhwm) == (0, 123_456_789, 7, 7)
        assert sock.tcp_keepalive == 1 and sock.tcp_keepalive_idle == 30


@pytest.mark.timeout(30)
async def test_recv_recovers_after_a_cancelled_read(ctx) -> None:
    async with open_channel(ctx, "pull", bind=LOOPBACK) as pull, \
            open_channel(ctx, "push", connect=pull.endpoint) as push:
        waiting = asyncio.create_task(pull.recv())
        await asyncio.sleep(0.01)
        waiting.cancel()
        tensor = {"w": np.ones(4, np.float32)}
        await push.send(message("params", 1, version=0, params=tensor))
        assert (await pull.recv(timeout=5)).msg.id == 1
        # a reader cancelled after taking the head frame of a message leaves its tail
        # behind: the next recv must drop that tail, not read it as a message
        await push.socket.send_multipart([msgpack.packb({"v": 1}), b"tail"])
        await pull.socket.recv()
        pull._maybe_partial = True
        await push.send(message("params", 2, version=0, params=tensor))
        assert (await pull.recv(timeout=5)).msg.id == 2
        assert pull.refused == 0


async def test_a_closed_channel_refuses_to_work(ctx) -> None:
    channel = open_channel(ctx, "dealer", connect="tcp://127.0.0.1:1")
    channel.close()
    with pytest.raises(ValueError, match="is closed"):
        await channel.recv(timeout=0.1)
    with pytest.raises(ValueError, match="is closed"):
        await channel.send(message("token", 1, index=0, token=1, logprob=0.0))


@pytest.mark.timeout(60)
async def test_concurrent_readers_get_whole_messages_while_tasks_send(ctx) -> None:
    # Six readers park on one channel while six tasks send on it. Each multipart reply
    # must reach one reader whole (two parked readers used to split a message's frames),
    # and a reader parked in zmq.asyncio must be woken although the sends went through
    # the synchronous shadow socket (tests/integration lost replies without the re-arm).
    server = open_channel(ctx, "router", bind="tcp://127.0.0.1:0")
    clients = [open_channel(ctx, "dealer", connect=server.endpoint) for _ in range(2)]
    per_client, rounds = 6, 300

    async def answer_in_pairs() -> None:
        held = []
        while True:
            incoming = await server.recv()
            held.append(incoming)
            if len(held) == 2:
                for item in held:
                    await server.send(reply(item.msg, "params", version=0, params={
                        "w": np.zeros(20000, np.float32)}), to=item.route, wait_sent=False)
                held.clear()

    async def one_round(client: Channel, n: int) -> None:
        ids = [(n * 100 + i) for i in range(per_client)]
        reader = asyncio.ensure_future(asyncio.gather(
            *(client.recv(timeout=5.0) for _ in ids)))
        await asyncio.sleep(0)  # the readers park before the requests go out
        grads = {"w": np.ones(20000, np.float32)}
        await asyncio.gather(*(client.send(message("push_grads", i, step=n, rank=0, version=0,
                                                   grads=grads), wait_sent=False) for i in ids))
        got = await reader
        assert sorted(g.msg.id for g in got) == ids

    server_task = asyncio.ensure_future(answer_in_pairs())
    try:
        for n in range(rounds):
            await asyncio.gather(*(one_round(c, n * 10 + k) for k, c in enumerate(clients)))
    finally:
        server_task.cancel()
        for ch in (server, *clients):
            ch.close()
