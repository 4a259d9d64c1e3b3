"""The OpenAI-compatible HTTP endpoint over a real model and engine: the text equals what
GPT.generate gives, streamed or not; stop strings; every refusal's status and message;
keep-alive, pipelining, garbage, bounds and timeouts; a client that leaves cancels its
stream; and the official `openai` package and curl read it unchanged."""

import asyncio
import itertools
import json
import shutil
import socket

import h11
import httpx
import numpy as np
import pytest
import structlog

from narun.data import ByteTokenizer
from narun.serve import Engine
from narun.serve.http import MAX_BODY, MAX_HEAD, _Output, serve_http
from narun.serve.streams import ModelInfo, Request, RequestError, Tokenizer, check_request
from tests.narun.models.test_gpt import CASES, small_gpt

pytestmark = pytest.mark.timeout(60)

CONTEXT = 64
NAME = "tiny-gpt"
PROMPT = "Once upon"


class EngineServer:
    """Test scaffolding: the server interface narun.serve.http builds against (info,
    tokenizer, submit, cancel, accepting) over a real Engine, stepped by an asyncio task.
    `hold_after` pauses the engine once a stream has that many tokens (released by setting
    it to None), so a test can act mid-stream; `fail_after` makes a stream fail there."""

    def __init__(self, model, max_streams=8):
        self.info = ModelInfo(NAME, model.config.vocab_size, CONTEXT, max_tokens=48)
        self.tokenizer = Tokenizer()
        self.accepting = True
        self.engine = Engine(model, max_batch=4, prefill_chunk=16)
        self.max_streams = max_streams
        self.sinks = {}  # handle -> [sink, decoder, tokens so far]
        self.submitted, self.cancelled, self.ended = [], [], {}  # handle -> reason
        self.hold_after = self.fail_after = None
        self.wake = asyncio.Event()
        self.handles = itertools.count(1)
        self.task = asyncio.create_task(self.run())

    def submit(self, req: Request, sink) -> int:
        ids = check_request(req, self.info, self.tokenizer)
        stops = [self.tokenizer.encode(s) for s in req.stop]  # as the server's worker does
        if len(self.sinks) >= self.max_streams:
            raise RequestError("busy", f"{self.max_streams} streams run; retry later")
        handle = next(self.handles)
        self.engine.add(handle, ids, req.max_tokens, req.temperature, req.top_k or None,
                        req.seed, stops)
        self.sinks[handle] = [sink, self.tokenizer.decoder(), 0]
        self.submitted.append(req)
        self.wake.set()
        return handle

    def cancel(self, handle: int) -> None:
        self.cancelled.append(handle)
        if self.engine.cancel(handle):
            self.wake.set()

    def _end(self, handle, reason):
        self.ended[handle] = reason
        return self.sinks.pop(handle)[0]

    async def run(self):
        while True:
            if self.engine.idle or self.hold_after is not None and any(
                    n >= self.hold_after for _, _, n in self.sinks.values()):
                self.wake.clear()
                await self.wake.wait()
                continue
            for out in self.engine.step():
                if out.request_id not in self.sinks:
                    continue
                entry = self.sinks[out.request_id]
                sink, decoder, n = entry
                if out.token is None:
                    self._end(out.request_id, "cancelled").done("cancelled", n, 0.0)
                    continue
                if self.fail_after is not None and n == self.fail_after:
                    self.engine.cancel(out.request_id)
                    self._end(out.request_id, "error").error("worker_died",
                                                             "the worker process died")
                    continue
                entry[2] += 1
                text = decoder.decode(self.tokenizer.token_bytes(out.token))
                if not sink.token(out.index, out.token, out.logprob, text):
                    self.cancel(out.request_id)
                elif out.finished:
                    self._end(out.request_id, out.finished).done(out.finished, n + 1, 0.0)
            await asyncio.sleep(0)  # the sockets' turn between steps

    async def close(self):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture(scope="module")
def model():
    preset, overrides = CASES["gpt2"]
    return small_gpt(preset, block_size=CONTEXT, **overrides)


@pytest.fixture
async def served(model):
    server = EngineServer(model)
    http = await serve_http(server, "127.0.0.1", 0, timeout=1.0)
    port = http.sockets[0].getsockname()[1]
    try:
        yield server, f"http://127.0.0.1:{port}", port
    finally:
        http.close()
        await http.wait_closed()
        await server.close()


def generate_text(model, prompt, n):
    ids = ByteTokenizer().encode(prompt)
    out = model.generate(ids[None], n, temperature=0.0)[0, len(ids):]
    return ByteTokenizer().decode(out), out


