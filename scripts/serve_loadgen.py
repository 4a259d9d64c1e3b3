#!/usr/bin/env python3
"""One load-generator process of scripts/bench_serve.py: `--streams` clients, each its own
DEALER connection (protocol.open_channel), sending `generate` requests to an inference
server and timing every message that comes back.

Closed loop (default): each stream sends a request, reads its tokens and `done`, and sends
the next, until the process has sent `--requests`. Open loop (`--rate R`): requests
arrive as a Poisson process of R per second (exponential gaps), each on an idle connection
or a new one, however many are still running.

Each prompt is `--prompt-bytes` bytes of the quickstart text (CPython's documentation,
narun.data.default_corpus) from a random offset, one token per byte; `--new` tokens,
greedy. The process prints `{"ready": ...}` once its connections are open, starts when it
reads a line on stdin (so several processes start together), and ends by printing one
JSON object (or writing it to `--out`): per request its prompt offset, send time, each
token's arrival time and id, and how it ended. Times are time.monotonic() seconds, one
clock for every process.

    python scripts/serve_loadgen.py --endpoint tcp://127.0.0.1:5555 --streams 16 \\
        --requests 32 [--rate 8] < <(echo go)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from narun.data import default_corpus  # noqa: E402
from narun.errors import WaitTimeout  # noqa: E402
from protocol import Channel, message, open_channel  # noqa: E402


class Load:
    """The requests one process sends: prompts, ids and what came back."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx = zmq.asyncio.Context()
        self.corpus = np.frombuffer(default_corpus(), dtype=np.uint8)
        self.rng = np.random.default_rng(args.seed)
        self.left = args.requests
        self.next_id = 1
        self.results: list[dict[str, Any]] = []
        self.idle: list[Channel] = []
        self.opened: list[Channel] = []

    def channel(self) -> Channel:
        if self.idle:
            return self.idle.pop()
        ch = open_channel(self.ctx, "dealer", connect=self.args.endpoint)
        self.opened.append(ch)
        return ch

    def take(self) -> tuple[int, int] | None:
        """(request id, prompt offset) of the next request, or None when all are sent."""
        if self.left <= 0:
            return None
        self.left -= 1
        rid, self.next_id = self.next_id, self.next_id + 1
        at = int(self.rng.integers(0, len(self.corpus) - self.args.prompt_bytes))
        return rid, at

    async def request(self, ch: Channel, rid: int, at: int) -> None:
        a = self.args
        prompt = self.corpus[at:at + a.prompt_bytes].astype(np.int64)
        msg = message("generate", rid, prompt=prompt, max_tokens=a.new, temperature=0.0,
                      top_k=0, seed=0)
        times: list[float] = []
        tokens: list[int] = []
        out: dict[str, Any] = {"id": rid, "at": at, "times": times, "tokens": tokens}
        out["sent"] = time.monotonic()
        await ch.send(msg, wait_sent=False)
        try:
            while True:
                got = (await ch.recv(timeout=a.timeout)).msg
                now = time.monotonic()
                if got.id != rid:
                    continue  # a late reply to an earlier request on this connection
                if got.type == "token":
                    times.append(now)
                    tokens.append(got["token"])
                elif got.type == "done":
                    out["end"], out["reason"] = now, got["reason"]
                    break
                elif got.type == "error":
                    out["end"], out["error"] = now, f"{got['code']}: {got['message']}"
                    break
        except WaitTimeout:
            out["end"], out["error"] = time.monotonic(), f"timeout: nothing for {a.timeout} s"
        self.results.append(out)

    async def closed_loop(self, stream: int) -> None:
        ch = self.opened[stream]
        while (job := self.take()) is not None:
            await self.request(ch, *job)

    async def open_loop(self) -> None:
        start = time.monotonic()
        due = start
        running = set()
        while (job := self.take()) is not None:
            due += float(self.rng.exponential(1.0 / self.args.rate))
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            ch = self.channel()
            task = asyncio.create_task(self.request(ch, *job))
            running.add(task)
            task.add_done_callback(running.discard)
            task.add_done_callback(lambda _, ch=ch: self.idle.append(ch))
        await asyncio.gather(*running)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load = Load(args)
    for _ in range(args.streams):
        load.channel()
    load.idle = list(load.opened)
    print(json.dumps({"ready": len(load.opened)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    began = time.monotonic()
    try:
        if args.rate:
            await load.open_loop()
        else:
            await asyncio.gather(*(load.closed_loop(i) for i in range(args.streams)))
    finally:
        for ch in load.opened:
            ch.close()
        load.ctx.term()
    return {"began": began, "ended": time.monotonic(), "connections": len(load.opened),
            "requests": load.results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--streams", type=int, default=1,
                    help="concurrent clients (closed loop); connections to start with (open)")
    ap.add_argument("--requests", type=int, default=16, help="requests this process sends")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="open loop: Poisson arrivals, requests per second (0: closed loop)")
    ap.add_argument("--prompt-bytes", type=int, default=64)
    ap.add_argument("--new", type=int, default=64, help="tokens to generate per request")
    ap.add_argument("--seed", type=int, default=0, help="prompt offsets and arrival gaps")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds a request may wait for its next message")
    ap.add_argument("--out", help="write the result here instead of stdout")
    args = ap.parse_args()
    if args.streams < 1 or args.requests < 0 or args.rate < 0:
        ap.error("--streams must be >= 1, --requests and --rate >= 0")
    result = json.dumps(uvloop.run(run(args)), separators=(",", ":"))
    if args.out:
        Path(args.out).write_text(result + "\n")
    else:
        print(result, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
