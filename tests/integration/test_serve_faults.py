"""`narun serve` under faults and hostile use: an inference worker killed with -9 (alone,
and beside a second replica once the restart budget is spent), a flood of 10,000 garbage
messages, 1,000 clients that leave mid-stream, CURVE keys, SIGTERM (drain, grace, exit
status, sd_notify), and a client that stops reading.

Most tests run the server in the test's own event loop (tests.integration.serving), so its
tables (streams, queue, routes, tasks, stats) can be read directly; its workers are real
processes. The SIGTERM tests run `narun serve --json` as a subprocess. The garbage flood
and the 1,000 clients run as processes of their own (`python -c`): they take no GIL from
the server's loop, and their sockets' memory is not in the server's RSS."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import uvloop
import zmq

import narun.serve.server
from narun._process import rss_bytes
from narun.errors import ConfigError, ProtocolError
from narun.serve.client import GenerationError, InferenceClient, ServerUnavailable
from narun.serve.server import InferenceServer
from narun.serve.streams import ModelInfo, Request, RequestError, Tokenizer, check_request
from protocol import SCHEMAS, decode, message
from protocol.codec import encode
from protocol.keys import authorize, generate_keypair, load_node_keys, load_public_key
from tests.integration.serving import ROOT, make_checkpoint, reference_tokens, running_server

PROMPTS = [[10, 20, 30], [72, 101, 108, 108, 111], [7], [200, 100, 50, 25]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", block_size=64)


def _ref(checkpoint: Path, prompt: list[int], n: int) -> list[int]:
    return reference_tokens(checkpoint, prompt, n, temperature=0.0)


async def _until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        await asyncio.sleep(0.02)
    raise TimeoutError(f"waited {timeout:g} s for {what}")


async def _greedy(client: InferenceClient, prompt: list[int], n: int) -> tuple[list[int], Any]:
    stream = client.generate(prompt, max_tokens=n, temperature=0.0, seed=0)
    tokens = [t.token async for t in stream]
    return tokens, stream.done


async def _finish(it: Any) -> list[int] | GenerationError:
    """The rest of a stream's tokens, or the GenerationError that ended it."""
    try:
        return [t.token async for t in it]
    except GenerationError as exc:
        return exc


# -- a worker killed with -9 ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_killed_worker_fails_its_streams_in_words_and_is_restarted(checkpoint):
    n = 60 - 5  # long enough to be running when the worker dies (the context is 64)

    async def main():
        async with running_server(checkpoint, max_batch=4, max_restarts=1) as server:
            replica = server.pool.replicas[0]
            pid = replica.proc.pid
            # a hang would end in ServerUnavailable after 10 s, not in GenerationError
            async with InferenceClient(server.endpoint, timeout=10.0) as client:
                streams = [aiter(client.generate(p, max_tokens=n, temperature=0.0, seed=0))
                           for p in PROMPTS]
                for s in streams:
                    await anext(s)  # each is running on the worker
                os.kill(pid, signal.SIGKILL)
                ended = [await _finish(s) for s in streams]
                assert server.in_flight == 0 and server.stats.failed == len(PROMPTS)
                await _until("the worker to be restarted",
                             lambda: replica.ready and replica.proc.pid != pid)
                after = await _greedy(client, PROMPTS[0], 20)
            return pid, ended, after, replica.starts, server.pool.restarts_left

    pid, ended, (tokens, done), starts, restarts_left = uvloop.run(main())
    for e in ended:
        assert isinstance(e, GenerationError), e
        assert e.code == "internal"
        assert f"inference worker 0 (pid {pid}) died (killed by signal 9)" in str(e)
    assert tokens == _ref(checkpoint, PROMPTS[0], 20) and done.reason == "length"
    assert (starts, restarts_left) == (2, 0)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_with_the_restart_budget_spent_the_other_replica_keeps_serving(checkpoint):
    n = 60 - 5

    async def main():
        async with running_server(checkpoint, replicas=2, max_batch=2,
                                  max_restarts=0) as server:
            lost, kept = server.pool.replicas
            pid = lost.proc.pid
            async with InferenceClient(server.endpoint, timeout=10.0) as client:
                streams = [aiter(client.generate(p, max_tokens=n, temperature=0.0, seed=0))
                           for p in PROMPTS]
                firsts = [(await anext(s)).token for s in streams]
                assert len(lost.streams) == len(kept.streams) == 2  # least loaded first
                os.kill(pid, signal.SIGKILL)
                ended = await asyncio.gather(*(_finish(s) for s in streams))
                # more requests than one replica's batch: they queue for the survivor
                after = await asyncio.gather(*(_greedy(client, p, 20) for p in PROMPTS))
            return pid, firsts, ended, after, lost, kept, server.accepting

    pid, firsts, ended, after, lost, kept, accepting = uvloop.run(main())
    failed = [e for e in ended if isinstance(e, GenerationError)]
    assert len(failed) == 2
    for e in failed:
        assert e.code == "internal" and f"inference worker 0 (pid {pid}) died" in str(e)
    for prompt, first, rest in zip(PROMPTS, firsts, ended):
        if not isinstance(rest, GenerationError):  # ran on the survivor: all of it, right
            assert [first, *rest] == _ref(checkpoint, prompt, n)
    for prompt, (tokens, done) in zip(PROMPTS, after):
        assert tokens == _ref(checkpoint, prompt, 20) and done.reason == "length"
    assert lost.proc is None and lost.starts == 1  # not restarted: no budget
    assert kept.starts == 1 and accepting


