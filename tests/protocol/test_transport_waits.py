"""How a Channel waits: the socket's FD signals edge-triggered, and any call on the socket
can consume the edge, so a parked reader or sender must never sleep beside a message (or
free space) that has arrived. These tests park readers and senders on one socket at once,
many times over, and close sockets under parked waits."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import numpy as np
import pytest
import zmq
import zmq.asyncio

from narun.errors import WaitTimeout
from protocol import Channel, message, open_channel, transport

LOOPBACK = "tcp://127.0.0.1:0"


def beat(i: int) -> object:
    return message("heartbeat", i, role="trainer", rank=0, step=i, time=0.0)


async def echo(server: Channel) -> None:
    while True:
        inc = await server.recv()
        await server.send(inc.msg, to=inc.route, wait_sent=False)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hwm", [1, 4])
async def test_many_senders_and_one_reader_on_one_socket_lose_nothing(ctx, hwm) -> None:
    # A low high-water mark parks senders on both sides (the ROUTER's mandatory sends wait
    # too), while the client's reader is parked on the same socket: every reply must come.
    server = open_channel(ctx, "router", bind=LOOPBACK, hwm=hwm)
    client = open_channel(ctx, "dealer", connect=server.endpoint, hwm=hwm)
    serving = asyncio.create_task(echo(server))
    senders, per_sender = 8, 150
    big = np.arange(1 << 16, dtype=np.float32)  # 256 KiB: a zero-copy frame

    async def send_all(s: int) -> None:
        for k in range(per_sender):
            i = s * per_sender + k
            msg = beat(i) if k % 3 else message("push_grads", i, step=k, rank=s, version=0,
                                                 grads={"w": big})
            await client.send(msg, wait_sent=k % 2 == 0, timeout=30)

    try:
        sending = [asyncio.create_task(send_all(s)) for s in range(senders)]
        got = set()
        while len(got) < senders * per_sender:
            got.add((await client.recv(timeout=10)).msg.id)  # a lost wake-up times out here
        await asyncio.gather(*sending)
        assert got == set(range(senders * per_sender))
    finally:
        serving.cancel()
        server.close()
        client.close()


@pytest.mark.timeout(30)
async def test_parked_sends_go_out_in_order_and_a_timed_out_one_is_not_sent(ctx) -> None:
    # inproc: no kernel buffers, so the high-water marks alone decide when a send parks
    pull = open_channel(ctx, "pull", bind="inproc://parked-sends", hwm=1)
    push = open_channel(ctx, "push", connect=pull.endpoint, hwm=1)
    try:
        # nobody reads yet: the pipe fills, then sends park
        first = asyncio.create_task(push.send(beat(0)))
        while not first.done():
            await asyncio.sleep(0.01)
        parked = [asyncio.create_task(push.send(beat(i))) for i in range(1, 40)]
        await asyncio.sleep(0.1)
        assert not all(t.done() for t in parked)
        got = [(await pull.recv(timeout=10)).msg.id for _ in range(40)]
        await asyncio.gather(*parked)
        assert got == list(range(40))
        # fill it again; a send that times out is not sent, and later ones still are
        sent = 0
        with pytest.raises(WaitTimeout, match="send not accepted within 0.1 s"):
            for i in range(100, 200):
                await push.send(beat(i), timeout=0.1)
                sent += 1
        after = asyncio.create_task(push.send(beat(500)))
        got = [(await pull.recv(timeout=10)).msg.id for _ in range(sent + 1)]
        await after
        assert got == [*range(100, 100 + sent), 500]
        with pytest.raises(WaitTimeout):
            await pull.recv(timeout=0.2)
    finally:
        pull.close()
        push.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["channel", "socket", "context"])
async def test_closing_cancels_a_parked_recv_and_releases_the_fd(how) -> None:
    context = zmq.asyncio.Context()
    before = open_fds()
    channel = open_channel(context, "dealer", connect="tcp://127.0.0.1:1")
    waiting = asyncio.create_task(channel.recv())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    if how == "channel":
        channel.close()
    elif how == "socket":
        channel.socket.close(linger=0)
    else:
        context.destroy(linger=0)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 5)
    context.destroy(linger=0)
    await asyncio.sleep(0.05)  # ZeroMQ's reaper closes the socket's own FD
    assert open_fds() <= before


@pytest.mark.timeout(60)
async def test_channels_opened_and_closed_many_times_leak_no_fd(ctx) -> None:
    server = open_channel(ctx, "router", bind=LOOPBACK)
    serving = asyncio.create_task(echo(server))
    try:
        for i in range(3):  # warm up: ZeroMQ's own threads and FDs
            async with open_channel(ctx, "dealer", connect=server.endpoint) as c:
                await c.send(beat(i))
                await c.recv(timeout=5)
        await asyncio.sleep(0.1)
        before = open_fds()
        for i in range(100):
            async with open_channel(ctx, "dealer", connect=server.endpoint) as c:
                await c.send(beat(i))
                assert (await c.recv(timeout=5)).msg.id == i
        await asyncio.sleep(0.2)
        assert open_fds() <= before + 2
    finally:
        serving.cancel()
        server.close()


@pytest.mark.timeout(30)
async def test_a_send_that_consumes_the_edge_still_wakes_the_parked_reader(ctx) -> None:
    # The exact race: a reply arrives while the reader is parked, and before the loop looks
    # at the FD a send on the same socket processes ZeroMQ's commands, clearing the FD. The
    # send itself must wake the reader.
    server = open_channel(ctx, "router", bind=LOOPBACK)
    client = open_channel(ctx, "dealer", connect=server.endpoint)
    try:
        await client.send(beat(0))
        route = (await server.recv(timeout=5)).route
        for i in range(20):
            waiting = asyncio.create_task(client.recv(timeout=3))
            await asyncio.sleep(0.01)  # the reader parks
            await server.send(beat(i), to=route)  # accepted at once: no await suspends
            time.sleep(0.05)  # noqa: ASYNC251 - the loop must not look at the FD meanwhile
            await client.send(beat(1000 + i))  # processes the commands, clearing the FD
            assert (await waiting).msg.id == i
            assert (await server.recv(timeout=5)).msg.id == 1000 + i
    finally:
        server.close()
        client.close()


async def test_a_lost_wake_up_costs_a_moment_not_a_hang(ctx) -> None:
    # Something outside the Channel (zmq.asyncio used on the socket directly) may consume
    # the FD's edge. Simulated here by unhooking the Channel's FD reader: the parked reader
    # must still get the message, from its periodic ZMQ_EVENTS re-check.
    async with open_channel(ctx, "pull", bind=LOOPBACK) as pull, \
            open_channel(ctx, "push", connect=pull.endpoint) as push:
        first = asyncio.ensure_future(pull.recv(timeout=5))
        await asyncio.sleep(0.02)  # parked before the message exists: the FD reader is set
        await push.send(beat(1))
        assert (await first).msg.id == 1
        assert pull._fd is not None
        loop = asyncio.get_running_loop()
        loop.remove_reader(pull._fd)
        try:
            waiting = asyncio.ensure_future(pull.recv(timeout=5))
            await asyncio.sleep(0.02)  # parked
            await push.send(beat(2))
            began = time.monotonic()
            assert (await waiting).msg.id == 2
            assert time.monotonic() - began < 1.0
        finally:
            loop.add_reader(pull._fd, pull._on_events)


async def safety_nets(channel: Channel) -> int:
    """Timers a plain asyncio loop holds for ``channel`` (live ones, not cancelled) once this
    loop iteration has ended: the last waiter to leave lets the timer go at its end."""
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    return sum(1 for timer in loop._scheduled  # asyncio's heap of TimerHandles
               if not timer.cancelled() and getattr(timer._callback, "__self__", None) is channel)


@pytest.mark.timeout(30)
async def test_the_safety_net_runs_only_while_a_reader_or_sender_is_parked(ctx) -> None:
    # Its re-check every 50 ms is for a parked waiter; an idle channel must cost the loop
    # nothing (a process holds many channels that sit idle for long stretches).
    assert hasattr(asyncio.get_running_loop(), "_scheduled"), "needs asyncio's own loop"
    pull = open_channel(ctx, "pull", bind="inproc://safety-net", hwm=1)
    push = open_channel(ctx, "push", connect=pull.endpoint, hwm=1)
    try:
        waiting = asyncio.ensure_future(pull.recv(timeout=5))
        await asyncio.sleep(0.01)
        assert await safety_nets(pull) == 1  # a parked reader
        await push.send(beat(0))
        assert (await waiting).msg.id == 0
        assert await safety_nets(pull) == await safety_nets(push) == 0
        await asyncio.sleep(0.2)  # idle for a few periods of the re-check
        assert await safety_nets(pull) == await safety_nets(push) == 0
        sending = []  # nobody reads: the pipe fills, then a send parks
        while not sending or sending[-1].done():
            sending.append(asyncio.ensure_future(push.send(beat(len(sending)))))
            await asyncio.sleep(0.01)
        assert await safety_nets(push) == 1  # a parked sender
        for i in range(len(sending)):
            assert (await pull.recv(timeout=5)).msg.id == i
        await asyncio.gather(*sending)
        assert await safety_nets(pull) == await safety_nets(push) == 0
        with pytest.raises(WaitTimeout):
            await pull.recv(timeout=0.1)  # a reader parked until its deadline
        assert await safety_nets(pull) == 0
    finally:
        pull.close()
        push.close()


@pytest.mark.timeout(30)
async def test_a_reader_that_parks_again_at_once_keeps_its_safety_net(ctx, monkeypatch) -> None:
    # A reader loop is the common case; a timer cancelled and armed again for every message
    # costs ~5% of a small request/reply. One timer serves all of its messages.
    monkeypatch.setattr(transport, "_RECHECK_S", 60.0)  # it must not fire during the test
    loop = asyncio.get_running_loop()
    armed = []
    call_later = loop.call_later

    def counting_call_later(delay: float, callback: Callable[..., object],
                            *args: object) -> asyncio.TimerHandle:
        armed.append(callback)
        return call_later(delay, callback, *args)

    monkeypatch.setattr(loop, "call_later", counting_call_later)
    async with open_channel(ctx, "pull", bind="inproc://reader-loop") as pull, \
            open_channel(ctx, "push", connect=pull.endpoint) as push:
        got: list[int] = []

        async def read() -> None:
            while True:
                got.append((await pull.recv()).msg.id)

        reading = asyncio.ensure_future(read())
        try:
            for i in range(20):
                await push.send(beat(i))
                while len(got) <= i:
                    await asyncio.sleep(0.001)
            assert got == list(range(20))
            assert armed.count(pull._recheck_parked) == 1
        finally:
            reading.cancel()


@pytest.mark.timeout(30)
async def test_a_reader_that_times_out_behind_another_says_so_and_leaves_the_lock_free(
        ctx) -> None:
    async with open_channel(ctx, "pull", bind="inproc://two-readers") as pull, \
            open_channel(ctx, "push", connect=pull.endpoint) as push:
        first = asyncio.ensure_future(pull.recv())  # holds the socket, no deadline
        await asyncio.sleep(0.01)
        began = time.monotonic()
        with pytest.raises(WaitTimeout, match="no message within 0.1 s .another reader held"):
            await asyncio.wait_for(pull.recv(timeout=0.1), 5)
        assert time.monotonic() - began < 1.0
        await push.send(beat(1))
        await push.send(beat(2))
        assert (await first).msg.id == 1
        assert (await pull.recv(timeout=5)).msg.id == 2  # the timed-out reader took nothing
