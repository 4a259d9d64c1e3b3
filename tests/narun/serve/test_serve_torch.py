"""scripts/serve_torch.py, the PyTorch baseline of scripts/bench_serve.py: it is the same
model as narun's GPT (its greedy tokens and their logprobs are narun's), and its server
streams them over narun's protocol one request at a time, refusing what it cannot do; and
the bench's figures from the load generator's records."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
zmq = pytest.importorskip("zmq")

from narun.checkpoint import save_checkpoint  # noqa: E402
from narun.config import load_config, to_dict  # noqa: E402
from narun.models import build_from_config  # noqa: E402
from protocol import decode, encode, message  # noqa: E402
from tests.narun.models.test_gpt import small_gpt  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts"))
serve_torch = pytest.importorskip("serve_torch")

BLOCK = 16  # small_gpt's block_size
CASES = {"gpt2": {}, "gpt2-untied": {"tie_weights": False}, "gpt2-nobias": {"bias": False}}


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_and_logprobs_equal_narun_generate(case, dtype):
    model = small_gpt("gpt2-tiny", dtype=dtype, **CASES[case])
    twin = serve_torch.TorchGPT.from_narun(model)
    assert twin.wte.weight.dtype == torch.from_numpy(np.zeros(1, dtype)).dtype
    rng = np.random.default_rng(3)
    for length in (1, 5, 9, BLOCK):
        prompt = rng.integers(0, 256, length)
        n_new = BLOCK - length + 1  # the last token fed back fills the context exactly
        expected = model.generate(prompt[None], n_new, temperature=0.0)[0]
        got = list(twin.greedy(prompt, n_new))
        tokens = [t for t, _ in got]
        assert tokens == expected[length:].tolist(), (case, length)
        # each logprob is the token's under narun's logits at the position it was chosen at
        logits = model(expected[None, :-1]).numpy()[0].astype(np.float64)
        want = log_softmax(logits)[np.arange(length - 1, BLOCK), tokens]
        tol = 1e-9 if dtype == np.float64 else 1e-4
        np.testing.assert_allclose([lp for _, lp in got], want, rtol=tol, atol=tol)


def test_refuses_models_it_does_not_rebuild():
    model = small_gpt("gpt-modern-tiny")
    with pytest.raises(Exception, match="GPT-2 variant"):
        serve_torch.TorchGPT.from_narun(model)


# ---- the server, over a real socket ---------------------------------------------------------

def quick_checkpoint(root: Path):
    """A small quickstart-shaped GPT saved as `narun train` saves it, and the model."""
    cfg = load_config(ROOT / "configs/quickstart.yaml",
                      ["model.n_layer=2", "model.n_embd=32", "model.n_head=2",
                       f"model.block_size={BLOCK}"])
    model = build_from_config(cfg.model)
    rng = np.random.default_rng(0)  # peaked distributions: greedy ties cannot happen
    for p in model.parameters():
        p.data[...] = (p.data + 0.3 * rng.standard_normal(p.shape)).astype(p.dtype)
    save_checkpoint(root / "checkpoints", 7, model, extra={"config": to_dict(cfg)})
    return root, model


def read_line(proc, timeout=60.0):
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"serve_torch printed nothing within {timeout} s")
    return proc.stdout.readline()


def recv(sock, timeout=30.0):
    if not sock.poll(int(timeout * 1000)):
        raise TimeoutError(f"no message from serve_torch within {timeout} s")
    return decode(sock.recv_multipart())


@pytest.fixture
def server(tmp_path):
    run, model = quick_checkpoint(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts/serve_torch.py"), str(run),
         "--listen", "tcp://127.0.0.1:0", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = read_line(proc)
        assert line, proc.stderr.read()
        event = json.loads(line)
        assert event["event"] == "listening" and event["step"] == 7, event
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(event["endpoint"])
        yield proc, sock, model
        sock.close(linger=0)
        ctx.term()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_server_streams_each_request_in_turn_then_stops_on_sigterm(server):
    proc, sock, model = server
    rng = np.random.default_rng(1)
    prompts = {11: rng.integers(0, 256, 6), 12: rng.integers(0, 256, 3).astype(np.int32)}
    for rid, prompt in prompts.items():  # both sent at once: the second waits its turn
        sock.send_multipart(encode(message("generate", rid, prompt=prompt, max_tokens=8,
                                           temperature=0.0, top_k=0, seed=0)))
    order = []
    for rid, prompt in prompts.items():
        expected = model.generate(prompt[None], 8, temperature=0.0)[0, len(prompt):]
        for i in range(8):
            msg = recv(sock)
            assert (msg.type, msg.id, msg["index"]) == ("token", rid, i)
            assert msg["token"] == expected[i] and msg["logprob"] <= 0.0
            order.append(rid)
        done = recv(sock)
        assert (done.type, done.id, done["reason"], done["tokens"]) == ("done", rid, "length", 8)
        assert done["seconds"] > 0
    assert order == [11] * 8 + [12] * 8  # one at a time, first come first served

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert json.loads(proc.stdout.readline()) == {"event": "stopped"}


def test_server_refuses_what_the_baseline_does_not_do_and_keeps_serving(server):
    _, sock, model = server
    base = dict(max_tokens=4, temperature=0.0, top_k=0, seed=0)
    prompt = np.arange(5)
    cases = [
        (1, "generate", {**base, "prompt": prompt, "temperature": 0.7}, "unsupported",
         "temperature"),
        (2, "generate", {**base, "text": "hello"}, "unsupported", "prompt"),
        (3, "generate", {**base, "prompt": prompt, "stop": ["."]}, "unsupported", "stop"),
        (4, "generate", {**base, "prompt": np.arange(BLOCK)}, "invalid", "max_tokens"),
        (5, "generate", {**base, "prompt": np.array([1, 256])}, "invalid", "prompt"),
        (6, "generate", {**base, "prompt": np.zeros((2, 2), np.int64)}, "invalid", "prompt"),
        (7, "status", {"job": "j"}, "unsupported", "generate only"),
    ]
    for rid, kind, fields, code, words in cases:
        sock.send_multipart(encode(message(kind, rid, **fields)))
        msg = recv(sock)
        assert (msg.type, msg.id, msg["code"]) == ("error", rid, code), msg.fields
        assert words in msg["message"]
    sock.send_multipart([b"\x81\xa1v\x01"])  # a header without type or id
    msg = recv(sock)
    assert (msg.type, msg["code"]) == ("error", "protocol")
    # still serving: the longest request the context holds
    sock.send_multipart(encode(message("generate", 9, **{**base, "max_tokens": BLOCK - 4,
                                                       "prompt": prompt})))
    expected = model.generate(prompt[None], BLOCK - 4, temperature=0.0)[0, 5:]
    got = [recv(sock) for _ in range(BLOCK - 3)]
    assert [m["token"] for m in got[:-1]] == expected.tolist()
    assert got[-1].type == "done" and got[-1]["tokens"] == BLOCK - 4


# ---- scripts/bench_serve.py's arithmetic ---------------------------------------------------

def test_bench_figures_from_load_generator_records():
    bench_serve = pytest.importorskip("bench_serve")
    raw = {"processes": [
        {"requests": [
            {"id": 1, "at": 0, "sent": 10.0, "times": [10.1, 10.2, 10.4], "tokens": [1, 2, 3],
             "end": 10.45, "reason": "length"},
            {"id": 2, "at": 9, "sent": 10.45, "times": [10.5, 10.6], "tokens": [4, 5],
             "end": 10.65, "reason": "length"}]},
        {"requests": [
            {"id": 1, "at": 5, "sent": 10.0, "times": [], "tokens": [], "end": 10.3,
             "error": "busy: the queue is full"}]}]}
    got = bench_serve.summarize(raw)
    assert (got["requests"], got["completed"], got["tokens"]) == (3, 2, 5)
    assert got["errors"] == ["busy: the queue is full"]
    assert got["seconds"] == pytest.approx(0.65)  # first send to last end, all processes
    assert got["req_s"] == pytest.approx(2 / 0.65, abs=0.01)
    assert got["tok_s"] == pytest.approx(5 / 0.65, abs=0.1)
    assert got["ttft_p50_ms"] == pytest.approx(75.0)  # 100 and 50 ms
    assert got["itl_p50_ms"] == pytest.approx(100.0)  # gaps 100, 200, 100 ms
    assert got["itl_p99_ms"] == pytest.approx(198.0)  # NumPy's linear interpolation
    # the same prompt (process, id, offset) is compared across servers; errors are not
    other = {"processes": [{"requests": [{**raw["processes"][0]["requests"][0],
                                          "tokens": [1, 2, 9]},
                                         raw["processes"][0]["requests"][1]]}]}
    a, b = ({"outputs": {"8": bench_serve.outputs(r)}} for r in (raw, other))
    assert bench_serve.agreement(a, b) == {"same": 1, "compared": 2}