# -- garbage -------------------------------------------------------------------------------
def _valid(rng: random.Random) -> dict[str, Any]:
    return rng.choice([
        {"v": 1, "type": "generate", "id": rng.getrandbits(63), "text": "hi", "max_tokens": 4,
         "temperature": 0.0, "top_k": 0, "seed": 0},
        {"v": 1, "type": "abort", "id": rng.getrandbits(63), "reason": "r"},
        {"v": 1, "type": "hello", "id": rng.getrandbits(63), "role": "client", "rank": 0,
         "software": "x"},
    ])


def _mutated(rng: random.Random) -> dict[str, Any]:
    header = _valid(rng)
    how = rng.randrange(5)
    if how == 0:
        del header[rng.choice(list(header))]
    elif how == 1:
        header[rng.choice(list(header))] = rng.choice([[1, 2], {"a": 1}, b"\xff", 1.5, None,
                                                       "s", -1, True, (1 << 64) - 1])
    elif how == 2:
        header["type"] = rng.choice([*SCHEMAS, "nope", "", "tokenz"])
    elif how == 3:
        header["v"] = rng.choice([0, 2, "1", 1.0, 99])
    else:
        header[rng.choice(["prompt", "stop", "extra", "text"])] = rng.choice(
            [{"deep": [None]}, [b"x"], "", 7, ["a", 1]])
    return header


def _garbage(rng: random.Random) -> list[bytes]:
    kind = rng.randrange(100)
    if kind < 25:  # random bytes, in one frame or several
        return [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.choice([1, 1, 2, 3]))]
    if kind < 40:  # truncated msgpack
        packed = msgpack.packb(_valid(rng))
        return [packed[:rng.randrange(0, len(packed))]]
    if kind < 48:  # msgpack that is no map
        return [msgpack.packb(rng.choice([7, -1, "generate", [1, 2, 3], 1.5, None, b"x",
                                          [{"v": 1}], True]))]
    if kind < 52:  # multipart junk: a valid header, then frames nobody announced
        return [msgpack.packb(_valid(rng)), *[rng.randbytes(9)] * rng.randrange(1, 40)]
    if kind == 52 and rng.random() < 0.1:  # a big frame, within max_message_bytes
        return [rng.randbytes(4 << 20)]
    if kind == 53 and rng.random() < 0.1:  # max_frames buffer frames, all junk
        return [msgpack.packb(_valid(rng)), *[b"x"] * 4096]
    return [msgpack.packb(_mutated(rng))]  # valid msgpack, wrong fields, types, version


