"""narun serve end to end: real worker processes, real sockets, tokens compared with what
one process's GPT.generate makes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

from narun.client import GenerationError, InferenceClient
from narun.data import ByteTokenizer
from tests.integration.serving import make_checkpoint, reference_tokens, running_server

pytestmark = pytest.mark.timeout(120)

PROMPTS = [[72, 101, 108, 108, 111], [84, 104, 101, 32], list(range(60, 80)), [10]]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "gpt", block_size=64)


async def collect(client, prompt, **kw):
    stream = client.generate(prompt, **kw)
    toks = [t async for t in stream]
    return toks, stream.done


async def test_greedy_tokens_alone_and_batched_equal_one_process_generate(run):
    want = [reference_tokens(run, p, 24, temperature=0.0) for p in PROMPTS]
    async with running_server(run, max_batch=8) as server, \
            InferenceClient(server.endpoint) as client:
        alone = [await collect(client, p, max_tokens=24) for p in PROMPTS]
        together = await asyncio.gather(*(collect(client, p, max_tokens=24)
                                          for p in PROMPTS * 3))
    for (toks, done), w in zip(alone + list(together), want * 4):
        assert [t.token for t in toks] == w
        assert [t.index for t in toks] == list(range(24))
        assert done.reason == "length" and done.tokens == 24 and done.seconds > 0
        assert all(t.logprob <= 0 for t in toks)


async def test_sampled_tokens_follow_the_request_s_seed_whatever_else_runs(run):
    want = reference_tokens(run, PROMPTS[0], 20, temperature=0.9, top_k=20, seed=7)
    async with running_server(run, max_batch=8) as server, \
            InferenceClient(server.endpoint) as client:
        runs = await asyncio.gather(
            collect(client, PROMPTS[0], max_tokens=20, temperature=0.9, top_k=20, seed=7),
            *(collect(client, p, max_tokens=30, temperature=1.0, seed=i)
              for i, p in enumerate(PROMPTS)),
            collect(client, PROMPTS[0], max_tokens=20, temperature=0.9, top_k=20, seed=7))
        other = await collect(client, PROMPTS[0], max_tokens=20, temperature=0.9, top_k=20,
                              seed=8)
    assert [t.token for t in runs[0][0]] == want
    assert [t.token for t in runs[-1][0]] == want
    assert [t.token for t in other[0]] != want


async def test_a_text_prompt_and_the_streamed_text_are_the_model_s_bytes(run):
    tok = ByteTokenizer()
    prompt = "Héllo, wörld"  # multi-byte characters: pieces complete across tokens
    want = reference_tokens(run, tok.encode(prompt).tolist(), 30, temperature=0.0)
    async with running_server(run) as server, InferenceClient(server.endpoint) as client:
        toks, done = await collect(client, prompt, max_tokens=30)
        text, done2 = await client.complete(prompt, max_tokens=30)
    assert [t.token for t in toks] == want
    whole = tok.decode_bytes(np.asarray(want)).decode("utf-8", errors="replace")
    # a trailing incomplete character is not text yet
    assert "".join(t.text for t in toks) == text
    assert whole.startswith(text) and len(whole) - len(text) <= 1
    assert done == done2.__class__(done.reason, done.tokens, done.seconds)


async def test_a_stop_string_ends_the_stream_after_its_tokens(run):
    want = reference_tokens(run, PROMPTS[2], 40, temperature=0.0)
    # the first two ASCII tokens in a row: a stop string that first occurs there
    end = next(i for i in range(1, 40) if want[i - 1] < 128 and want[i] < 128)
    stop = bytes(want[end - 1:end + 1]).decode()
    async with running_server(run) as server, InferenceClient(server.endpoint) as client:
        toks, done = await collect(client, PROMPTS[2], max_tokens=40, stop=[stop, "\x00\x01"])
        _, unstopped = await collect(client, PROMPTS[2], max_tokens=40, stop=["\x00\x01"])
    assert done.reason == "stop" and unstopped.reason == "length"
    assert [t.token for t in toks] == want[:end + 1]


async def test_aborting_a_stream_ends_it_cancelled_and_frees_its_slot(run):
    async with running_server(run, max_batch=1, max_queue=4) as server, \
            InferenceClient(server.endpoint) as client:
        stream = client.generate(PROMPTS[0], max_tokens=50)
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break  # leaving the loop aborts it on the server
        for _ in range(200):
            if server.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert server.in_flight == 0 and server.stats.by_reason.get("cancelled") == 1
        # the one slot is free again: a new request runs to its end
        toks, done = await collect(client, PROMPTS[1], max_tokens=5)
        assert done.reason == "length" and len(toks) == 5


BAD_REQUESTS = [
    (list(range(64)), {"max_tokens": 1}, "context is 64"),
    (list(range(40)), {"max_tokens": 30}, "beyond the model's context"),
    ([1, 2, 3], {"max_tokens": 40}, "above this server's cap of 32"),
    ([1, 256, 3], {"max_tokens": 4}, "token id 256, outside"),
    ([1, -1], {"max_tokens": 4}, "token id -1"),
    ([], {"max_tokens": 4}, "prompt is empty"),
    ([1, 2], {"max_tokens": 0}, "max_tokens must be an int >= 1"),
    ([1, 2], {"max_tokens": 4, "temperature": -1.0}, "temperature must be"),
    ([1, 2], {"max_tokens": 4, "top_k": -2}, "top_k must be"),
    ([1, 2], {"max_tokens": 4, "stop": [""]}, "stop[0] must be a non-empty string"),
]


async def test_requests_the_model_cannot_run_get_a_named_error(run):
    async with running_server(run, max_tokens=32) as server, \
            InferenceClient(server.endpoint) as client:
        for i, (prompt, options, words) in enumerate(BAD_REQUESTS):
            with pytest.raises(GenerationError) as err:
                await collect(client, prompt, **options)
            assert err.value.code == "invalid" and words in str(err.value), options
            assert server.stats.refused == i + 1 and server.in_flight == 0
        toks, _ = await collect(client, [1, 2], max_tokens=3)  # and it keeps serving
        assert len(toks) == 3


async def test_a_full_queue_answers_busy_and_queues_nothing_beyond_it(run):
    async with running_server(run, max_batch=1, max_queue=1) as server, \
            InferenceClient(server.endpoint) as client:
        first = asyncio.create_task(collect(client, PROMPTS[0], max_tokens=40))
        while server.in_flight < 1:
            await asyncio.sleep(0.005)
        second = asyncio.create_task(collect(client, PROMPTS[1], max_tokens=5))
        while server.in_flight < 2:
            await asyncio.sleep(0.005)
        with pytest.raises(GenerationError) as err:
            await collect(client, PROMPTS[2], max_tokens=5)
        assert err.value.code == "busy" and "--max-queue" in str(err.value)
        (t1, d1), (t2, d2) = await first, await second
        assert (d1.reason, len(t1), d2.reason, len(t2)) == ("length", 40, "length", 5)


async def test_two_replicas_share_the_streams_and_agree_with_one_process(run):
    want = [reference_tokens(run, p, 16, temperature=0.0) for p in PROMPTS]
    async with running_server(run, replicas=2, max_batch=2) as server, \
            InferenceClient(server.endpoint) as client:
        results = await asyncio.gather(*(collect(client, p, max_tokens=16)
                                         for p in PROMPTS * 2))
        loads = [r.starts for r in server.pool.replicas]
    assert [[t.token for t in toks] for toks, _ in results] == want * 2
    assert loads == [1, 1]


def test_narun_generate_server_streams_the_text_to_the_terminal(run, tmp_path):
    want = reference_tokens(run, ByteTokenizer().encode("The ").tolist(), 20,
                            temperature=0.0)
    server = subprocess.Popen(
        [sys.executable, "-m", "narun.cli", "serve", str(run), "--listen",
         "tcp://127.0.0.1:0", "--json"], stdout=subprocess.PIPE, text=True)
    try:
        event = json.loads(server.stdout.readline())
        assert event["event"] == "listening" and event["model"] == "gpt"
        out = subprocess.run(
            [sys.executable, "-m", "narun.cli", "generate", "--server", event["endpoint"],
             "The ", "--max-new-tokens", "20", "--temperature", "0"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        text = ByteTokenizer().decode_bytes(np.asarray(want)).decode("utf-8", "replace")
        assert out.stdout.startswith("The " + text.rstrip("\ufffd")[:10])
        bad = subprocess.run(
            [sys.executable, "-m", "narun.cli", "generate", "--server", event["endpoint"],
             "x" * 80, "--max-new-tokens", "5"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "context is 64" in bad.stderr
    finally:
        server.terminate()
        assert server.wait(30) == 0
    assert json.loads(server.stdout.read().splitlines()[-1])["event"] == "stopped"


@pytest.mark.parametrize("args, words", [
    ([], "name a checkpoint (a run directory) or a server"),
    (["runs/x", "hi", "--stop", "."], "--stop and --keys need --server"),
    (["a", "b", "--server", "tcp://127.0.0.1:9"], "takes the prompt alone"),
])
def test_narun_generate_says_what_is_wrong_with_its_arguments(args, words):
    out = subprocess.run([sys.executable, "-m", "narun.cli", "generate", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and words in out.stderr, out.stderr


@pytest.mark.parametrize("args, words", [
    (["--device", "mps"], "--device mps: narun serve runs on cpu or cuda:N"),
    (["--listen", "tcp://0.0.0.0:7899"], "needs CURVE keys"),
    (["--max-tokens", "64"], "--max-tokens: expected 1 .. 63"),
    (["--max-batch", "0"], "--max-batch: expected an int >= 1"),
])
def test_narun_serve_refuses_what_it_cannot_do_before_starting_workers(run, args, words):
    out = subprocess.run([sys.executable, "-m", "narun.cli", "serve", str(run), *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and words in out.stderr, out.stderr
    assert "worker" not in out.stderr


def test_narun_serve_names_a_device_this_machine_lacks(run):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy imports here: cuda:0 may exist")
    except ImportError:
        pass
    out = subprocess.run([sys.executable, "-m", "narun.cli", "serve", str(run), "--device",
                          "cuda:0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--device cuda:0" in out.stderr and "CuPy" in out.stderr


async def test_the_http_endpoint_serves_the_same_engine_as_the_socket(run):
    import httpx
    import openai

    tok = ByteTokenizer()
    want = reference_tokens(run, tok.encode("The ").tolist(), 20, temperature=0.0)
    async with running_server(run, http="127.0.0.1:0") as server, \
            InferenceClient(server.endpoint) as client:
        zmq_text, _ = await client.complete("The ", max_tokens=20)
        async with httpx.AsyncClient(base_url=server.http_address, timeout=30) as http:
            health = await http.get("/health")
            models = (await http.get("/v1/models")).json()
            plain = (await http.post("/v1/completions", json={
                "model": "gpt", "prompt": "The ", "max_tokens": 20,
                "temperature": 0})).json()
            chunks = []
            async with http.stream("POST", "/v1/completions", json={
                    "prompt": "The ", "max_tokens": 20, "temperature": 0,
                    "stream": True}) as sse:
                async for line in sse.aiter_lines():
                    if line.startswith("data: "):
                        chunks.append(line[6:])
        oa = openai.AsyncOpenAI(base_url=server.http_address + "/v1", api_key="unused")
        streamed = [c.choices[0].text async for c in await oa.completions.create(
            model="gpt", prompt="The ", max_tokens=20, temperature=0, stream=True)]
        await oa.close()
    text = tok.decode_bytes(np.asarray(want)).decode("utf-8", errors="replace")
    assert health.status_code == 200 and models["data"][0]["id"] == "gpt"
    assert plain["choices"][0]["text"] == text and plain["usage"]["completion_tokens"] == 20
    assert chunks[-1] == "[DONE]"
    assert "".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1]
                   if json.loads(c)["choices"]) == text
    assert "".join(streamed) == text
    assert text.startswith(zmq_text)
