"""narun serve at its edges, over real workers: ints past the wire's range, text no
encoder takes, --max-queue 0, a vocabulary the tokenizer lacks, a server that fails with
streams queued."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from narun.serve.streams import Request
from tests.integration.serving import make_checkpoint, running_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "gpt", block_size=64)


@pytest.mark.parametrize("field", ["seed", "top_k"])
async def test_an_int_beyond_the_wire_range_is_a_400_and_leaves_no_stream(run, field):
    async with running_server(run, http="127.0.0.1:0") as server:
        async with httpx.AsyncClient(base_url=server.http_address, timeout=30) as http:
            r = await http.post("/v1/completions", json={
                "prompt": "The ", "max_tokens": 4, "temperature": 0.5, field: 2 ** 64})
            ok = await http.post("/v1/completions", json={
                "prompt": "The ", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 400, r.text
        assert field in r.json()["error"]["message"]
        assert ok.status_code == 200
        assert server.in_flight == 0


async def test_a_stream_in_flight_at_sigterm_gets_its_whole_reply(run):
    # A stream that ends in the drain's last step used to lose its reply: the endpoint's
    # wait_closed cancelled its connection before the connection's task woke to write it.
    lines = []
    async with running_server(run, http="127.0.0.1:0", max_batch=4) as server, \
            httpx.AsyncClient(base_url=server.http_address, timeout=30) as http, \
            http.stream("POST", "/v1/completions", json={
                "prompt": "The ", "max_tokens": 48, "temperature": 0, "stream": True}) as sse:
        async for line in sse.aiter_lines():
            if line.startswith("data: "):
                if not lines:
                    server.stop()  # drain while this stream runs
                lines.append(line[6:])
    assert lines[-1] == "[DONE]", lines[-3:]
    assert json.loads(lines[-2])["choices"][0]["finish_reason"] == "length"


async def test_a_stop_string_with_a_lone_surrogate_is_a_400_and_leaves_no_stream(run):
    # JSON's "\ud800" escape decodes to a str that is not UTF-8: the generate's msgpack
    # header raised on it in dispatch, a 500 and a stream left behind that the SIGTERM
    # drain then crashed on
    async with running_server(run, http="127.0.0.1:0") as server:
        async with httpx.AsyncClient(base_url=server.http_address, timeout=30) as http:
            r = await http.post("/v1/completions", content=json.dumps(
                {"prompt": "a", "max_tokens": 4, "stop": ["\ud800"]}).encode())
        assert r.status_code == 400, r.text
        assert "stop[0] is not valid Unicode" in r.json()["error"]["message"]
        assert server.in_flight == 0


async def test_a_request_that_cannot_be_sent_to_a_worker_fails_and_is_forgotten(
        run, monkeypatch):
    # whatever check_request misses and the wire refuses must end the stream, not leak it
    import narun.serve.server as server_module

    checked = server_module.check_request
    monkeypatch.setattr(server_module, "check_request",
                        lambda req, info, tok: checked(
                            Request(text=req.text, max_tokens=req.max_tokens), info, tok))
    async with running_server(run, http="127.0.0.1:0") as server:
        async with httpx.AsyncClient(base_url=server.http_address, timeout=30) as http:
            r = await http.post("/v1/completions", json={
                "prompt": "a", "max_tokens": 4, "seed": 2 ** 64})
        assert r.status_code == 500, r.text
        assert "cannot be sent to a worker" in r.json()["error"]["message"]
        assert server.in_flight == 0


async def test_max_queue_0_runs_requests_that_find_a_free_slot(run):
    # --max-queue 0 is accepted (no request waits), but submit compared the queue's length
    # with the bound before looking for a free slot: 0 >= 0 refused every request as busy
    from narun.client import GenerationError, InferenceClient

    async with running_server(run, max_batch=1, max_queue=0) as server, \
            InferenceClient(server.endpoint) as client:
        first = client.generate([72, 101], max_tokens=30)
        it = aiter(first)
        await anext(it)  # running: the one slot is taken
        with pytest.raises(GenerationError) as err:
            await client.complete([84], max_tokens=2)
        assert err.value.code == "busy"
        rest = [t async for t in it]
        assert len(rest) == 29 and first.done.reason == "length"
        text, done = await client.complete([84], max_tokens=2)
        assert done.reason == "length" and server.in_flight == 0


def test_a_model_whose_vocabulary_is_not_the_byte_tokenizer_s_is_refused(tmp_path):
    # The server decodes every token with the 256-entry byte tokenizer: a model with a
    # larger vocabulary (gpt2-small's 50257) generated ids past it, token_bytes raised
    # IndexError in the workers' message loop, and the whole server stopped.
    from narun.errors import ConfigError
    from narun.serve.server import InferenceServer

    run = make_checkpoint(tmp_path / "gpt", block_size=64, vocab_size=512)
    with pytest.raises(ConfigError, match="vocabulary of 512"):
        InferenceServer(str(run), "tcp://127.0.0.1:0", signals=False)


async def test_a_server_that_fails_ends_its_queued_streams_with_an_error(run):
    # The last replica died with the restart budget spent: the server stops with
    # ReplicasLost. Its running stream got an error, but one waiting in the queue got
    # nothing, and its client waited for tokens until its own timeout.
    from narun.client import GenerationError, InferenceClient
    from narun.serve.pool import ReplicasLost

    errors = []

    async def outcome(coro):
        try:
            await asyncio.wait_for(coro, 10)
        except GenerationError as exc:
            errors.append((exc.code, str(exc)))
        except Exception as exc:  # noqa: BLE001 - the test reports what it was
            errors.append((type(exc).__name__, str(exc)))

    async def drain(stream):
        async for _ in stream:
            pass

    with pytest.raises(ReplicasLost):
        async with running_server(run, max_batch=1, max_restarts=0) as server, \
                InferenceClient(server.endpoint, timeout=20) as client:
            running = client.generate([72, 101], max_tokens=60)
            it = aiter(running)
            await anext(it)
            queued = asyncio.create_task(outcome(client.complete([84], max_tokens=5)))
            while server.in_flight < 2:
                await asyncio.sleep(0.005)
            server.pool.replicas[0].proc.kill()
            await outcome(drain(it))
            await queued
    assert [code for code, _ in errors] == ["internal", "internal"], errors
    assert "restart budget is spent" in errors[1][1]