def _well_formed_but_wrong(rng: random.Random) -> list[Any]:
    """Messages the decoder takes and the server must refuse (each gets an error)."""
    i = rng.getrandbits(63)
    gen = {"max_tokens": 4, "temperature": 0.0, "top_k": 0, "seed": 0}
    msg = rng.choice([
        lambda: message("generate", i, **gen),  # neither text nor prompt
        lambda: message("generate", i, **gen, text="a", prompt=np.arange(3)),
        lambda: message("generate", i, **{**gen, "max_tokens": 10**9}, text="a"),
        lambda: message("generate", i, **{**gen, "max_tokens": 0}, text="a"),
        lambda: message("generate", i, **{**gen, "temperature": -1.0}, text="a"),
        lambda: message("generate", i, **{**gen, "top_k": -3}, text="a"),
        lambda: message("generate", i, **{**gen, "seed": -1}, text="a"),
        lambda: message("generate", i, **gen, text="a", stop=[""]),
        lambda: message("generate", i, **gen, prompt=np.array([1.5, 2.5])),
        lambda: message("generate", i, **gen, prompt=np.zeros((2, 2), np.int64)),
        lambda: message("generate", i, **gen, prompt=np.array([5, 300, -1])),
        lambda: message("generate", i, **gen, prompt=np.zeros(0, np.int64)),
        lambda: message("generate", i, **gen, text="x" * 200),  # beyond the context
        lambda: message("abort", i, reason="no such stream"),
        lambda: message("status", i, job="x-0001"),
        lambda: message("jobs", i),
    ])()
    if rng.random() < 0.005:  # huge, within the limits: a 2 MB text, a 4 MB prompt
        msg = rng.choice([message("generate", i, **gen, text="x" * (2 << 20)),
                          message("generate", i, **gen, prompt=np.ones(1 << 19, np.int64))])
    return encode(msg)


def _decodes(frames: list[Any]) -> Any:
    try:
        return decode(frames)
    except ProtocolError:
        return None


def _admissible(msg: Any, info: ModelInfo) -> bool:
    """Whether the server would run this generate (such garbage is not sent)."""
    if msg.type != "generate":
        return False
    try:
        check_request(Request(prompt=msg.get("prompt"), text=msg.get("text"),
                              max_tokens=msg["max_tokens"], temperature=msg["temperature"],
                              top_k=msg["top_k"], seed=msg["seed"],
                              stop=tuple(msg.get("stop") or ())), info, Tokenizer())
    except RequestError:
        return False
    return True


def flood(endpoint: str, info_json: str, total: int, peers: int, seed: int) -> None:
    """`total` garbage messages from `peers` raw DEALERs, reading the answers as they come;
    prints what was sent as JSON. Run as a process of its own (python -c), so it does not
    take the GIL from the server's loop."""
    info, rng = ModelInfo(**json.loads(info_json)), random.Random(seed)
    counts = {"refused": 0, "invalid_generate": 0, "answers": 0}
    ctx = zmq.Context()
    try:
        socks = []
        for _ in range(peers):
            s = ctx.socket(zmq.DEALER)
            s.linger, s.sndtimeo = 0, 20_000
            s.connect(endpoint)
            socks.append(s)
        sent = 0
        while sent < total:
            wrong = rng.random() < 0.2  # known to be wrong: not judged by the server's code
            frames = _well_formed_but_wrong(rng) if wrong else _garbage(rng)
            msg = _decodes(frames)
            if msg is None:
                counts["refused"] += 1
            elif not wrong and _admissible(msg, info):
                continue  # rare: a mutation that is a request it would run
            elif msg.type == "generate":
                counts["invalid_generate"] += 1
            sock = socks[sent % peers]
            sock.send_multipart(frames)
            sent += 1
            with contextlib.suppress(zmq.Again):
                while True:
                    sock.recv_multipart(zmq.NOBLOCK)
                    counts["answers"] += 1
        for i, sock in enumerate(socks):  # its answer comes after every refusal sent before
            sock.send_multipart(encode(message("hello", 1 << 62, role="client", rank=i,
                                               software="x")))
            sock.rcvtimeo = 30_000
            while (answer := decode(sock.recv_multipart())).id != 1 << 62:
                counts["answers"] += 1
            assert answer.type == "welcome", answer
    finally:
        ctx.destroy(linger=0)
    print(json.dumps(counts))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ten_thousand_garbage_messages_then_a_request_is_served(checkpoint):
    async def main():
        async with running_server(checkpoint, max_batch=4) as server:
            pid = server.pool.replicas[0].proc.pid
            code = (f"from tests.integration.test_serve_faults import flood; "
                    f"flood({server.endpoint!r}, {json.dumps(vars(server.info))!r}, "
                    f"10_000, 10, 5)")
            counts = json.loads(await _python(code))
            async with InferenceClient(server.endpoint, timeout=30.0) as client:
                served = await _greedy(client, PROMPTS[1], 20)
            replica = server.pool.replicas[0]
            return (counts, served, server._public.refused, server.stats, server.in_flight,
                    replica.proc.pid == pid and replica.proc.returncode is None)

    counts, (tokens, done), refused, stats, in_flight, same_worker = uvloop.run(main())
    assert tokens == _ref(checkpoint, PROMPTS[1], 20) and done.reason == "length"
    assert refused == counts["refused"] > 5000  # each refused by the decoder
    assert stats.refused == counts["invalid_generate"] > 500  # and each bad request by check
    assert stats.served == 1 and stats.failed == 0 and in_flight == 0
    assert counts["answers"] > 0 and same_worker  # the worker never saw any of it


