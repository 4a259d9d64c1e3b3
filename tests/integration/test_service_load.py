"""The job service under hostile and heavy use (issue 14, item 6): a flood of garbage on
its control socket, 50 followers of one job, 500 followers that leave mid-stream (and a
quiet job's followers that left, and a client that stops reading but stays connected), a
peer without an authorised key. The service's counters come from its log: `service.vitals`
(NARUN_LOG_LEVEL=debug) and `service.stopped`; the quiet-job test runs a JobService on a
thread of this process to read its subscriber table."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import uvloop
import zmq

from narun.client import Client
from narun.config import to_dict
from narun.errors import ProtocolError
from narun.runtime.sdnotify import Notifier
from narun.runtime.service import VITALS_EVERY, JobService
from protocol import SCHEMAS, decode, message
from protocol.codec import encode
from protocol.keys import authorize, generate_keypair, load_keypair, load_public_key
from tests.integration.services import ServiceProcess

DEBUG = {"NARUN_LOG_LEVEL": "debug"}  # the service logs service.vitals


@pytest.fixture
def service(tmp_path):
    started: list[ServiceProcess] = []

    def make(slots: int = 4, **options: Any) -> ServiceProcess:
        started.append(ServiceProcess(tmp_path / f"service{len(started)}", slots, **options))
        return started[-1]

    yield make
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


def _until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise TimeoutError(f"waited {timeout:g} s for {what}")


def _next_vitals(svc: ServiceProcess) -> dict[str, Any]:
    """The first service.vitals line logged from now on."""
    seen = len(svc.lines("service.vitals"))
    return _until("service.vitals", lambda: svc.lines("service.vitals")[seen:],
                  timeout=4 * VITALS_EVERY)[0]


def _stopped(svc: ServiceProcess) -> dict[str, Any]:
    assert svc.stop() == 0
    [stopped] = svc.lines("service.stopped")
    return stopped


def _run_job(endpoint: str, config: dict, keys: Path | None = None) -> tuple[str, str, list]:
    async def main():
        async with Client(endpoint, keys=keys) as client:
            job = await client.submit(config)
            events = [e async for e in client.events(job)]
            return job, (await client.status(job)).state, events

    return uvloop.run(main())


# -- garbage ---------------------------------------------------------------------------
def _valid(rng: random.Random) -> dict[str, Any]:
    return rng.choice([
        {"v": 1, "type": "status", "id": rng.getrandbits(63), "job": "x-0001"},
        {"v": 1, "type": "events", "id": rng.getrandbits(63), "job": "x-0001", "since": 0},
        {"v": 1, "type": "cancel", "id": rng.getrandbits(63), "job": "x-0001", "reason": "r"},
        {"v": 1, "type": "submit", "id": rng.getrandbits(63), "name": "n", "config": {}},
        {"v": 1, "type": "hello", "id": rng.getrandbits(63), "role": "client", "rank": 0,
         "software": "x"},
    ])


def _wrong_fields(rng: random.Random) -> dict[str, Any]:
    header = _valid(rng)
    field = rng.choice([k for k in header if k != "v"] + ["v"])
    how = rng.randrange(4)
    if how == 0:
        del header[field]
    elif how == 1:
        header[field] = rng.choice([[1, 2], {"a": 1}, b"\xff", 1.5, None, "s", -1, True])
    elif how == 2:
        header["type"] = rng.choice([*SCHEMAS, "nope", ""])
        header[rng.choice(["job", "since", "events", "rank"])] = {"deep": [None]}
    else:
        header["v"] = rng.choice([0, 2, "1", 1.0])
    return header


def _garbage(rng: random.Random) -> list[bytes]:
    kind = rng.randrange(100)
    if kind < 30:  # random bytes, in one frame or several
        return [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.choice([1, 1, 2, 3]))]
    if kind < 50:  # truncated msgpack
        packed = msgpack.packb(_valid(rng))
        return [packed[:rng.randrange(0, len(packed))]]
    if kind < 60:  # msgpack of the wrong type
        return [msgpack.packb(rng.choice([7, -1, "status", [1, 2, 3], 1.5, None, b"x",
                                          [{"v": 1}], True]))]
    if kind == 60 and rng.random() < 0.05:  # oversized: a header over max_header_bytes
        return [msgpack.packb({"v": 1, "type": "status", "id": 3, "job": "x" * (17 << 20)})]
    if kind == 61 and rng.random() < 0.05:  # more buffer frames than max_frames
        return [msgpack.packb(_valid(rng)), *[b"x"] * 4100]
    return [msgpack.packb(_wrong_fields(rng))]  # valid msgpack, wrong fields


def _refused(frames: list[bytes]) -> bool:
    try:
        decode(frames)
    except ProtocolError:
        return True
    return False


def test_the_control_socket_survives_the_protocol_fuzz(service, make_config):
    svc = service(slots=2)
    rng = random.Random(14)
    ctx = zmq.Context()
    sent = replies = 0
    try:
        peer = ctx.socket(zmq.DEALER)
        peer.linger, peer.sndtimeo = 0, 20_000
        peer.connect(svc.endpoint)
        while sent < 10_000:
            frames = _garbage(rng)
            if not _refused(frames):  # rare: the garbage is a well-formed message
                continue
            peer.send_multipart(frames)
            sent += 1
            with contextlib.suppress(zmq.Again):
                while True:  # read the refusals as they come: a reader that keeps up
                    peer.recv_multipart(zmq.NOBLOCK)
                    replies += 1
            if sent % 500 == 0:
                assert svc.proc.poll() is None, svc.log.read_text()[-3000:]
        peer.send_multipart(encode(message("jobs", 1)))  # after every refusal: an answer
        while True:
            answer = decode(peer.recv_multipart())
            if answer.id == 1:
                break
            replies += 1
    finally:
        ctx.destroy(linger=0)
    assert answer.type == "jobs" and answer["jobs"] == []
    assert replies > 0 and svc.proc.poll() is None
    job, state, events = _run_job(svc.endpoint, to_dict(make_config("local", 0, steps=5)))
    assert state == "done" and [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3,
                                                                                       4, 5]
    stopped = _stopped(svc)
    assert stopped["refused"] == 10_000  # each refused by the decoder, none by a handler


def test_fifty_followers_each_get_every_event_in_order(service, make_config):
    svc = service(slots=2)
    config = to_dict(make_config("local", 0, steps=300, eval_every=100))

    async def main():
        clients = [Client(svc.endpoint, timeout=30.0) for _ in range(50)]
        async with contextlib.AsyncExitStack() as stack:
            for client in clients:
                await stack.enter_async_context(client)
            job = await clients[0].submit(config)

            async def follow(client: Client) -> list[dict]:
                return [e async for e in client.events(job)]

            return job, await asyncio.gather(*(follow(c) for c in clients))

    job, followed = uvloop.run(main())
    path = svc.state_dir / "jobs" / job / "events.jsonl"
    stored = [json.loads(line) for line in path.read_text().splitlines()]
    assert stored[-1]["event"] == "done" and len(stored) > 300
    assert [e["seq"] for e in stored] == list(range(len(stored)))
    for events in followed:
        assert events == stored
    svc.stop()


def _job_pid(svc: ServiceProcess, job: str) -> int:
    started = _until(f"{job} to start",
                     lambda: [e for e in svc.lines("service.started") if e["job"] == job])
    return int(started[-1]["pid"])


def _leave_mid_stream(ctx: zmq.Context, endpoint: str, job: str, n: int) -> int:
    """n followers that subscribe, read one batch, and close at once; events read."""
    read = 0
    peers = []
    for i in range(n):
        peer = ctx.socket(zmq.DEALER)
        peer.linger, peer.rcvtimeo, peer.sndtimeo = 0, 10_000, 10_000
        peer.connect(endpoint)
        peer.send_multipart(encode(message("events", 1000 + i, job=job, since=0)))
        peers.append(peer)
    for peer in peers:
        batch = decode(peer.recv_multipart())
        read += len(batch["events"])
        peer.close(linger=0)
    return read


@pytest.mark.timeout(120)
def test_followers_that_leave_mid_stream_leave_nothing_behind(service, make_config):
    svc = service(slots=2, env=DEBUG)
    config = to_dict(make_config("local", 0, steps=10_000_000, eval_every=0,
                                 checkpoint_every=0))

    async def submit():
        async with Client(svc.endpoint) as client:
            job = await client.submit(config)
            async for event in client.events(job):
                if event["event"] == "step" and event["step"] >= 20:
                    return job

    job = uvloop.run(submit())
    pid = _job_pid(svc, job)
    stored = svc.state_dir / "jobs" / job / "events.jsonl"
    _until("no follower", lambda: _next_vitals(svc)["followers"] == 0)  # the submitter left
    # the job stays running but quiet while the followers come and go: its events (kept in
    # the service's memory) do not grow, so the service's rss is comparable
    os.kill(pid, signal.SIGSTOP)
    ctx = zmq.Context()
    try:
        for _ in range(2):  # the first round warms up (allocator arenas, zmq's buffers)
            baseline = _next_vitals(svc)
            read = sum(_leave_mid_stream(ctx, svc.endpoint, job, 50) for _ in range(10))
            assert read >= 500 * 20
        # those still being sent to when they left are dropped at once (EHOSTUNREACH); those
        # that had every stored event before leaving wait for the job's next event
        assert _next_vitals(svc)["followers"] <= 1000
        before = len(stored.read_text().splitlines())
        os.kill(pid, signal.SIGCONT)  # its next event finds each of them gone
        _until("an event", lambda: len(stored.read_text().splitlines()) > before)
        os.kill(pid, signal.SIGSTOP)
        after = _next_vitals(svc)
    finally:
        ctx.destroy(linger=0)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert svc.proc.poll() is None
    assert after["followers"] == 0
    assert after["tasks"] == baseline["tasks"], (baseline, after)
    # 500 more followers after the warm-up: 4 KiB leaked by each would show (measured: the
    # first round of 500 adds ~3.7 MB, the second ~0.1 MB)
    assert after["rss"] - baseline["rss"] < 2 << 20, (baseline, after)
    svc.stop()


def test_a_client_that_stops_reading_a_stream_is_no_longer_sent_it(service, make_config):
    svc = service(slots=2, env=DEBUG)
    config = to_dict(make_config("local", 0, steps=10_000_000, eval_every=0,
                                 checkpoint_every=0))

    async def main():
        async with Client(svc.endpoint) as client:
            job = await client.submit(config)
            async for event in client.events(job):
                if event["event"] == "step":
                    break  # the connection stays open: each later event is answered `error`
            vitals = await asyncio.to_thread(
                _until, "the follower to be dropped",
                lambda: (v := _next_vitals(svc))["followers"] == 0 and v)
            await client.cancel(job)
            return vitals

    vitals = uvloop.run(main())
    assert vitals["running"] == 1  # dropped while its job ran on
    # each event sent after it stopped reading came back as an `error`; none was unexpected
    assert svc.lines("runtime.unsolicited_error") == []
    svc.stop()


@contextlib.contextmanager
def service_thread(state_dir: Path, slots: int, **options: Any) -> Iterator[JobService]:
    """A JobService on loopback on a thread of this process (its tables readable)."""
    svc = JobService("tcp://127.0.0.1:0", state_dir, slots,
                     notifier=Notifier({}, unset_environment=False), **options)
    loop = asyncio.new_event_loop()
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(loop.run_until_complete(
        svc.run())), daemon=True)
    thread.start()
    _until("the service to listen", lambda: svc.endpoint, timeout=10)
    try:
        yield svc
    finally:
        loop.call_soon_threadsafe(svc.stop)
        thread.join(30)
        loop.close()
        assert result == [0], result


def test_a_submit_wakes_the_scheduler(make_config, tmp_path, monkeypatch):
    import narun.runtime.service

    monkeypatch.setattr(narun.runtime.service, "TICK", 3600.0)  # only a wake-up starts it
    config = to_dict(make_config("local", 0, steps=1500))
    config["training"]["out_dir"] = "run"  # relative: each job's own, in its directory
    with service_thread(tmp_path / "state", 3) as svc:

        async def main():
            async with Client(svc.endpoint) as client:
                # at once: some arrive while the scheduler is busy starting another, and
                # each must still start now, not when a job ends
                jobs = await asyncio.gather(*(client.submit(config) for _ in range(3)))
                async with asyncio.timeout(120):
                    return [await client.wait(job) for job in jobs]

        assert [s.state for s in uvloop.run(main())] == ["done"] * 3
        states = [j.state for j in svc.store.ordered()]
    assert max(s.started for s in states) < min(s.ended for s in states)  # all ran at once


def test_a_quiet_job_forgets_followers_that_left(make_config, tmp_path):
    # 4 processes never fit in 1 slot: the job stays queued, and emits nothing
    config = to_dict(make_config("ps-sync", 2, shards=2))
    with service_thread(tmp_path / "state", 1, follower_ttl=2.0) as svc:

        async def main():
            async with Client(svc.endpoint, follow_idle=0.3) as live:
                job = await live.submit(config)
                following = asyncio.create_task(anext(live.events(job), None))
                ctx = zmq.Context()
                try:
                    for i in range(20):
                        peer = ctx.socket(zmq.DEALER)
                        peer.connect(svc.endpoint)
                        peer.send_multipart(encode(message("events", 1 + i, job=job,
                                                           since=0)))
                        peer.close(linger=1000)
                finally:
                    ctx.term()
                deadline = time.monotonic() + 1.5  # within follower_ttl of their requests
                # (the service files a job's followers as their requests arrive)
                while time.monotonic() < deadline and len(svc._subscribers.get(job, ())) < 21:
                    await asyncio.sleep(0.02)
                assert len(svc._subscribers[job]) == 21  # one live, 20 gone
                deadline = time.monotonic() + 4 * VITALS_EVERY
                while time.monotonic() < deadline and len(svc._subscribers.get(job, ())) > 1:
                    await asyncio.sleep(0.1)
                left = len(svc._subscribers.get(job, ()))
                assert not following.done()  # the live follower is still following
                following.cancel()
                return left

        assert uvloop.run(main()) == 1


# -- keys ------------------------------------------------------------------------------
def _keys(root: Path) -> tuple[Path, Path]:
    """The service's key dir and an authorised client's: each admits the other."""
    server, client = root / "service", root / "client"
    generate_keypair(server, "coordinator")
    generate_keypair(client, "client")
    authorize(server, client / "client.key")
    authorize(client, server / "coordinator.key", name="127.0.0.1")
    return server, client


def test_an_unauthorised_key_gets_nothing_through(service, make_config, tmp_path):
    server, client = _keys(tmp_path / "keys")
    generate_keypair(tmp_path / "stranger", "stranger")
    stranger = load_keypair(tmp_path / "stranger" / "stranger.key_secret")
    svc = service(slots=2, keys=server, env=DEBUG)
    ctx = zmq.Context()
    try:
        peers = [ctx.socket(zmq.DEALER) for _ in range(2)]
        peers[0].curve_serverkey = load_public_key(server / "coordinator.key")
        peers[0].curve_publickey, peers[0].curve_secretkey = stranger.public, stranger.secret
        for peer in peers:  # and one in plaintext
            peer.linger, peer.sndtimeo = 0, 100
            peer.connect(svc.endpoint)
            for i in range(1000):
                request = message("jobs", 1 + i) if i % 2 else message(
                    "submit", 1 + i, name="x", config=to_dict(make_config("local", 0)))
                try:
                    peer.send_multipart(encode(request))
                except zmq.Again:  # nothing is ever admitted, so the queue stays full
                    break
        time.sleep(1.0)
        assert _next_vitals(svc)["processed"] == 0
        for peer in peers:
            assert peer.poll(200) == 0  # no reply either
    finally:
        ctx.destroy(linger=0)
    job, state, events = _run_job(svc.endpoint, to_dict(make_config("local", 0, steps=3)),
                                  keys=client)
    assert state == "done" and events[-1]["event"] == "done"
    assert [j.name for j in (svc.state_dir / "jobs").iterdir()] == [job]  # only this one
    stopped = _stopped(svc)
    assert stopped["processed"] > 0 and stopped["denied"] >= 1
