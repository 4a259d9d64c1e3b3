#!/usr/bin/env python3
"""Benchmark the job service (`narun coordinator`) through narun.client; prints a table,
then one JSON line with every figure.

(a) submit-to-first-step latency: the median over N submits of a tiny one-process job
    (MLP 16-32-4, local mode), from the submit call to the first `step` event the client
    sees. Each job runs to its end before the next is submitted. Most of it is the job's
    own process starting (Python, NumPy, narun imported, the data loaded).
(b) events delivered per second to 1 and to 50 followers (50 Clients on one loop): the
    re-delivery of a finished job's stored events (a few thousand steps), which takes the
    same path as live events (the subscription's flush: batches of up to 256 events per
    `events` message) without being limited by how fast the job trains. The median of 3 runs.
(c) `status` round trip p50/p99 through Client.status, against the same request and reply
    bytes over raw pyzmq DEALER -> ROUTER in another process (the baseline): blocking
    pyzmq, and zmq.asyncio on uvloop as the Client uses. Trials alternate, so both see the
    same machine load.

    python scripts/bench_jobs.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
import zmq
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from narun.client import Client  # noqa: E402
from protocol import encode, message  # noqa: E402
from tests.integration.services import ServiceProcess  # noqa: E402


def blobs(path: Path) -> Path:
    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 3.0, (4, 16))
    y = rng.integers(0, 4, 600)
    x = (centers[y] + rng.normal(0.0, 1.0, (600, 16))).astype(np.float32)
    np.savez(path, x=x, y=y.astype(np.int64))
    return path


def job_config(data: Path, out: Path, steps: int) -> dict[str, Any]:
    return {
        "model": {"name": "mlp", "sizes": [16, 32, 4], "activation": "relu"},
        "data": {"kind": "arrays", "path": str(data), "val_fraction": 0.1},
        "training": {"steps": steps, "batch_size": 12, "optimizer": "adamw", "lr": 1e-2,
                     "eval_every": 0, "checkpoint_every": 0, "out_dir": str(out)},
        "runtime": {"mode": "local", "workers": 0, "ps_shards": 1},
    }


async def first_step_latencies(endpoint: str, data: Path, root: Path,
                               n: int) -> tuple[list[float], list[float]]:
    """(submit call to first step event, submit call alone), seconds, n times."""
    firsts, submits = [], []
    async with Client(endpoint, timeout=60.0) as client:
        for i in range(n):
            config = job_config(data, root / f"tiny{i}", 3)  # a run directory each
            start = time.perf_counter()
            job = await client.submit(config)
            submits.append(time.perf_counter() - start)
            first = None
            async for event in client.events(job):
                if first is None and event["event"] == "step":
                    first = time.perf_counter() - start
            status = await client.status(job)
            assert first is not None and status.state == "done", status
            firsts.append(first)
    return firsts, submits


async def redeliver(endpoint: str, job: str, followers: int) -> tuple[float, int]:
    """(seconds until every follower had the whole stored stream, events each got)."""
    clients = [Client(endpoint, timeout=60.0) for _ in range(followers)]
    for client in clients:
        await client.__aenter__()
    try:
        async def follow(client: Client) -> int:
            return sum([1 async for _ in client.events(job)])

        start = time.perf_counter()
        counts = await asyncio.gather(*(follow(c) for c in clients))
        elapsed = time.perf_counter() - start
    finally:
        for client in clients:
            await client.__aexit__()
    assert len(set(counts)) == 1, counts
    return elapsed, counts[0]


async def status_latencies(endpoint: str, job: str, n: int) -> list[float]:
    async with Client(endpoint) as client:
        await client.status(job)
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            await client.status(job)
            samples.append(time.perf_counter() - start)
    return samples


def raw_server(endpoints: mp.Queue, answer: list[bytes]) -> None:
    """ROUTER answering every request with the service's status reply, as bytes."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    endpoints.put(f"tcp://127.0.0.1:{port}")
    while True:
        frames = sock.recv_multipart()
        if frames[1] == b"stop":
            break
        sock.send_multipart([frames[0], *answer])
    sock.close(linger=0)
    ctx.term()