# -- clients that leave mid-stream ----------------------------------------------------------
def leave_mid_stream(endpoint: str, n: int, at_once: int, seed: int) -> None:
    """n clients, `at_once` at a time, each sends generate, reads 1 or 2 tokens and closes
    without abort; prints the tokens read. Each closes as soon as its tokens came (whichever
    stream they came on first), so the server has the rest of the stream to notice. Run as a
    process of its own (python -c): its sockets' memory is not the server's."""
    read, rng = 0, random.Random(seed)
    ctx = zmq.Context()
    try:
        for start in range(0, n, at_once):
            wants: dict[zmq.Socket, int] = {}
            poller = zmq.Poller()
            for i in range(start, min(n, start + at_once)):
                peer = ctx.socket(zmq.DEALER)
                peer.linger, peer.sndtimeo = 0, 10_000
                peer.connect(endpoint)
                peer.send_multipart(encode(message(
                    "generate", 1 + i, prompt=np.array(PROMPTS[i % len(PROMPTS)]),
                    max_tokens=50, temperature=0.0, top_k=0, seed=i)))
                wants[peer] = rng.choice([1, 2])
                poller.register(peer, zmq.POLLIN)
            while wants:
                ready = dict(poller.poll(30_000))
                assert ready, f"no token in 30 s for {len(wants)} client(s)"
                for peer in ready:
                    answer = decode(peer.recv_multipart())
                    assert answer.type == "token", answer
                    read += 1
                    wants[peer] -= 1
                    if not wants[peer]:
                        del wants[peer]
                        poller.unregister(peer)
                        peer.close(linger=0)
    finally:
        ctx.destroy(linger=0)
    print(read)


