"""Mailboxes over loopback sockets: replies, remote errors, refusals, timeouts, dead peers."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import zmq.asyncio

from narun.errors import ActorDiedError, Refused, RemoteError, WaitTimeout
from narun.runtime.mailbox import Mailbox, ReplyError, new_id
from protocol import message, open_channel, reply

pytestmark = pytest.mark.timeout(20)


class Server:
    def __init__(self) -> None:
        self.calls = 0

    async def handle(self, msg, route):
        self.calls += 1
        if msg.type == "pull_params":
            key = msg["keys"][0]
            if key == "boom":
                raise ValueError("the handler failed on purpose")
            if key == "stale":
                raise ReplyError("stale", "too old")
            if key == "slow":
                await asyncio.sleep(5)
            return reply(msg, "params", version=msg["min_version"] + 1,
                         params={key: np.arange(4, dtype=np.float32)})
        return None


@pytest.fixture
async def pair():
    ctx = zmq.asyncio.Context()
    server = Server()
    srv = Mailbox(open_channel(ctx, "router", bind="tcp://127.0.0.1:0"), "server",
                  server.handle).start()
    cli = Mailbox(open_channel(ctx, "dealer", connect=srv.channel.endpoint), "ps 3",
                  watch=True).start()
    yield srv, cli, server
    cli.close()
    srv.close()
    ctx.destroy(linger=0)


def pull(key):
    return message("pull_params", new_id(), keys=[key], min_version=6)


async def test_call_gets_its_reply(pair):
    _, cli, _ = pair
    answers = await asyncio.gather(*(cli.call(pull(k), timeout=5, what="w") for k in "abc"))
    for key, answer in zip("abc", answers):
        assert answer.type == "params" and answer["version"] == 7
        np.testing.assert_array_equal(answer["params"][key], np.arange(4, dtype=np.float32))


async def test_a_handler_exception_arrives_with_its_traceback(pair):
    _, cli, _ = pair
    with pytest.raises(RemoteError) as info:
        await cli.call(pull("boom"), timeout=5, what="bucket boom")
    assert "the handler failed on purpose" in str(info.value)
    assert "ps 3" in str(info.value) and "bucket boom" in str(info.value)
    assert "raise ValueError" in info.value.remote_traceback


async def test_a_refusal_carries_its_code(pair):
    _, cli, _ = pair
    with pytest.raises(Refused) as info:
        await cli.call(pull("stale"), timeout=5, what="x")
    assert info.value.code == "stale"


async def test_a_type_nobody_handles_is_refused(pair):
    srv, cli, _ = pair
    srv.handler = None
    with pytest.raises(Refused) as info:
        await cli.call(pull("a"), timeout=5, what="x")
    assert info.value.code == "unsupported"


async def test_timeout_names_peer_step_and_what(pair):
    _, cli, _ = pair
    with pytest.raises(WaitTimeout, match=r"ps 3 did not answer pull_params \(bucket b7\) at "
                                          r"step 12 within 0.2 s"):
        await cli.call(pull("slow"), timeout=0.2, what="bucket b7", step=12)


async def test_a_dead_peer_is_noticed_when_the_monitor_starts_after_the_connection():
    ctx = zmq.asyncio.Context()
    srv = Mailbox(open_channel(ctx, "router", bind="tcp://127.0.0.1:0"), "server",
                  Server().handle).start()
    channel = open_channel(ctx, "dealer", connect=srv.channel.endpoint)
    time.sleep(0.3)  # the TCP connection completes before the monitor is attached
    cli = Mailbox(channel, "ps 3", watch=True).start()
    try:
        await cli.call(pull("a"), timeout=5, what="x")
        waiting = asyncio.ensure_future(cli.call(pull("slow"), timeout=10, what="x"))
        await asyncio.sleep(0.1)
        began = time.monotonic()
        srv.close()
        with pytest.raises(ActorDiedError, match="ps 3 disconnected"):
            await waiting
        assert time.monotonic() - began < 2
    finally:
        cli.close()
        srv.close()
        ctx.destroy(linger=0)


async def test_a_dead_peer_fails_waiting_and_later_calls_at_once(pair):
    srv, cli, _ = pair
    await cli.call(pull("a"), timeout=5, what="x")  # connected
    waiting = asyncio.ensure_future(cli.call(pull("slow"), timeout=10, what="x"))
    await asyncio.sleep(0.1)
    began = time.monotonic()
    srv.close()  # the TCP connection drops, as when the peer process exits
    with pytest.raises(ActorDiedError, match="ps 3 disconnected"):
        await waiting
    assert time.monotonic() - began < 2
    with pytest.raises(ActorDiedError):
        await cli.call(pull("a"), timeout=5, what="x")


async def test_a_cancellation_racing_the_timeout_is_not_swallowed(pair):
    """The caller is cancelled (a shutdown) in the same loop iteration as its call times
    out: the cancellation wins; a WaitTimeout here would swallow the shutdown."""
    _, cli, _ = pair
    call = asyncio.ensure_future(cli.call(pull("slow"), timeout=0.05, what="x"))
    await asyncio.sleep(0.01)  # the call is parked on its reply, its deadline armed
    asyncio.get_running_loop().call_later(0.04, call.cancel)
    time.sleep(0.1)  # both deadlines pass while the loop is blocked: both fire in one go
    with pytest.raises(asyncio.CancelledError):
        await call
    assert call.cancelled()


async def test_a_failed_receive_loop_fails_calls_at_once_and_tells_the_owner():
    ctx = zmq.asyncio.Context()
    srv = Mailbox(open_channel(ctx, "router", bind="tcp://127.0.0.1:0"), "server",
                  Server().handle).start()
    channel = open_channel(ctx, "dealer", connect=srv.channel.endpoint)
    failures = []
    cli = Mailbox(channel, "ps 3", on_error=failures.append)
    arrived = asyncio.Event()

    async def broken_recv(timeout=None):
        await arrived.wait()
        raise RuntimeError("the socket broke")

    channel.recv = broken_recv
    cli.start()
    try:
        waiting = asyncio.ensure_future(cli.call(pull("a"), timeout=10, what="x"))
        await asyncio.sleep(0.05)
        began = time.monotonic()
        arrived.set()
        with pytest.raises(ActorDiedError, match="receive loop failed.*the socket broke"):
            await waiting
        assert time.monotonic() - began < 1
        assert [repr(e) for e in failures] == ["RuntimeError('the socket broke')"]
        with pytest.raises(ActorDiedError, match="the socket broke"):
            await cli.call(pull("a"), timeout=10, what="x")
    finally:
        cli.close()
        srv.close()
        ctx.destroy(linger=0)


async def test_requests_in_flight_are_bounded_and_the_rest_refused_busy():
    ctx = zmq.asyncio.Context()
    release = asyncio.Event()

    async def hold(msg, route):
        await release.wait()
        return reply(msg, "params", version=1, params={})

    srv = Mailbox(open_channel(ctx, "router", bind="tcp://127.0.0.1:0"), "server", hold,
                  max_requests=5).start()
    cli = Mailbox(open_channel(ctx, "dealer", connect=srv.channel.endpoint), "server").start()
    try:
        calls = [asyncio.ensure_future(cli.call(pull(str(i)), timeout=10, what="x"))
                 for i in range(12)]
        done, _ = await asyncio.wait(calls, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.2)  # every request has arrived
        assert srv.serving == 5
        busy = [c for c in calls if c.done()]
        assert len(busy) == 7 and srv.busy_refused == 7
        for c in busy:
            with pytest.raises(Refused, match="max_requests") as info:
                c.result()
            assert info.value.code == "busy"
        release.set()
        answers = await asyncio.gather(*(c for c in calls if c not in busy))
        assert [a.type for a in answers] == ["params"] * 5
        assert srv.serving == 0
        assert (await cli.call(pull("again"), timeout=5, what="x")).type == "params"
    finally:
        cli.close()
        srv.close()
        ctx.destroy(linger=0)


async def test_an_error_answering_no_call_goes_to_the_owner_who_may_claim_it():
    from structlog.testing import capture_logs

    from protocol import error_message

    ctx = zmq.asyncio.Context()
    strays: list[tuple[int, str]] = []

    def claim(msg, route):
        strays.append((msg.id, msg["code"]))
        return msg.id == 1  # claims id 1; id 2 is left to the log

    srv = Mailbox(open_channel(ctx, "router", bind="tcp://127.0.0.1:0"), "server",
                  Server().handle, on_stray_error=claim).start()
    cli = open_channel(ctx, "dealer", connect=srv.channel.endpoint)
    try:
        with capture_logs() as logs:
            for id_ in (1, 2):
                await cli.send(error_message(id_, "unsupported", "no"))
            deadline = time.monotonic() + 5
            while len(strays) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
    finally:
        cli.close()
        srv.close()
        ctx.destroy(linger=0)
    assert strays == [(1, "unsupported"), (2, "unsupported")]
    assert [(e["event"], e["message"]) for e in logs] == [("runtime.unsolicited_error", "no")]