async def post(base, body, **kw):
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        return await client.post("/v1/completions", json=body, **kw)


def sse_events(raw: str):
    """The data fields of an SSE body, in order."""
    assert raw.endswith("\n\n"), raw[-40:]
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


def texts(events):
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]
                   if json.loads(e)["choices"])


# ---- completions -------------------------------------------------------------------------

async def test_greedy_text_equals_generate_and_streaming_gives_the_same(served, model):
    server, base, _ = served
    expected, ids = generate_text(model, PROMPT, 30)
    # its last byte begins a character that never ends: decoding must flush it as U+FFFD
    assert ids[-1] >= 0xc0 and expected.endswith("\ufffd")
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 30, "temperature": 0,
            "logprobs": 0}
    r = await post(base, body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["object"] == "text_completion" and doc["model"] == NAME
    assert doc["id"].startswith("cmpl-")
    choice = doc["choices"][0]
    assert choice["text"] == expected and choice["finish_reason"] == "length"
    assert doc["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 30,
                            "total_tokens": len(PROMPT) + 30}
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == 30 and all(x <= 0 for x in lp["token_logprobs"])
    assert lp["tokens"][0] == _token_text(bytes([ids[0]]))
    assert lp["top_logprobs"] is None and lp["text_offset"][0] == 0

    r = await post(base, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert texts(events) == expected
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-2]] == [None] * (len(chunks) - 2)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == doc["usage"]
    streamed = [x for c in chunks[:-2] for x in c["choices"][0]["logprobs"]["token_logprobs"]]
    np.testing.assert_allclose(streamed, lp["token_logprobs"], rtol=1e-12)


async def test_concurrent_streams_each_get_their_own_text(served, model):
    _, base, _ = served
    prompts = ["Once", "upon a", "time", "there", "was", "a"]  # more than the engine's 4 slots

    async def stream(client, prompt):
        body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            return texts(sse_events("".join([t async for t in r.aiter_text()])))

    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        got = await asyncio.gather(*(stream(client, p) for p in prompts))
    assert got == [generate_text(model, p, 10)[0] for p in prompts]


def _token_text(raw):
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


async def test_token_id_prompts_and_seeded_sampling(served, model):
    server, base, _ = served
    ids = [5, 200, 17, 99]
    body = {"prompt": ids, "max_tokens": 12, "temperature": 0.8, "top_k": 20, "seed": 7}
    a, b = (await post(base, body)).json(), (await post(base, body)).json()
    ref = model.generate(np.asarray(ids)[None], 12, temperature=0.8, top_k=20, seed=7)[0, 4:]
    assert a["choices"][0]["text"] == ByteTokenizer().decode(ref)
    assert b["choices"][0]["text"] == a["choices"][0]["text"]
    assert server.submitted[0].top_k == 20 and server.submitted[0].seed == 7
    # no seed: one is drawn per request; OpenAI's default temperature is 1
    await post(base, {"prompt": ids, "max_tokens": 2})
    assert server.submitted[-1].temperature == 1.0 and server.submitted[-1].seed >= 0


async def test_stop_strings_end_the_text_and_are_not_in_it(served, model):
    server, base, _ = served
    full, _ = generate_text(model, PROMPT, 30)
    # a stop of two characters from the middle of the greedy text: split across tokens
    at = next(i for i in range(3, 25) if full[i:i + 2].isprintable() and
              len(full[i:i + 2].encode()) == 2 and full.find(full[i:i + 2]) == i)
    stop = full[at:at + 2]
    for stream in (False, True):
        body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stream": stream,
                "stop": ["\x00never", stop]}
        r = await post(base, body)
        if stream:
            events = sse_events(r.text)
            text, reason = texts(events), json.loads(events[-2])["choices"][0]["finish_reason"]
        else:
            text, reason = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        assert (text, reason) == (full[:at], "stop"), stream
    assert list(server.ended.values())[-2:] == ["stop", "stop"]  # the engine stopped too