async def _python(code: str) -> str:
    """What `python -c code` prints, run from the checkout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, _ = await asyncio.wait_for(proc.communicate(), 150)
    assert proc.returncode == 0
    return out.decode()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_clients_that_leave_mid_stream_leave_nothing_behind(checkpoint):
    max_batch = 8

    async def main():
        async with running_server(checkpoint, max_batch=max_batch) as server:
            stale: list[int] = []  # stream ids a worker reports that the front forgot
            on_tokens = server._on_tokens

            def spy(msg):
                stale.extend(h for h in msg["ids"] if h not in server._streams)
                on_tokens(msg)

            server._on_tokens = spy

            async def measure() -> tuple[int, int]:
                await _until("every stream to end", lambda: server.in_flight == 0, 60)
                gc.collect()
                return len(asyncio.all_tasks()), rss_bytes()

            def leave(n: int, seed: int) -> str:
                return (f"from tests.integration.test_serve_faults import leave_mid_stream; "
                        f"leave_mid_stream({server.endpoint!r}, {n}, 50, {seed})")

            # warm-up: 100, then 1000 (the first 1000 grow ZeroMQ's and the allocator's
            # tables by ~1.3 MB, measured); then 1000 more are measured against it
            read = int(await _python(leave(100, 1)))
            read += int(await _python(leave(1000, 2)))
            tasks0, rss0 = await measure()
            dropped0 = server.stats.dropped
            cancelled0 = server.stats.by_reason.get("cancelled", 0)
            read += int(await _python(leave(1000, 3)))
            tasks1, rss1 = await measure()
            stale_after_churn = len(stale)
            # the worker's batch is free: a full batch of new streams runs beside nothing
            # the front forgot (the spy sees every id the worker decodes)
            async with InferenceClient(server.endpoint, timeout=30.0) as client:
                streams = [aiter(client.generate(PROMPTS[i % 4], max_tokens=20,
                                                 temperature=0.0, seed=0))
                           for i in range(max_batch)]
                firsts = [t.token for t in await asyncio.gather(*(anext(s) for s in streams))]
                full = [[f, *(await _finish(s))] for f, s in zip(firsts, streams)]
            return dict(read=read, tasks=(tasks0, tasks1), rss=(rss0, rss1),
                        dropped=server.stats.dropped - dropped0, stats=server.stats,
                        cancelled=server.stats.by_reason.get("cancelled", 0) - cancelled0,
                        by_client=dict(server._by_client), queue=len(server._queue),
                        loads=[r.load for r in server.pool.replicas],
                        full=full, stale=(stale_after_churn, len(stale)))

    r = uvloop.run(main())
    assert r["read"] >= 2100
    assert r["tasks"][1] == r["tasks"][0], r
    assert r["by_client"] == {} and r["queue"] == 0 and r["loads"] == [0], r
    # each client left after a token or two of 50: the server noticed a send that failed
    # and cancelled the stream, rather than decoding it to the end for nobody
    assert r["dropped"] >= 900 and r["cancelled"] >= 900, r
    assert r["stats"].failed == 0
    assert r["stale"] == (0, 0)  # the worker decoded nothing the front had forgotten
    for i, tokens in enumerate(r["full"]):
        assert tokens == _ref(checkpoint, PROMPTS[i % 4], 20)
    # 1000 clients after the warm-up: measured growth 40-100 KB, so a leak of 1 KiB per
    # client (a stream kept with its decoder and request, a route, a queued message) shows
    assert r["rss"][1] - r["rss"][0] < 1 << 20, r["rss"]


# -- CURVE -----------------------------------------------------------------------------------
def _keys(root: Path) -> tuple[Path, Path, Path]:
    """The server's key dir, an authorised client's, and a stranger's (which knows the
    server's public key, but whose own key the server never authorised)."""
    server, client, stranger = root / "serve", root / "client", root / "stranger"
    generate_keypair(server, "serve")
    for d, name in ((client, "client"), (stranger, "stranger")):
        generate_keypair(d, name)
        authorize(d, server / "serve.key", name="127.0.0.1")
    authorize(server, client / "client.key")
    return server, client, stranger


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_with_keys_only_an_authorised_client_gets_through(checkpoint, tmp_path):
    server_keys, client_keys, stranger_keys = _keys(tmp_path / "keys")

    async def main():
        async with running_server(checkpoint, keys=load_node_keys(server_keys)) as server:
            with pytest.raises(ServerUnavailable, match="admit this client's key"):
                async with InferenceClient(server.endpoint, keys=stranger_keys, timeout=1.0):
                    pass
            # raw peers send generate straight away, the stranger's key and plaintext
            stranger = load_node_keys(stranger_keys).keypair
            ctx = zmq.Context()
            try:
                peers = [ctx.socket(zmq.DEALER) for _ in range(2)]
                peers[0].curve_serverkey = load_public_key(server_keys / "serve.key")
                peers[0].curve_publickey = stranger.public
                peers[0].curve_secretkey = stranger.secret
                for peer in peers:
                    peer.linger, peer.sndtimeo = 0, 100
                    peer.connect(server.endpoint)
                    with contextlib.suppress(zmq.Again):  # nothing admitted: its queue fills
                        for i in range(50):
                            peer.send_multipart(encode(message(
                                "generate", i + 1, prompt=np.array(PROMPTS[0]), max_tokens=4,
                                temperature=0.0, top_k=0, seed=0)))
                answered = [await asyncio.to_thread(p.poll, 500) for p in peers]
            finally:
                ctx.destroy(linger=0)
            before = (dataclasses.asdict(server.stats), server.in_flight,
                      server._public.refused)
            async with InferenceClient(server.endpoint, keys=client_keys) as client:
                served = await _greedy(client, PROMPTS[2], 20)
            return answered, before, served, server.stats

    answered, (stats, in_flight, refused), (tokens, done), after = uvloop.run(main())
    assert answered == [0, 0]  # not even an error
    assert stats == {"served": 0, "failed": 0, "refused": 0, "dropped": 0, "by_reason": {}}
    assert in_flight == 0 and refused == 0  # not even garbage got through
    assert tokens == _ref(checkpoint, PROMPTS[2], 20) and done.reason == "length"
    assert after.served == 1


