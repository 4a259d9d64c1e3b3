#!/usr/bin/env python3
"""The PyTorch baseline server of scripts/bench_serve.py: what a user would stand up without
narun. The same GPT, rebuilt in torch with the checkpoint's weights, a KV cache, greedy
decoding under torch.inference_mode, serving ONE request at a time: requests that arrive
while one generates wait in ZeroMQ's queue, first come first served.

It speaks narun's wire protocol (protocol/SPEC.md 4-5) on a ROUTER socket, so one load
generator drives both servers: `generate` (`prompt` ids, `temperature` 0) is answered with
one `token` per token as soon as it exists, then `done` (its `seconds` count from when the
server took the request off the socket: time queued behind others is not in it). What the
baseline does not do (sampling, `text` prompts, `stop` strings) is refused with `error`
code `unsupported`; a prompt or length the model's context cannot hold, or an id outside
the vocabulary, with code `invalid`. It prints JSON lines on stdout, `{"event":
"listening", "endpoint": ...}` once it serves, as `narun serve --json` does, and stops on
SIGTERM.

    python scripts/serve_torch.py runs/quickstart --listen tcp://127.0.0.1:5555 --threads 1

The weights travel as NumPy arrays (narun.models.load_trained, then torch.from_numpy): no
pickle anywhere. GPT-2 variant only (learned positions, LayerNorm, tanh-GELU MLP), with or
without biases and weight tying; that is the quickstart model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def _threads_before_import(argv: list[str]) -> None:
    # BLAS and OpenMP read these once, when torch loads
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else (
            argv[i + 1] if arg == "--threads" and i + 1 < len(argv) else None)
        if value is not None:
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = value


if __name__ == "__main__":
    _threads_before_import(sys.argv)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from narun.errors import ConfigError  # noqa: E402


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5, bias=bias)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.attn.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5, bias=bias)
        self.mlp = nn.Module()
        self.mlp.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.mlp.proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
                past: int) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_head
        q, k, v = self.attn.qkv(self.ln_1(x)).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
        keys, values = cache
        keys[:, :, past:past + T] = k
        values[:, :, past:past + T] = v
        k, v = keys[:, :, :past + T], values[:, :, :past + T]
        if past == 0:  # the prompt: causal among itself (1/sqrt(head_dim) scaling, as narun)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        elif T == 1:  # one new token sees every position so far
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.attn.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp.proj(F.gelu(self.mlp.fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    """narun's GPT (narun/models/gpt.py, GPT-2 variant) in torch, with narun's parameter
    names, so a narun state dict loads one for one (strict)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        unsupported = {key: getattr(config, key) for key, plain in
                       (("norm", "layernorm"), ("mlp", "gelu"), ("position", "learned"))
                       if getattr(config, key) != plain}
        if unsupported:
            raise ConfigError(f"serve_torch: the baseline rebuilds the GPT-2 variant "
                              f"(layernorm, gelu, learned positions), got {unsupported}")
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList(Block(c.n_embd, c.n_head, c.hidden, c.bias)
                               for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, eps=1e-5, bias=c.bias)
        if not c.tie_weights:
            self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)

    @classmethod
    def from_narun(cls, model: Any) -> TorchGPT:
        """The torch twin of a narun GPT, in its dtype, in eval mode."""
        weights = {name: torch.from_numpy(np.array(t.numpy()))  # a copy torch may own
                   for name, t in model.state_dict().items()}
        dtypes = {w.dtype for w in weights.values()}
        if len(dtypes) != 1:
            raise ConfigError(f"serve_torch: expected one dtype for all weights, got {dtypes}")
        twin = cls(model.config).to(dtypes.pop())
        twin.load_state_dict(weights, strict=True)
        return twin.eval()

    def new_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        shape = (1, c.n_head, c.block_size, c.n_embd // c.n_head)
        dtype = self.wte.weight.dtype
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                for _ in range(c.n_layer)]

    def forward(self, idx: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]],
                past: int) -> torch.Tensor:
        """Logits (B, vocab) of the last of the tokens `idx` (B, T) at positions past ..
        past + T - 1; their keys and values are written into `cache`."""
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(past, past + T))
        for block, kv in zip(self.h, cache, strict=True):
            x = block(x, kv, past)
        x = self.ln_f(x[:, -1])
        return F.linear(x, self.wte.weight if self.config.tie_weights else self.lm_head.weight)

    @torch.inference_mode()
    def greedy(self, prompt: np.ndarray, n_new: int) -> Iterator[tuple[int, float]]:
        """(token, logprob) for each of `n_new` greedy tokens after `prompt` (1-d ids),
        each as soon as it is chosen. The prompt and the tokens fed back must fit the
        context: len(prompt) + n_new - 1 <= block_size."""
        cache = self.new_cache()
        idx = torch.from_numpy(np.array(prompt, dtype=np.int64))[None]  # a writable copy
        past = 0
        for _ in range(n_new):
            logits = self(idx, cache, past)[0]
            past += idx.shape[1]
            token = int(logits.argmax())
            logprob = float(torch.log_softmax(logits.double(), dim=-1)[token])
            yield token, logprob
            idx = torch.tensor([[token]])


