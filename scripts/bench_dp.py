#!/usr/bin/env python3
"""Data-parallel training with parameter servers: how it scales as the model grows.

1. GPTs of about 3 M, 25 M and 85 M parameters (gpt-modern-tiny blocks: 4 layers d_model
   256 as in scripts/bench_engine.py; 10 layers d 512; 14 layers d 768; seq 128, batch 16,
   vocab 256, Adam) trained on the CPython docs text: one process with 1 BLAS thread and
   with 2 (all cores here), 1 trainer + 1 shard, and 2 trainers + 2 shards (ps-sync, every
   runtime process 1 BLAS thread). Tokens/s from the median step after warm-up; scaling
   efficiency = 2 trainers' tokens/s / (2 x one trainer's), against 1 trainer + 1 shard and
   against one process at 1 thread; and the critical path of the 2-trainer step: compute
   (forward + backward), pack (gradients into buckets), tail (backward after the last
   bucket left), wait (backward done -> last reply) with what the shards spent in it
   (skew: a bucket's first push to its last, i.e. waiting for the other trainer; mean of
   the pushes; optimizer), and unpack (new values into the model). The shards' figures come
   from their `ps.step` log lines. Beside it, the CPU time a trainer and a shard spend per
   step, user and system (mostly ZeroMQ's I/O threads copying through the socket), read
   from /proc at each step.
2. Moving a 100 MB parameter set: the runtime's push + pull (25 buckets of 4 MB, each a
   push_grads request answered by a params reply, through narun's Mailbox) against raw
   pyzmq moving the same bytes both ways (DEALER/ROUTER, zero-copy frames; the server
   answers each push with one of its own 25 buffers, as narun's shard does): the limit.

    python scripts/bench_dp.py                          # 3M and 25M, table + JSON line
    python scripts/bench_dp.py --sizes 3M 25M 85M       # and the 85M report
    python scripts/bench_dp.py --sizes 3M --steps 8     # quicker
    BENCH_DP_BUCKET_MB=16 python scripts/bench_dp.py    # bigger transfer buckets

Bars (issues 12 and 19): at 3M, 1 trainer + 1 shard adds <= 10% to one process's step; at
25M, 2 trainers + 2 shards reach >= 90% scaling efficiency against one process at 1
thread (the one-core baseline: 1 trainer + 1 shard also runs its shard's optimizer on the
second core, so it can beat one process) and beat one process using both cores; the 100 MB push +
pull reaches >= 0.8 of raw pyzmq's throughput, judged on the paired median (the ratio of
the two best rounds is printed too). Configurations alternate over rounds so machine drift
hits all alike, each keeps its best round, and ratios are also taken within a round
(paired). The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from narun.events import ListReporter  # noqa: E402

GPT = dict(n_layer=4, n_embd=256, n_head=4, seq=128, batch=16, vocab=256)
# gpt-modern-tiny blocks (SwiGLU MLPs): 2.7, 26.4 and 82.8 M parameters
SIZES = {"3M": GPT, "25M": {**GPT, "n_layer": 10, "n_embd": 512, "n_head": 8},
         "85M": {**GPT, "n_layer": 14, "n_embd": 768, "n_head": 12}}
CONFIGS = {"1t": "one process, 1 thread", "2t": "one process, 2 threads",
           "1x1": "1 trainer + 1 shard", "2x2": "2 trainers + 2 shards"}
MB100 = 100 * 2**20
BUCKET = int(float(os.environ.get("BENCH_DP_BUCKET_MB", "4")) * 2**20)  # the transfer unit


# ---- 1. the GPT step ---------------------------------------------------------------------
def gpt_config(mode: str, workers: int, shards: int, steps: int, out: str, gpt: dict = GPT):
    import narun.models  # noqa: F401
    from narun.config import config_from_dict

    return config_from_dict({
        "model": {"name": "gpt", "preset": "gpt-modern-tiny", "n_layer": gpt["n_layer"],
                  "n_embd": gpt["n_embd"], "n_head": gpt["n_head"], "block_size": gpt["seq"],
                  "vocab_size": gpt["vocab"]},
        "data": {"kind": "text", "seq_len": gpt["seq"]},
        "training": {"steps": steps, "batch_size": gpt["batch"], "optimizer": "adam",
                     "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant",
                     "warmup_steps": 0, "grad_clip": None, "eval_every": 0,
                     "checkpoint_every": 0, "out_dir": out},
        "runtime": {"mode": mode, "workers": workers, "ps_shards": shards}})


def bench_gpt(workers: int, shards: int, steps: int, warmup: int,
              launch_over: tuple[list[str], str] | None = None, gpt: dict = GPT,
              threads: int = 1) -> dict:
    """`launch_over` (hosts, keys directory): run the ps-sync job over those agents
    (narun launch) instead of local processes (scripts/bench_hosts.py). `threads`: BLAS
    threads of the in-process run (workers == 0); runtime processes get 1 each."""
    from narun._process import tune_process

    tune_process(threads)  # as `narun train` and every worker do: malloc kept, BLAS threads
    out = tempfile.mkdtemp(prefix="bench_dp_")
    rep = ChildCpu() if workers else ListReporter()
    tokens = gpt["batch"] * gpt["seq"]
    phases: dict[str, list[float]] = {}
    if workers == 0:
        from narun.train import train

        train(gpt_config("local", 0, 1, steps, out, gpt), rep, stop_at=steps)
        times = [tokens / e["tokens_per_s"] for e in rep.events if e["event"] == "step"]
        comm = [0.0] * len(times)
    else:
        os.environ["NARUN_LOG_LEVEL"] = "info"  # the shards' ps.step lines (read below)
        cfg = gpt_config("ps-sync", workers, shards, steps, out, gpt)
        if launch_over is None:
            from narun.runtime import train

            train(cfg, rep, stop_at=steps)
        else:
            from narun.runtime.launch import launch

            cfg.runtime.hosts = launch_over[0]
            launch(cfg, launch_over[1], rep, stop_at=steps)
        times, comm = [], []
        for e in rep.events:
            if e["event"] == "step":
                t = e["timings"]
                times.append(t["compute"] + t["wait"] + t["pull"])
                comm.append(t["wait"] + t["pull"])
                for k in ("compute", "pack", "tail", "wait", "pull"):
                    phases.setdefault(k, []).append(t.get(k, 0.0))
        for k, v in _shard_steps(Path(out) / "logs").items():
            phases[k] = v
        assert isinstance(rep, ChildCpu)
        for k, v in rep.per_step().items():
            phases[k] = v
    times, comm = times[warmup:], comm[warmup:]
    step = statistics.median(times)
    # the critical path, median per phase over the steps after warm-up
    path = {k: statistics.median(v[warmup:]) for k, v in phases.items() if v[warmup:]}
    return {"trainers": workers, "shards": shards, "threads": threads, "step_s": step,
            "tokens_per_s": tokens / step,
            "comm_share": statistics.median(c / t for c, t in zip(comm, times)),
            "path": path}


class ChildCpu(ListReporter):
    """A ListReporter that also reads, at each step event, the CPU seconds (user, and
    system: chiefly the socket copies of ZeroMQ's I/O threads) of this process's children,
    the job's trainers and shards, from /proc (Linux; nothing elsewhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[dict[int, tuple[str, float, float]]] = []
        self._tick = os.sysconf("SC_CLK_TCK")

    def emit(self, event: str, **fields) -> None:
        super().emit(event, **fields)
        if event == "step" and os.path.isdir("/proc"):
            self.samples.append(self._children())

    def _children(self) -> dict[int, tuple[str, float, float]]:
        me, out = os.getpid(), {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) != me:
                    continue
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError):
                continue  # gone meanwhile
            role = next((a.decode() for a in argv if a in (b"trainer", b"ps")), None)
            if role is not None:
                out[int(entry)] = (role, int(stat[11]) / self._tick, int(stat[12]) / self._tick)
        return out

    def per_step(self) -> dict[str, list[float]]:
        """Per step: CPU seconds of a trainer and of a shard (mean over the role's
        processes that lived through the step), user and system."""
        out: dict[str, list[float]] = {}
        for before, after in zip(self.samples, self.samples[1:]):
            sums: dict[str, list[float]] = {}
            for pid, (role, user, system) in after.items():
                if pid in before:
                    _, user0, system0 = before[pid]
                    sums.setdefault(f"{role}_user", []).append(user - user0)
                    sums.setdefault(f"{role}_sys", []).append(system - system0)
            for k, v in sums.items():
                out.setdefault(k, []).append(sum(v) / len(v))
        return out