def test_a_server_off_loopback_needs_keys(checkpoint):
    with pytest.raises(ConfigError, match="--keys DIR"):
        InferenceServer(str(checkpoint), "tcp://0.0.0.0:0", signals=False)
    with pytest.raises(ConfigError, match="--keys DIR"):
        InferenceServer(str(checkpoint), "tcp://192.0.2.7:7800", signals=False)


# -- SIGTERM and sd_notify -------------------------------------------------------------------
class ServeProcess:
    """`narun serve --json` on loopback, NOTIFY_SOCKET a datagram socket it binds here."""

    def __init__(self, checkpoint: Path, tmp_path: Path, *args: str) -> None:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = tmp_path / "notify"
        self.notify.bind(str(path))
        self.notify.settimeout(60)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": str(path)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "narun.cli", "serve", str(checkpoint), "--listen",
             "tcp://127.0.0.1:0", "--json", *args], stdout=subprocess.PIPE, env=env,
            cwd=ROOT, text=True)
        self.listening = self.event()
        assert self.listening["event"] == "listening", self.listening

    def event(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        assert line, f"narun serve exited ({self.proc.wait(60)}) without a line"
        return json.loads(line)

    def notified(self) -> str:
        return self.notify.recv(4096).decode()

    def worker_pid(self) -> int:
        [pid] = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)
        self.proc.stdout.close()
        self.notify.close()


@pytest.fixture
def serve_process(checkpoint, tmp_path):
    started: list[ServeProcess] = []

    def start(*args: str, run: Path | None = None) -> ServeProcess:
        started.append(ServeProcess(run or checkpoint, tmp_path, *args))
        return started[-1]

    yield start
    for s in started:
        s.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_finishes_the_streams_in_flight_refuses_new_ones_and_exits_0(
        checkpoint, serve_process):
    n = 40
    svc = serve_process("--max-batch", "4", "--grace", "60")
    assert svc.notified().startswith("READY=1\nSTATUS=serving tiny on tcp://127.0.0.1:")
    worker = svc.worker_pid()

    async def main():
        async with InferenceClient(svc.listening["endpoint"], timeout=30.0) as client:
            streams = [aiter(client.generate(p, max_tokens=n, temperature=0.0, seed=0))
                       for p in PROMPTS[:2]]
            firsts = [(await anext(s)).token for s in streams]
            os.kill(worker, signal.SIGSTOP)  # the streams stay in flight while we look
            try:
                svc.proc.send_signal(signal.SIGTERM)
                stopping = await asyncio.to_thread(svc.notified)
                with pytest.raises(GenerationError) as refused:
                    await _greedy(client, PROMPTS[2], 4)
            finally:
                os.kill(worker, signal.SIGCONT)
            rests = [[t.token async for t in s] for s in streams]
            return stopping, refused.value, firsts, rests

    stopping, refused, firsts, rests = uvloop.run(main())
    assert stopping.startswith("STOPPING=1")
    assert refused.code == "busy" and "stopping" in str(refused)
    for prompt, first, rest in zip(PROMPTS, firsts, rests):
        assert [first, *rest] == _ref(checkpoint, prompt, n)  # all of it: done, length
    assert svc.proc.wait(60) == 0
    stopped = svc.event()
    assert stopped["event"] == "stopped"
    assert (stopped["served"], stopped["failed"], stopped["refused"]) == (2, 0, 1)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_streams_still_running_after_the_grace_end_cancelled(serve_process, tmp_path):
    # streams of 250 tokens, of a model slow enough that they cannot end within the grace:
    # the tiny one's 250 steps take about as long as 0.2 s on this machine
    run = make_checkpoint(tmp_path / "long", block_size=256, n_layer=8, n_embd=256)

    svc = serve_process("--max-batch", "4", "--grace", "0.2", run=run)
    assert svc.notified().startswith("READY=1")

    async def main():
        async with InferenceClient(svc.listening["endpoint"], timeout=30.0) as client:
            streams = [client.generate(p, max_tokens=250, temperature=0.0, seed=0)
                       for p in PROMPTS[:2]]
            its = [aiter(s) for s in streams]
            firsts = [await anext(it) for it in its]
            svc.proc.send_signal(signal.SIGTERM)
            rests = [[t async for t in it] for it in its]
            return [s.done for s in streams], [1 + len(r) for r in rests], firsts

    dones, counts, _ = uvloop.run(main())
    assert svc.notified().startswith("STOPPING=1")
    for done, count in zip(dones, counts):
        assert done.reason == "cancelled" and done.tokens == count < 250
    assert svc.proc.wait(60) == 0
    stopped = svc.event()
    assert stopped["event"] == "stopped" and (stopped["served"], stopped["failed"]) == (2, 0)


