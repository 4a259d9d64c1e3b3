#!/usr/bin/env python3
"""Peak memory of the parameter-server shards: what holding a slice of a ~25 M-parameter
GPT costs a shard process.

A ps-sync job (2 trainers + 2 shards by default) of a byte GPT with 8 layers, d_model 512,
8 heads, vocab 256 (25.4 M parameters, 102 MB of float32), AdamW, runs a few steps and
checkpoints (`fresh`); a second job resumes from that checkpoint and runs as many steps
more (`resume`). Each job runs in its own process, so the coordinator's figure is its own.
While a job runs, a thread reads the peak resident set (VmHWM in /proc/PID/status) of
every worker it started, every 20 ms, until the process is gone; the last reading is the
process's peak, since VmHWM never decreases.

    python scripts/bench_shard_memory.py              # table + JSON line
    python scripts/bench_shard_memory.py --steps 2 --shards 4

The last line is JSON. Figures are MB (10^6 bytes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPT = dict(n_layer=8, n_embd=512, n_head=8, seq=64, batch=2, vocab=256)
POLL_S = 0.02


def gpt_config(workers: int, shards: int, steps: int, out: str):
    import narun.models  # noqa: F401  (registers model config fields)
    from narun.config import config_from_dict

    return config_from_dict({
        "model": {"name": "gpt", "preset": "gpt2-tiny", "n_layer": GPT["n_layer"],
                  "n_embd": GPT["n_embd"], "n_head": GPT["n_head"],
                  "block_size": GPT["seq"], "vocab_size": GPT["vocab"]},
        "data": {"kind": "text", "seq_len": GPT["seq"]},
        "training": {"steps": steps, "batch_size": GPT["batch"], "optimizer": "adamw",
                     "lr": 1e-4, "weight_decay": 0.1, "schedule": "constant",
                     "warmup_steps": 0, "grad_clip": 1.0, "eval_every": 0,
                     "checkpoint_every": 0, "out_dir": out},
        "runtime": {"mode": "ps-sync", "workers": workers, "ps_shards": shards,
                    "heartbeat_timeout": 30.0}})


def peak_rss(pid: int | str) -> int | None:
    """VmHWM of a process in bytes; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def run_job(run: str, workers: int, shards: int, steps: int, out: str) -> dict:
    import uvloop

    from narun._process import tune_process
    from narun.events import ListReporter
    from narun.runtime import Coordinator

    tune_process(1)  # as `narun train` and every worker do
    total = steps if run == "fresh" else 2 * steps
    cfg = gpt_config(workers, shards, total, out)
    coordinator = Coordinator(cfg, ListReporter(), "auto" if run == "resume" else None,
                              stop_at=steps if run == "fresh" else None)
    peaks: dict[tuple[str, int], int] = {}
    seen: dict[int, tuple[str, int]] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for c in list(getattr(coordinator, "children", [])):
                seen.setdefault(c.pid, (c.role, c.rank))
            for pid, who in seen.items():
                rss = peak_rss(pid)
                if rss is not None:
                    peaks[who] = max(peaks.get(who, 0), rss)
            time.sleep(POLL_S)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        done = uvloop.run(coordinator.run())
    finally:
        stop.set()
        watcher.join()
    params = sum(p.data.size for p in coordinator.job.model.parameters())
    return {"run": run, "step": done["step"], "params": int(params),
            "model_bytes": int(params) * 4,
            "coordinator_peak": peak_rss("self"),
            "peaks": [{"role": r, "rank": k, "peak": v} for (r, k), v in sorted(peaks.items())]}


def run_child(run: str, args: argparse.Namespace, out: str) -> dict:
    from narun._process import blas_env

    cmd = [sys.executable, __file__, "--child", run, "--steps", str(args.steps),
           "--workers", str(args.workers), "--shards", str(args.shards), "--out", out]
    done = subprocess.run(cmd, env={**os.environ, **blas_env(1)}, capture_output=True,
                          text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"bench {run} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="steps of each job")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--child", choices=("fresh", "resume"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import structlog

        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=io.StringIO()))
        print(json.dumps(run_job(args.child, args.workers, args.shards, args.steps,
                                 args.out)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="bench_shard_memory_") as out:
        runs = [run_child(run, args, out) for run in ("fresh", "resume")]
    params, model_bytes = runs[0]["params"], runs[0]["model_bytes"]
    print(f"GPT {GPT['n_layer']} layers, d_model {GPT['n_embd']}, vocab {GPT['vocab']}: "
          f"{params:,} parameters, {model_bytes / 1e6:.1f} MB float32; "
          f"{args.workers} trainers + {args.shards} shards, ps-sync, AdamW, "
          f"{args.steps} steps per job")
    print(f"{'job':<8}{'process':<14}{'peak RSS MB':>12}{'x model':>9}")
    for r in runs:
        rows = [(f"{x['role']} {x['rank']}", x["peak"]) for x in r["peaks"]]
        rows.append(("coordinator", r["coordinator_peak"]))
        for name, peak in rows:
            print(f"{r['run']:<8}{name:<14}{peak / 1e6:>12.0f}{peak / model_bytes:>9.2f}")
    print(json.dumps({"bench": "shard_memory", "gpt": GPT, "params": params,
                      "model_bytes": model_bytes, "workers": args.workers,
                      "shards": args.shards, "steps": args.steps, "runs": runs}))


if __name__ == "__main__":
    main()