def raw_latencies(endpoint: str, request: list[bytes], n: int,
                  keep: bool = False) -> Any:
    """n round trips' seconds; with keep, the warm-up's reply frames instead."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    try:
        sock.send_multipart(request)
        first = sock.recv_multipart()
        if keep:
            return first
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            sock.send_multipart(request)
            sock.recv_multipart()
            samples.append(time.perf_counter() - start)
        return samples
    finally:
        sock.close(linger=0)
        ctx.term()


async def raw_async_latencies(endpoint: str, request: list[bytes], n: int) -> list[float]:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    try:
        await sock.send_multipart(request)
        await sock.recv_multipart()
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            await sock.send_multipart(request)
            await sock.recv_multipart()
            samples.append(time.perf_counter() - start)
        return samples
    finally:
        sock.close(linger=0)
        ctx.term()


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q)) * 1e6  # microseconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer submits, steps, pings")
    args = parser.parse_args()
    submits, steps, pings, trials = (3, 1000, 300, 2) if args.quick else (10, 5000, 1000, 3)

    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        root = Path(tmp)
        data = blobs(root / "blobs.npz")
        svc = ServiceProcess(root / "service", slots=2)
        try:
            # (a)
            firsts, submit_calls = uvloop.run(first_step_latencies(svc.endpoint, data, root,
                                                                   submits))
            figures["first_step_median_s"] = statistics.median(firsts)
            figures["first_step_min_s"] = min(firsts)
            figures["first_step_max_s"] = max(firsts)
            figures["submit_call_median_ms"] = statistics.median(submit_calls) * 1e3

            # (b)
            async def long_job() -> str:
                async with Client(svc.endpoint, timeout=60.0) as client:
                    job = await client.submit(job_config(data, root / "long", steps))
                    await client.wait(job)
                    return job

            job = uvloop.run(long_job())
            for followers in (1, 50):
                runs = [uvloop.run(redeliver(svc.endpoint, job, followers))
                        for _ in range(trials)]
                elapsed, each = statistics.median(r[0] for r in runs), runs[0][1]
                figures[f"events_{followers}_followers_per_s"] = followers * each / elapsed
                figures[f"events_{followers}_followers_each"] = each
                figures[f"events_{followers}_followers_s"] = elapsed

            # (c)
            request = [bytes(f) for f in encode(message("status", 7, job=job))]
            answer = raw_latencies(svc.endpoint, request, 0, keep=True)  # the service's bytes
            spawn = mp.get_context("spawn")
            queue: mp.Queue = spawn.Queue()
            server = spawn.Process(target=raw_server, args=(queue, answer),
                                   daemon=True)
            server.start()
            raw_endpoint = queue.get(timeout=60)
            samples: dict[str, list[float]] = {"narun": [], "raw_pyzmq": [],
                                               "raw_asyncio": []}
            try:
                for _ in range(trials):  # alternate: the same machine load for each
                    samples["narun"] += uvloop.run(status_latencies(svc.endpoint, job, pings))
                    samples["raw_pyzmq"] += raw_latencies(raw_endpoint, request, pings)
                    samples["raw_asyncio"] += uvloop.run(
                        raw_async_latencies(raw_endpoint, request, pings))
            finally:
                ctx = zmq.Context()
                stop = ctx.socket(zmq.DEALER)
                stop.connect(raw_endpoint)
                stop.send(b"stop")
                server.join(10)
                stop.close(linger=0)
                ctx.term()
            for name, got in samples.items():
                figures[f"status_{name}_p50_us"] = pct(got, 50)
                figures[f"status_{name}_p99_us"] = pct(got, 99)
            figures["status_bytes"] = sum(len(f) for f in answer)
            figures["status_p50_ratio_to_raw_asyncio"] = (figures["status_narun_p50_us"]
                                                          / figures["status_raw_asyncio_p50_us"])
        finally:
            svc.stop()

    rows = [
        (f"submit to first step ({submits} tiny jobs)",
         f"{figures['first_step_median_s'] * 1e3:.0f} ms",
         f"median; min {figures['first_step_min_s'] * 1e3:.0f}, max "
         f"{figures['first_step_max_s'] * 1e3:.0f} ms; the submit call alone "
         f"{figures['submit_call_median_ms']:.1f} ms"),
        *((f"events re-delivered to {n} follower{'s' if n > 1 else ''}",
           f"{figures[f'events_{n}_followers_per_s']:.0f} /s",
           f"{figures[f'events_{n}_followers_each']:.0f} events each, in "
           f"{figures[f'events_{n}_followers_s'] * 1e3:.0f} ms (median of {trials})")
          for n in (1, 50)),
        *((f"status round trip, {label}", f"p50 {figures[f'status_{name}_p50_us']:.0f} us",
           f"p99 {figures[f'status_{name}_p99_us']:.0f} us")
          for name, label in (("narun", "Client.status (uvloop)"),
                              ("raw_asyncio", "raw zmq.asyncio, uvloop"),
                              ("raw_pyzmq", "raw pyzmq, blocking"))),
        ("status p50, narun / raw zmq.asyncio",
         f"{figures['status_p50_ratio_to_raw_asyncio']:.2f}x",
         f"same request and reply bytes ({figures['status_bytes']:.0f} B reply)"),
    ]
    for name, value, note in rows:
        print(f"{name:<44} {value:>14}   {note}")
    print(json.dumps({"bench": "jobs", **{k: round(v, 4) for k, v in figures.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