# -- a client that stops reading --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_client_that_stops_reading_loses_its_streams_and_others_stream_on(checkpoint,
                                                                            monkeypatch):
    n, per_round = 60 - 5, 32
    # On loopback the kernel's autotuned buffers hold some 17,000 token messages for a
    # client that does not read (measured): a minute of this model's decoding. The server's
    # sockets get a 4 KiB SO_SNDBUF instead, so ZeroMQ's queue (64) fills in one round; the
    # server's code is what runs, only the kernel's buffer is smaller.
    real_open_channel = narun.serve.server.open_channel

    def open_channel(context, kind, **options):
        context.setsockopt(zmq.SNDBUF, 4096)  # the default of the sockets it makes next
        return real_open_channel(context, kind, **options)

    monkeypatch.setattr(narun.serve.server, "open_channel", open_channel)

    async def main():
        async with running_server(checkpoint, max_batch=32, max_queue=64) as server:
            ctx = zmq.Context()
            try:
                sleeper = ctx.socket(zmq.DEALER)  # asks for stream after stream, reads none
                sleeper.linger, sleeper.rcvhwm, sleeper.rcvbuf = 0, 1, 1024
                sleeper.connect(server.endpoint)
                asked = 0

                def ask() -> None:
                    nonlocal asked
                    for _ in range(per_round):
                        asked += 1
                        sleeper.send_multipart(encode(message(
                            "generate", asked, prompt=np.array(PROMPTS[asked % 4]),
                            max_tokens=n, temperature=0.0, top_k=0, seed=0)))

                async with InferenceClient(server.endpoint, timeout=30.0) as client:
                    # what it is sent fills ZeroMQ's queue for it (64 messages) and the
                    # socket buffers, a round at a time, while this client streams on, until
                    # its queue stays full and every new stream of it is dropped at its
                    # first token (and cancelled at the worker, not decoded for nobody)
                    rounds, before = [], server.stats
                    while asked < 10 * per_round:
                        before = dataclasses.replace(server.stats,
                                                     by_reason=dict(server.stats.by_reason))
                        ask()
                        rounds.append(await asyncio.gather(*(_greedy(client, p, n)
                                                             for p in PROMPTS)))
                        await _until("its streams to end", lambda: server.in_flight == 0)
                        if server.stats.dropped - before.dropped == per_round:
                            break
            finally:
                ctx.destroy(linger=0)
            return rounds, before, server.stats

    rounds, before, after = uvloop.run(main())
    assert after.dropped - before.dropped == per_round, (before, after)
    cancelled = after.by_reason.get("cancelled", 0) - before.by_reason.get("cancelled", 0)
    assert cancelled == per_round, (before, after)
    assert after.failed == 0
    for kept in rounds:
        for prompt, (tokens, done) in zip(PROMPTS, kept):
            assert tokens == _ref(checkpoint, prompt, n) and done.reason == "length"