def check_generate(msg: Any, config: Any) -> tuple[str, str] | None:
    """(error code, message) when the baseline cannot serve `msg`, else None."""
    if msg.get("text") is not None or msg.get("prompt") is None:
        return "unsupported", "the torch baseline takes token ids in generate.prompt only"
    if msg.get("stop"):
        return "unsupported", "the torch baseline has no stop strings (generate.stop)"
    if msg["temperature"] != 0.0:
        return "unsupported", (f"the torch baseline decodes greedily only: "
                               f"generate.temperature must be 0, got {msg['temperature']}")
    prompt = msg["prompt"]
    if prompt.ndim != 1 or prompt.size == 0:
        return "invalid", f"generate.prompt: expected 1-d token ids, got shape {prompt.shape}"
    if prompt.dtype.kind not in "iu":
        return "invalid", f"generate.prompt: expected int32 or int64 ids, got {prompt.dtype}"
    if prompt.min() < 0 or prompt.max() >= config.vocab_size:
        return "invalid", (f"generate.prompt: ids must be in [0, {config.vocab_size}), got "
                           f"[{prompt.min()}, {prompt.max()}]")
    room = config.block_size - prompt.size + 1
    if not 1 <= msg["max_tokens"] <= room:
        return "invalid", (f"generate.max_tokens: expected 1..{room} after a "
                           f"{prompt.size}-token prompt (block_size {config.block_size}), "
                           f"got {msg['max_tokens']}")
    return None


def serve(model: TorchGPT, listen: str, on_listening: Any = None,
          send_timeout: float = 30.0) -> None:
    """Serve `model` on a ROUTER bound to `listen`, one request at a time, until the
    process is told to stop (SIGTERM, KeyboardInterrupt). `on_listening(endpoint)` is
    called once bound."""
    import zmq

    from narun.errors import ProtocolError
    from protocol import DEFAULT_LIMITS, decode, encode, error_message, message, refusal

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.maxmsgsize = DEFAULT_LIMITS.max_message_bytes
    sock.router_mandatory = 1  # at the high-water mark a send waits instead of dropping
    sock.sndhwm = 1024
    sock.sndtimeo = int(send_timeout * 1000)  # a client that stopped reading is dropped
    sock.bind(listen)
    if on_listening is not None:
        on_listening(sock.last_endpoint.decode())

    def send(peer: bytes, msg: Any) -> bool:
        try:
            sock.send_multipart([peer, *encode(msg)])
            return True
        except zmq.ZMQError:  # the client is gone (EHOSTUNREACH) or not reading (EAGAIN)
            return False

    try:
        while True:
            peer, *body = sock.recv_multipart()
            start = time.perf_counter()
            try:
                msg = decode(body)
            except ProtocolError as exc:
                answer = refusal(body, exc)
                if answer is not None:
                    send(peer, answer)
                continue
            if msg.type == "abort":  # nothing of its runs any more: it ended or never began
                continue
            if msg.type != "generate":
                if msg.type != "error":
                    send(peer, error_message(msg.id, "unsupported", f"the torch baseline "
                                             f"serves generate only, got {msg.type}"))
                continue
            refused = check_generate(msg, model.config)
            if refused is not None:
                send(peer, error_message(msg.id, *refused))
                continue
            n = 0
            for n, (token, logprob) in enumerate(model.greedy(msg["prompt"],
                                                              msg["max_tokens"]), 1):
                if not send(peer, message("token", msg.id, index=n - 1, token=token,
                                          logprob=logprob)):
                    break
            else:
                send(peer, message("done", msg.id, reason="length", tokens=n,
                                   seconds=time.perf_counter() - start))
    finally:
        sock.close(linger=0)
        ctx.term()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a run directory or a step directory")
    ap.add_argument("--listen", default="tcp://127.0.0.1:0",
                    help="ZeroMQ endpoint to bind (port 0: a free one, printed)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (set_num_threads)")
    args = ap.parse_args()
    if args.threads < 1:
        raise SystemExit(f"serve_torch: --threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # out of the blocking recv, through serve's cleanup

    signal.signal(signal.SIGTERM, stop)

    from narun.models import load_trained

    trained = load_trained(args.checkpoint)
    model = TorchGPT.from_narun(trained.model)
    c = model.config

    def listening(endpoint: str) -> None:
        print(json.dumps({"event": "listening", "endpoint": endpoint, "server": "torch",
                          "checkpoint": str(trained.checkpoint), "step": trained.step,
                          "threads": torch.get_num_threads(),
                          "parameters": sum(p.numel() for p in model.parameters()),
                          "dtype": str(model.wte.weight.dtype).removeprefix("torch."),
                          "block_size": c.block_size, "torch": torch.__version__}),
              flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        serve(model, args.listen, listening)
    print(json.dumps({"event": "stopped"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
