#!/usr/bin/env python3
"""Across hosts: what the network between two hosts, and CURVE on it, cost (root only).

Two test hosts are network namespaces on one bridge (scripts/netns_cluster.py), so the
bytes cross a real veth pair and the kernel's network stack, not loopback.

1. The 100 MB push + pull of scripts/bench_dp.py (25 buckets of 4 MB each way) from host 2
   to echo servers on host 1: narun's Mailbox against raw pyzmq over the same veth, with
   CURVE off and with CURVE on (each against raw pyzmq with the same CURVE setting: the
   limit), paired by round. What CURVE costs: narun with CURVE / narun without.
2. The GPT step of bench_dp.py, ps-sync with 2 trainers and 2 shards: launched over agents
   on the 2 hosts (narun launch, CURVE on), against the same job's local processes on one
   host (narun train).

    sudo python scripts/bench_hosts.py            # table, then one JSON line
    sudo python scripts/bench_hosts.py --rounds 6 --steps 10

Bar (issue 13): push + pull >= 0.8 of raw pyzmq with CURVE off and with CURVE on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench_dp  # noqa: E402  (scripts/ on the path: one transfer benchmark, two settings)


def make_curve_dir() -> str:
    from protocol.keys import generate_keypair

    root = tempfile.mkdtemp(prefix="bench_hosts_keys_")
    generate_keypair(root, "server")
    generate_keypair(root, "client")
    return root


def transfer(cluster, rounds: int, curve_dir: str | None) -> dict:
    """Echo servers on host 1; the client, this script in measure mode, on host 2."""
    server_host, client_host = cluster.hosts[0], cluster.hosts[1]
    servers, endpoints = bench_dp.start_echo_servers(
        ["ip", "netns", "exec", server_host.name], server_host.address, curve_dir)
    try:
        argv = [sys.executable, __file__, "--measure", json.dumps(endpoints),
                "--rounds", str(rounds)] + (["--curve", curve_dir] if curve_dir else [])
        done = client_host.call(argv, timeout=600)
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        bench_dp.stop_servers(servers)


def gpt_steps(cluster, steps: int, warmup: int, rounds: int) -> dict:
    """The 2x2 ps-sync GPT step over the hosts' agents, and on this host; best round each."""
    from protocol.keys import authorize, generate_keypair

    root = Path(tempfile.mkdtemp(prefix="bench_hosts_agents_"))
    coordinator = root / "coordinator"
    generate_keypair(coordinator, "coordinator")
    agents = cluster.start_agents(root, slots=2, authorize=[coordinator / "coordinator.key"])
    for agent in agents:  # the coordinator finds each agent's key under its address
        authorize(coordinator, agent.public_key, name=agent.spec.address)
    hosts = [a.spec.address for a in agents]
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, over in (("one host", None), ("two hosts", (hosts, str(coordinator)))):
            r = run_gpt(steps, warmup, over)
            if name not in best or r["step_s"] < best[name]["step_s"]:
                best[name] = r
    return best


def run_gpt(steps: int, warmup: int, over) -> dict:
    """One GPT run in a fresh process (as bench_dp does), so each starts alike."""
    from narun._process import blas_env

    cmd = [sys.executable, __file__, "--gpt", json.dumps(over), "--steps", str(steps),
           "--warmup", str(warmup)]
    done = subprocess.run(cmd, env={**os.environ, **blas_env(1)}, capture_output=True,
                          text=True, cwd=ROOT, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"GPT run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10, help="rounds of the 100 MB transfer")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gpt-rounds", type=int, default=2)
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--curve", help=argparse.SUPPRESS)
    p.add_argument("--gpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(bench_dp.measure_transfer(json.loads(args.measure), args.rounds,
                                                   args.curve)))
        return
    if args.gpt is not None:
        import structlog

        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
        over = json.loads(args.gpt)
        print(json.dumps(bench_dp.bench_gpt(2, 2, args.steps, args.warmup,
                                            None if over is None else tuple(over))))
        return
    if os.geteuid() != 0:
        raise SystemExit("bench_hosts.py builds network namespaces: run it as root")
    from netns_cluster import Cluster

    curve_dir = make_curve_dir()
    with Cluster(2) as cluster:
        moved = {"off": transfer(cluster, args.rounds, None),
                 "on": transfer(cluster, args.rounds, curve_dir)}
        gpt = gpt_steps(cluster, args.steps, args.warmup, args.gpt_rounds)
    print(f"100 MB push + pull, host 2 -> host 1 over a veth pair ({args.rounds} rounds)")
    print(f"{'CURVE':<7}{'raw GB/s':>10}{'narun GB/s':>12}{'best/best':>11}"
          f"{'paired median':>15}{'quartiles':>14}")
    for setting, t in moved.items():
        lo, hi = t["paired_quartiles"]
        print(f"{setting:<7}{t['raw']['gb_per_s']:>10.2f}{t['narun']['gb_per_s']:>12.2f}"
              f"{t['ratio']:>11.2f}{t['paired_median']:>15.2f}{f'{lo:.2f}-{hi:.2f}':>14}")
    curve_cost = moved["off"]["narun"]["seconds"] / moved["on"]["narun"]["seconds"]
    raw_cost = moved["off"]["raw"]["seconds"] / moved["on"]["raw"]["seconds"]
    print(f"CURVE on / off throughput: narun {curve_cost:.2f}, raw pyzmq {raw_cost:.2f}")
    base = gpt["one host"]["step_s"]
    print(f"\n{'GPT step, ps-sync 2 trainers + 2 shards':<42}{'step ms':>9}{'tokens/s':>11}"
          f"{'comm+wait':>11}{'vs one host':>13}")
    for name, r in gpt.items():
        print(f"{name:<42}{r['step_s'] * 1e3:>9.1f}{r['tokens_per_s']:>11,.0f}"
              f"{r['comm_share']:>10.1%}{r['step_s'] / base - 1:>+13.1%}")
    print(json.dumps({
        "bench": "hosts", "transfer_100mb": moved, "curve_throughput_ratio": curve_cost,
        "raw_curve_throughput_ratio": raw_cost, "gpt_2x2": gpt,
        "gpt_two_hosts_vs_one": gpt["two hosts"]["step_s"] / base,
        "bar_transfer_ok": all(t["paired_median"] >= 0.8 for t in moved.values()),
        "gpt": bench_dp.GPT}))


if __name__ == "__main__":
    main()