def _shard_steps(log_dir: Path) -> dict[str, list[float]]:
    """Per step (in step order), the shards' skew (the longest, over shards) and the mean
    and optimizer seconds (the largest shard's), from their `ps.step` log lines."""
    per_step: dict[int, dict[str, float]] = {}
    for path in log_dir.glob("ps-*.log"):
        for line in path.read_text().splitlines():
            if '"ps.step"' not in line:
                continue
            rec = json.loads(line)
            row = per_step.setdefault(rec["step"], {})
            for k in ("skew", "mean", "optimizer"):
                row[f"shard_{k}"] = max(row.get(f"shard_{k}", 0.0), rec[k])
    out: dict[str, list[float]] = {}
    for step in sorted(per_step):
        for k, v in per_step[step].items():
            out.setdefault(k, []).append(v)
    return out


# ---- 2. 100 MB push + pull ---------------------------------------------------------------
# CURVE for the transfer (scripts/bench_hosts.py): a directory holding server.key_secret and
# client.key_secret (narun keys generate); None is plaintext.
def _curve_keys(curve_dir: str | None):
    if curve_dir is None:
        return None, None
    from protocol.keys import load_keypair

    return (load_keypair(Path(curve_dir) / "server.key_secret"),
            load_keypair(Path(curve_dir) / "client.key_secret"))


