"""`narun serve` (the streaming inference server) and `narun generate --server` (its
terminal client)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from narun.errors import ConfigError

EXIT_INTERRUPTED = 130


def cmd_serve(args: argparse.Namespace) -> int:
    from narun.events import make_reporter
    from narun.runtime.hosts import tcp_address
    from narun.serve.server import DEFAULT_PORT, InferenceServer, run_server
    from protocol.keys import load_node_keys

    reporter = make_reporter(json_lines=True if args.json else None)
    server = InferenceServer(
        args.checkpoint, tcp_address(args.listen, DEFAULT_PORT, "--listen"), http=args.http,
        replicas=args.replicas, max_batch=args.max_batch, max_queue=args.max_queue,
        max_tokens=args.max_tokens, prefill_chunk=args.prefill_chunk,
        keys=load_node_keys(args.keys) if args.keys else None, grace=args.grace,
        blas_threads=args.threads, device=args.device,
        on_event=reporter.emit if args.json else _say)
    return run_server(server)


def _say(event: str, **fields: Any) -> None:
    """What a person at a terminal sees of the server's events."""
    if event == "listening":
        http = f", HTTP {fields['http']}" if fields["http"] else ""
        print(f"serving {fields['model']} on {fields['endpoint']}{http}: {fields['replicas']} "
              f"replica(s) x {fields['max_batch']} streams, queue {fields['max_queue']}, "
              f"context {fields['context']}", flush=True)
    elif event == "worker_lost":
        print(f"{fields['message']}; {fields['streams']} stream(s) failed", flush=True)
    elif event == "stopped":
        print(f"stopped: {fields['served']} streams served, {fields['failed']} failed, "
              f"{fields['refused']} requests refused", flush=True)


def generate_from_server(args: argparse.Namespace) -> int:
    """`narun generate --server ADDR PROMPT`: stream a server's tokens to stdout."""
    import uvloop

    from narun.serve.client import InferenceClient

    prompt = args.prompt or "\n"  # empty: a new line, as generating from a checkpoint

    async def main() -> int:
        async with InferenceClient(args.server, keys=args.keys) as client:
            out = sys.stdout
            out.write(prompt)
            out.flush()
            stream = client.generate(prompt, max_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k,
                                     seed=args.seed, stop=args.stop or ())
            async for tok in stream:
                if tok.text:
                    out.write(tok.text)
                    out.flush()
            out.write("\n")
            out.flush()
        return 0

    try:
        return uvloop.run(main())
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        return EXIT_INTERRUPTED


def add_commands(sub: Any) -> None:
    s = sub.add_parser("serve", help="stream generated tokens from a trained language model "
                                     "to many clients at once (ZeroMQ, and OpenAI-style HTTP)",
                       description="Serve a checkpoint: clients send `generate` over ZeroMQ "
                       "(narun.client.InferenceClient, narun generate --server) or POST "
                       "/v1/completions over HTTP, and get each token as it is made. "
                       "Requests are batched continuously: a new one joins the running batch "
                       "at the next decode step.")
    s.add_argument("checkpoint", help="a run directory (its newest good checkpoint) or a "
                                      "step directory")
    s.add_argument("--listen", default="tcp://127.0.0.1:7800", metavar="tcp://ADDR:PORT",
                   help="where ZeroMQ clients connect (default %(default)s); any address but "
                        "loopback needs --keys")
    s.add_argument("--http", metavar="ADDR:PORT",
                   help="also serve the OpenAI-compatible HTTP API here (POST "
                        "/v1/completions, GET /v1/models, GET /health)")
    s.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="inference worker processes, each with the model and its own batch "
                        "(default %(default)s)")
    s.add_argument("--max-batch", type=int, default=32, metavar="B",
                   help="streams one replica runs at once (default %(default)s; 1 turns "
                        "batching off)")
    s.add_argument("--max-queue", type=int, default=256, metavar="Q",
                   help="requests that may wait for a slot; past it a request is answered "
                        "busy (default %(default)s)")
    s.add_argument("--max-tokens", type=int, metavar="N",
                   help="the most tokens one request may ask for (default: the model's "
                        "context - 1)")
    s.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                   help="prompt tokens one decode step prefills at most, over all new "
                        "requests: a long prompt delays the running streams' next token by a "
                        "bounded amount, and a larger budget lets a burst of requests in "
                        "sooner (default %(default)s)")
    s.add_argument("--threads", type=int, default=1, metavar="N",
                   help="BLAS threads of each replica (default %(default)s)")
    s.add_argument("--device", default="cpu", help="cpu or cuda:N (default %(default)s)")
    s.add_argument("--keys", metavar="DIR",
                   help="this server's key pair; DIR/authorized/ holds the clients it admits "
                        "(CURVE)")
    s.add_argument("--grace", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds the streams in flight get to finish before they "
                        "are cancelled (default %(default)s)")
    s.add_argument("--json", action="store_true",
                   help="print events as JSON lines: listening, worker_lost, stopped")
    s.set_defaults(fn=cmd_serve)


def check_generate_args(args: argparse.Namespace) -> None:
    """`narun generate` takes a checkpoint or --server, not both; with --server the one
    positional is the prompt."""
    if args.server is None:
        if args.checkpoint is None:
            raise ConfigError("narun generate: name a checkpoint (a run directory) or a "
                              "server (--server tcp://HOST:7800)")
        if args.stop or args.keys:
            raise ConfigError("--stop and --keys need --server")
        return
    if args.prompt and args.checkpoint is not None:
        raise ConfigError(f"narun generate --server takes the prompt alone, got "
                          f"{args.checkpoint!r} and {args.prompt!r}; with --server there "
                          f"is no checkpoint argument")
    args.prompt = args.prompt or args.checkpoint or ""
    args.checkpoint = None