async def test_text_that_may_begin_a_stop_string_waits_until_it_cannot(served, model):
    _, base, _ = served
    full, _ = generate_text(model, PROMPT, 12)
    assert full.count("O") >= 2 and full.endswith("O")  # each O is held, the last to the end
    r = await post(base, {"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                          "stop": "O\x01", "stream": True})
    events = sse_events(r.text)
    pieces = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert "".join(pieces) == full and "O" not in pieces[:-1] and pieces[-1] == "O"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_the_text_of_byte_tokens_with_a_multibyte_stop():
    pieces = []
    out = _Output(Tokenizer(), ("é!", "xyz"), lambda text, i: pieces.append(text) or True)
    for i, t in enumerate(ByteTokenizer().encode("ab\u00e9x\u00e9!tail")):
        out.token(i, int(t), -0.5, "")
    # é arrives as two bytes and is held (it may begin "é!") until x, itself held (it may
    # begin "xyz") until the next é; then "!" ends the text before "é!"
    assert pieces == ["a", "b", "", "", "\u00e9", "", "x", ""]
    assert out.ended.is_set() and out.reason == "stop" and len(out.tokens) == 8
    out.done("stop", 8, 0.0)
    assert "".join(out.pieces) + out.tail == "ab\u00e9x" and out.tail == ""
    assert out.offsets == [0, 1, 2, 2, 3, 4, 4, 5]


def test_long_stop_strings_cost_each_token_little():
    # _release tried every prefix length of every stop string at each token: with the four
    # 250 000-character stops a 1 MiB body allows, about a second per token, spent on the
    # event loop that serves every other client. Only prefixes as long as the held text
    # can match, and held text is at most what was generated.
    import time

    out = _Output(Tokenizer(), tuple(c * 250_000 for c in "abcd"))
    start = time.perf_counter()
    for i, t in enumerate(ByteTokenizer().encode("abcdabcdabcdabcd")):
        out.token(i, int(t), -0.5, "")
    assert time.perf_counter() - start < 1.0
    assert out.pieces == ["", "a", "b", "c"] + ["d", "a", "b", "c"] * 3  # nothing lost


# ---- refusals ----------------------------------------------------------------------------

BAD = [
    ({"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ({"prompt": [[1, 2]]}, 400, "one prompt per request"),
    ({"prompt": 3}, 400, "prompt must be a string or a list of token ids"),
    ({"prompt": [1, 300]}, 400, "token id 300, outside the model's vocabulary"),
    ({"prompt": ""}, 400, "the prompt is empty"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens must be an int >= 1"),
    ({"prompt": "a", "max_tokens": 49}, 400, "above this server's cap of 48"),
    ({"prompt": "x" * 60, "max_tokens": 10}, 400, "ask for at most 4 tokens"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature must be a finite number >= 0"),
    ({"prompt": "a", "temperature": 10 ** 400}, 400,
     "temperature must be a finite number >= 0"),
    ({"prompt": "a", "top_k": 2 ** 64}, 400, "top_k must be an int >= 0 (0: no limit) and at "
                                             "most 18446744073709551615"),
    ({"prompt": "a", "seed": 2 ** 64}, 400, "seed must be an int >= 0 and at most"),
    ({"prompt": "a", "top_p": 0.9}, 400, "top_p=0.9 is not supported"),
    ({"prompt": "a", "top_k": "5"}, 400, "top_k must be an int >= 0"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 strings"),
    ({"prompt": "a", "stop": [""]}, 400, "stop[0] must be a non-empty string"),
    ({"prompt": "a", "stop": 5}, 400, "stop must be a string or a list of at most 4"),
    ({"prompt": "a", "stop": True}, 400, "stop must be a string or a list of at most 4"),
    ({"prompt": "a", "n": 2}, 400, "n=2 is not supported; leave it out or send 1"),
    ({"prompt": "a", "echo": True}, 400, "echo=True is not supported"),
    ({"prompt": "a", "best_of": 3}, 400, "best_of=3 is not supported"),
    ({"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty=0.5 is not supported"),
    ({"prompt": "a", "suffix": "x"}, 400, "suffix='x' is not supported"),
    ({"prompt": "a", "logprobs": -1}, 400, "logprobs must be null or an int >= 0"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream must be true or false"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400,
     "stream_options is only for stream: true"),
    ({"prompt": "a", "temprature": 1}, 400, "unknown field 'temprature'"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "this server serves 'tiny-gpt'"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD, ids=[m for _, _, m in BAD])
async def test_bad_requests_get_openai_errors_that_say_what_to_fix(served, body, status,
                                                                   message):
    server, base, _ = served
    r = await post(base, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if status == 404:
        assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert server.submitted == []  # refused before the engine saw it


def test_the_socket_s_requests_have_the_http_bound_on_stop_strings():
    # the ZeroMQ front passes a generate's stop list to check_request as it came: up to the
    # wire's 65 536 strings, each compared with the last tokens at every step of its worker
    info = ModelInfo(NAME, 256, CONTEXT, max_tokens=48)
    check_request(Request(text="a", stop=("x",) * 4), info, Tokenizer())
    with pytest.raises(RequestError, match="stop holds 5 strings; at most 4 are accepted"):
        check_request(Request(text="a", stop=("x",) * 5), info, Tokenizer())


async def test_json_nested_too_deep_is_a_400_not_a_server_bug(served):
    _, base, _ = served
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        r = await client.post("/v1/completions", content=b"[" * 200_000 + b"]" * 200_000)
    assert r.status_code == 400, r.text
    assert "not valid JSON" in r.json()["error"]["message"]


async def test_accepted_defaults_of_openai_clients(served):
    _, base, _ = served
    r = await post(base, {"prompt": "a", "max_tokens": 2, "user": "me", "n": 1, "best_of": 1,
                          "echo": False, "suffix": None, "presence_penalty": 0,
                          "frequency_penalty": 0.0, "top_p": 1, "logprobs": None,
                          "stop": None, "seed": None, "model": NAME})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None


async def test_not_json_busy_draining_paths_and_methods(served):
    server, base, _ = served
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        r = await client.post("/v1/completions", content=b"{nope")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = await client.post("/v1/completions", content=b"[1]")
        assert r.status_code == 400 and "must be a JSON object" in r.json()["error"]["message"]
        r = await client.get("/v1/chat/completions")
        assert r.status_code == 404 and "POST /v1/completions" in r.json()["error"]["message"]
        r = await client.get("/v1/completions")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert "/v1/completions takes POST, not GET" in r.json()["error"]["message"]
        server.max_streams = 0
        r = await client.post("/v1/completions", json={"prompt": "a"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert "retry later" in r.json()["error"]["message"]


async def test_health_models_and_draining(served):
    server, base, _ = served
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        r = await client.get("/health")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list"
        assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [
            (NAME, "model", "narun")]
        server.accepting = False
        r = await client.get("/health")
        assert (r.status_code, r.json()) == (503, {"status": "draining"})
        r = await client.post("/v1/completions", json={"prompt": "a"})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert r.headers["connection"] == "close"
    assert server.submitted == []


async def test_a_worker_failure_is_a_500_or_an_error_event(served):
    server, base, _ = served
    server.fail_after = 3
    r = await post(base, {"prompt": "a", "max_tokens": 10})
    assert r.status_code == 500
    assert r.json()["error"] == {"message": "the completion failed: the worker process died",
                                 "type": "server_error", "param": None, "code": "worker_died"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as client, \
            client.stream("POST", "/v1/completions",
                          json={"prompt": "a", "max_tokens": 10, "stream": True,
                                "logprobs": 0}) as r:  # an event for each token
        events = sse_events("".join([t async for t in r.aiter_text()]))
    assert json.loads(events[-1])["error"]["code"] == "worker_died"
    assert len(events) == 4 and "[DONE]" not in events  # 3 tokens, then the error


async def test_a_bug_in_the_server_is_a_500_and_a_log_entry(served, monkeypatch):
    server, base, _ = served

    def broken(req, sink):
        raise RuntimeError("bug")
    monkeypatch.setattr(server, "submit", broken)
    with structlog.testing.capture_logs() as logs:
        r = await post(base, {"prompt": "a"})
    assert r.status_code == 500 and "a bug" in r.json()["error"]["message"]
    assert [(e["event"], e["target"], e["log_level"]) for e in logs] == [
        ("http request failed", "/v1/completions", "error")]


# ---- connections -------------------------------------------------------------------------

def request_bytes(body):
    data = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data))


async def until(condition):
    while not condition():  # the test's timeout bounds this
        await asyncio.sleep(0.01)


def connection_tasks():
    return [t for t in asyncio.all_tasks() if "serve_http" in t.get_coro().__qualname__]


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_that_leaves_mid_stream_cancels_it(served, stream):
    server, base, port = served
    server.hold_after = 2  # the engine waits with the stream two tokens in
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # logprobs: every token makes an event, even one that is half a character
    writer.write(request_bytes({"prompt": "a", "max_tokens": 40, "stream": stream,
                                "logprobs": 0}))
    if stream:
        head = await reader.readuntil(b"data: ")
        assert head.startswith(b"HTTP/1.1 200 ")
    await until(lambda: server.sinks and server.sinks[1][2] == 2)
    assert server.cancelled == [] and len(connection_tasks()) == 1
    writer.close()
    await writer.wait_closed()
    await until(lambda: server.cancelled)
    assert server.cancelled == [1]
    server.hold_after = None
    server.wake.set()
    await until(lambda: 1 in server.ended)
    assert server.ended == {1: "cancelled"} and server.sinks == {}
    await until(lambda: not connection_tasks())  # nothing left of the connection


async def test_a_client_that_stops_reading_has_its_stream_cancelled(model):
    server = EngineServer(model)
    # chunks of ~20 KB each, small socket buffers: the transport's own buffer fills soon
    server.info = ModelInfo("m" * 20000, 256, CONTEXT, max_tokens=48)
    http = await serve_http(server, "127.0.0.1", 0, max_buffered=4096)
    http.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted inherit
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, http.sockets[0].getsockname())
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(request_bytes({"prompt": "a", "max_tokens": 48, "stream": True,
                                    "logprobs": 0}))
        await until(lambda: 1 in server.ended)  # and never read
        assert server.cancelled == [1] and server.ended == {1: "cancelled"}
        await until(lambda: not connection_tasks())  # dropped, not waiting on the client
    finally:
        writer.close()
        http.close()
        await http.wait_closed()
        await server.close()


async def test_keep_alive_and_pipelined_requests_share_one_connection(served, model):
    server, base, port = served
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        ports = set()
        for _ in range(2):
            r = await client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3})
            assert r.status_code == 200
            ports.add(r.extensions["network_stream"].get_extra_info("client_addr")[1])
        assert len(ports) == 1
    # pipelined: a completion, and a second request sent while it runs (the connection
    # reads it meanwhile, watching for the client leaving): answered in order
    server.hold_after = 2
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes({"prompt": "ab", "max_tokens": 4, "temperature": 0}))
    await until(lambda: server.sinks and next(iter(server.sinks.values()))[2] == 2)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.05)  # not a check: lets the server read it before the reply
    server.hold_after = None
    server.wake.set()
    client = h11.Connection(h11.CLIENT)  # to read the replies
    bodies = []
    for method, target in (("POST", "/v1/completions"), ("GET", "/health")):
        client.send(h11.Request(method=method, target=target, headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        body = b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        bodies.append(json.loads(body))
        client.start_next_cycle()
    assert bodies[0]["choices"][0]["text"] == generate_text(model, "ab", 4)[0]
    assert bodies[1] == {"status": "ok"}
    writer.close()


async def raw(port, data):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    reply = await reader.read()  # to the server's close
    writer.close()
    return reply


async def test_garbage_gets_400_and_the_server_goes_on(served):
    _, base, port = served
    reply = await raw(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"malformed HTTP request" in reply
    r = await post(base, {"prompt": "ab", "max_tokens": 3})
    assert r.status_code == 200


async def test_bounds_on_head_body_and_time(served):
    server, base, port = served
    reply = await raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_HEAD
                      + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")
    r = await post(base, None, content=b"{" + b" " * MAX_BODY + b"}")
    assert r.status_code == 413 and "at most 1048576" in r.json()["error"]["message"]

    async def chunks():
        for _ in range(MAX_BODY // 65536 + 1):
            yield b" " * 65536
    r = await post(base, None, content=chunks())  # chunked: no length to check up front
    assert r.status_code == 413 and "over 1048576" in r.json()["error"]["message"]
    # a client that sends half a request is closed after the timeout, without a reply
    assert await raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n") == b""
    assert server.submitted == []


async def test_expect_100_continue(served):
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps({"prompt": "ab", "max_tokens": 2}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data))
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 \r\n\r\n"
    writer.write(data)
    assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200 ")
    writer.close()
    # too big: refused before the client sends it
    reply = await raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: "
                            b"100-continue\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
    assert reply.startswith(b"HTTP/1.1 413 ") and b" 100 " not in reply


# ---- real clients ------------------------------------------------------------------------

async def test_the_openai_package_streams_the_same_text(served, model):
    openai = pytest.importorskip("openai")
    _, base, _ = served
    expected, _ = generate_text(model, PROMPT, 16)
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    try:
        stream = await client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16,
                                                 temperature=0, stream=True)
        pieces = [c.choices[0].text async for c in stream]
        assert "".join(pieces) == expected
        done = await client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16,
                                               temperature=0)
        assert done.choices[0].text == expected and done.usage.completion_tokens == 16
        assert [m.id async for m in client.models.list()] == [NAME]
        with pytest.raises(openai.NotFoundError, match="this server serves"):
            await client.completions.create(model="gpt-4", prompt=PROMPT)
    finally:
        await client.close()


async def test_curl_streams_the_same_text(served, model):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    _, base, _ = served
    expected, _ = generate_text(model, PROMPT, 16)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True})
    proc = await asyncio.create_subprocess_exec(
        curl, "-sS", "-N", "-H", "Content-Type: application/json", "-d", body,
        base + "/v1/completions", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    events = sse_events(out.decode())
    assert events[-1] == "[DONE]" and texts(events) == expected