def serve_echo(kind: str, bind: str = "127.0.0.1", curve_dir: str | None = None) -> None:
    """The far side: answers each 4 MB push with 4 MB of its own, one of 25 buffers it holds
    (as a parameter server answers with its values), zero-copy: a params reply through
    narun's Mailbox, or the bare frames (raw). Prints its endpoint, serves until killed.
    With CURVE both sides are CURVE servers (raw without a ZAP allow-list: the limit)."""
    import numpy as np
    import zmq

    from narun._process import tune_process

    tune_process()  # as every narun worker does, before ZeroMQ starts its threads
    server, client = _curve_keys(curve_dir)
    values = {f"b{i}": np.ones(BUCKET // 4, np.float32) for i in range(MB100 // BUCKET)}
    if kind == "raw":
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = 64
        if server is not None:
            sock.curve_secretkey, sock.curve_publickey = server.secret, server.public
            sock.curve_server = True
        port = sock.bind_to_random_port(f"tcp://{bind}")
        print(json.dumps({"endpoint": f"tcp://{bind}:{port}"}), flush=True)
        cycle = list(values.values())
        for i in itertools.count():
            route, header, _ = sock.recv_multipart(copy=False)
            sock.send_multipart([route, header, cycle[i % len(cycle)]], copy=False)

    import uvloop
    import zmq.asyncio

    from narun.runtime.mailbox import Mailbox
    from protocol import open_channel, reply
    from protocol.curve import Authenticator, CurveServer

    async def handle(msg, route):
        return reply(msg, "params", version=1,
                     params={k: values[k] for k in msg["grads"]})

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        curve = None
        if server is not None:
            auth = Authenticator(ctx, [client.public])
            auth.start()
            curve = CurveServer(server, auth)
        box = Mailbox(open_channel(ctx, "router", bind=f"tcp://{bind}:0", curve=curve), "echo",
                      handle).start()
        print(json.dumps({"endpoint": box.channel.endpoint}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        box.close()
        ctx.destroy(linger=0)

    uvloop.run(main())


def start_echo_servers(prefix: list[str] | None = None, bind: str = "127.0.0.1",
                       curve_dir: str | None = None) -> tuple[dict, dict[str, str]]:
    """The raw and the narun echo server, each a process (run under `prefix`, e.g. `ip
    netns exec NS`, when given), and their endpoints."""
    extra = ["--bind", bind] + (["--curve", curve_dir] if curve_dir else [])
    servers = {kind: subprocess.Popen([*(prefix or []), sys.executable, __file__, "--serve",
                                       kind, *extra],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for kind in ("raw", "narun")}
    endpoints = {k: json.loads(p.stdout.readline())["endpoint"] for k, p in servers.items()}
    return servers, endpoints


def stop_servers(servers: dict) -> None:
    for p in servers.values():
        p.kill()
        p.wait()


def measure_transfer(endpoints: dict[str, str], rounds: int,
                     curve_dir: str | None = None) -> dict:
    """Raw and narun rounds alternate so machine noise hits both alike. Two figures: each
    side's best round (ratio of the bests), and the median over rounds of raw / narun in the
    same round (paired, so a burst of load on this shared machine moves both halves of a
    pair; the steadier figure)."""
    import numpy as np
    import uvloop
    import zmq
    import zmq.asyncio

    from narun._process import tune_process
    from narun.runtime.mailbox import Mailbox, new_id
    from protocol import message, open_channel
    from protocol.curve import CurveClient

    tune_process()  # both clients live in this process: the same malloc settings for both
    server, client = _curve_keys(curve_dir)
    buckets = [np.full(BUCKET // 4, i, np.float32) for i in range(MB100 // BUCKET)]

    async def main() -> dict[str, list[float]]:
        raw_ctx = zmq.Context()
        raw = raw_ctx.socket(zmq.DEALER)
        raw.linger = 0
        raw.sndhwm = raw.rcvhwm = 64
        if server is not None:
            raw.curve_serverkey = server.public
            raw.curve_publickey, raw.curve_secretkey = client.public, client.secret
        raw.connect(endpoints["raw"])
        ctx = zmq.asyncio.Context()
        curve = None if server is None else CurveClient(client, server.public)
        box = Mailbox(open_channel(ctx, "dealer", connect=endpoints["narun"], curve=curve),
                      "echo").start()
        times: dict[str, list[float]] = {"raw": [], "narun": []}
        header = b"x" * 64
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            for b in buckets:
                raw.send_multipart([header, b], copy=False)
            for _ in buckets:
                raw.recv_multipart(copy=False)
            times["raw"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await asyncio.gather(*(
                box.call(message("push_grads", new_id(), step=0, rank=0, version=0,
                                 grads={f"b{i}": b}), timeout=60, what="bench")
                for i, b in enumerate(buckets)))
            times["narun"].append(time.perf_counter() - t0)
        box.close()
        ctx.destroy(linger=0)
        raw_ctx.destroy(linger=0)
        return {k: v[1:] for k, v in times.items()}  # the first round warms up

    times = uvloop.run(main())
    out: dict = {}
    for kind, ts in times.items():
        out[kind] = {"seconds": min(ts), "gb_per_s": 2 * MB100 / min(ts) / 1e9}
    out["ratio"] = out["raw"]["seconds"] / out["narun"]["seconds"]
    pairs = sorted(r / n for r, n in zip(times["raw"], times["narun"]))
    out["paired_median"] = statistics.median(pairs)
    out["paired_quartiles"] = [pairs[len(pairs) // 4], pairs[(3 * len(pairs)) // 4]]
    return out


def bench_transfer(rounds: int) -> dict:
    """Both servers up at once on loopback, measured from this process."""
    servers, endpoints = start_echo_servers()
    try:
        return measure_transfer(endpoints, rounds)
    finally:
        stop_servers(servers)


# ---- driver ------------------------------------------------------------------------------
def child(what: str, args: argparse.Namespace) -> None:
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=io.StringIO()))
    if what == "transfer":
        result = bench_transfer(args.rounds)
    else:
        size, config = what.split(":")
        gpt = SIZES[size]
        if config.endswith("t"):
            result = bench_gpt(0, 0, args.steps, args.warmup, gpt=gpt, threads=int(config[0]))
        else:
            workers, shards = (int(x) for x in config.split("x"))
            result = bench_gpt(workers, shards, args.steps, args.warmup, gpt=gpt)
    print(json.dumps(result), flush=True)


def run_child(what: str, args: argparse.Namespace) -> dict:
    from narun._process import blas_env

    threads = 2 if what.endswith(":2t") else 1
    cmd = [sys.executable, __file__, "--child", what, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--rounds", str(args.rounds)]
    done = subprocess.run(cmd, env={**os.environ, **blas_env(threads)}, capture_output=True,
                          text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"bench {what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_size(size: str, args: argparse.Namespace, rounds: int) -> dict:
    """Every configuration of one model size, alternating over `rounds`."""
    rows: dict[str, dict] = {}
    paired: dict[str, list[float]] = {"overhead_1x1": [], "efficiency": []}
    for _ in range(rounds):
        this: dict[str, float] = {}
        for config in CONFIGS:
            r = run_child(f"{size}:{config}", args)
            this[config] = r["tokens_per_s"]
            if config not in rows or r["step_s"] < rows[config]["step_s"]:
                rows[config] = r
            print(f"  {size} {CONFIGS[config]:<26}{r['tokens_per_s']:>9,.0f} tokens/s",
                  file=sys.stderr, flush=True)
        paired["overhead_1x1"].append(this["1t"] / this["1x1"] - 1)
        paired["efficiency"].append(this["2x2"] / (2 * this["1t"]))
    tps = {k: r["tokens_per_s"] for k, r in rows.items()}
    return {"gpt": SIZES[size], "params": params_of(SIZES[size]), "configs": rows,
            "efficiency": tps["2x2"] / (2 * tps["1t"]),
            "efficiency_vs_1x1": tps["2x2"] / (2 * tps["1x1"]),
            "vs_2_threads": tps["2x2"] / tps["2t"],
            "overhead_1x1": tps["1t"] / tps["1x1"] - 1,
            "paired": {k: statistics.median(v) for k, v in paired.items()},
            "paired_rounds": paired}


def params_of(gpt: dict) -> int:
    from narun.models import GPT as NGPT
    from narun.models import gpt_config as model_config

    model = NGPT(model_config("gpt-modern-tiny", n_layer=gpt["n_layer"], n_embd=gpt["n_embd"],
                              n_head=gpt["n_head"], block_size=gpt["seq"],
                              vocab_size=gpt["vocab"]))
    return sum(p.numel() for p in model.parameters())


def print_table(results: dict[str, dict], transfer: dict) -> None:
    print(f"{'GPT':<6}{'configuration':<26}{'step ms':>9}{'tokens/s':>10}{'comm+wait':>11}"
          f"{'efficiency':>12}")
    for size, res in results.items():
        rows = res["configs"]
        g = res["gpt"]
        print(f"{size}: {res['params'] / 1e6:.1f} M parameters ({g['n_layer']} layers, "
              f"d_model {g['n_embd']}), {res['params'] * 4 / 1e6:.0f} MB of float32")
        for key, r in rows.items():
            eff = {"2x2": f"{res['efficiency']:.0%}",
                   "1x1": f"{-res['overhead_1x1']:+.1%}"}.get(key, "")
            print(f"{size:<6}{CONFIGS[key]:<26}{r['step_s'] * 1e3:>9.0f}"
                  f"{r['tokens_per_s']:>10,.0f}{r['comm_share']:>10.1%}{eff:>12}")
        print(f"{'':<6}2 trainers vs 1 trainer + 1 shard: {res['efficiency_vs_1x1']:.0%}; vs "
              f"one process at 2 threads: {res['vs_2_threads']:.2f}x; paired by round: "
              f"efficiency {res['paired']['efficiency']:.0%}, 1x1 overhead "
              f"{res['paired']['overhead_1x1']:+.1%}")
    print("\ncritical path of the 2-trainer step, ms (median over steps; shards: the "
          "longest/largest)")
    keys = ("compute", "pack", "tail", "wait", "shard_skew", "shard_mean",
            "shard_optimizer", "pull")
    print(f"{'GPT':<6}" + "".join(f"{k.replace('shard_', 'ps ').replace('pull', 'unpack'):>13}"
                                  for k in keys))
    for size, res in results.items():
        path = res["configs"]["2x2"]["path"]
        print(f"{size:<6}" + "".join(f"{path.get(k, 0.0) * 1e3:>13.1f}" for k in keys))
    cpu = ("trainer_user", "trainer_sys", "ps_user", "ps_sys")
    if any(k in res["configs"]["2x2"]["path"] for res in results.values() for k in cpu):
        tick = 1e3 / os.sysconf("SC_CLK_TCK")
        print(f"\nCPU ms per step of one process in the 2-trainer job (system time is mostly "
              f"ZeroMQ's socket copies; /proc counts in {tick:.0f} ms ticks); one process at 1 "
              f"thread: its whole step")
        print(f"{'GPT':<6}" + "".join(f"{k.replace('_', ' '):>13}" for k in cpu)
              + f"{'1 process':>13}")
        for size, res in results.items():
            path = res["configs"]["2x2"]["path"]
            print(f"{size:<6}" + "".join(f"{path.get(k, 0.0) * 1e3:>13.1f}" for k in cpu)
                  + f"{res['configs']['1t']['step_s'] * 1e3:>13.1f}")
    lo, hi = transfer["paired_quartiles"]
    print(f"\n100 MB push + pull   raw pyzmq {transfer['raw']['gb_per_s']:.2f} GB/s, "
          f"narun {transfer['narun']['gb_per_s']:.2f} GB/s  -> {transfer['ratio']:.2f} of raw"
          f" (best rounds); paired rounds: median {transfer['paired_median']:.2f}, "
          f"quartiles {lo:.2f}-{hi:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["3M", "25M"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15, help="rounds of the 100 MB transfer")
    p.add_argument("--gpt-rounds", type=int, default=3,
                   help="rounds of the GPT configurations (85M: one)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--serve", choices=("raw", "narun"), help=argparse.SUPPRESS)
    p.add_argument("--bind", default="127.0.0.1", help=argparse.SUPPRESS)
    p.add_argument("--curve", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve_echo(args.serve, args.bind, args.curve)
    if args.child:
        return child(args.child, args)
    results = {size: bench_size(size, args, 1 if size == "85M" else args.gpt_rounds)
               for size in args.sizes}
    transfer = run_child("transfer", args)
    print_table(results, transfer)
    small, mid = results.get("3M"), results.get("25M")
    print(json.dumps({
        "bench": "dp", "sizes": results, "transfer_100mb": transfer,
        "bar_overhead_ok": None if small is None else small["overhead_1x1"] <= 0.10,
        "bar_efficiency_ok": None if mid is None else (mid["efficiency"] >= 0.9
                                                       and mid["vs_2_threads"] > 1.0),
        "bar_transfer_ok": transfer["paired_median"] >= 0.8}))


if __name__ == "__main__":
    main()
