#!/usr/bin/env python3
"""Chaos: run a data-parallel job while killing a random process every few seconds.

Runs the job twice in this process's coordinator: unfaulted, then with one random live
trainer or parameter-server shard killed with SIGKILL every `--every` seconds (from the
first reported step) until `--kills` processes have died. Reports completed steps,
restarts, lost work (steps redone after rolling back to a checkpoint) and the final
validation loss of both runs. The job's restart budget is raised to the number of kills.

The default job is a small GPT (2 layers, d_model 64, 64-byte windows) on the CPython docs
text, checkpointing every 50 steps: long enough for the kills, meaningful losses.

    python scripts/chaos.py                                # 4 kills, every 3 s, ps-sync
    python scripts/chaos.py --mode ps-async --kills 6 --every 2
    python scripts/chaos.py --roles trainer                # kill trainers only

The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def job_config(args: argparse.Namespace, out: str) -> Any:
    import narun.models  # noqa: F401
    from narun.config import config_from_dict

    return config_from_dict({
        "model": {"name": "gpt", "preset": "gpt-modern-tiny", "n_layer": 2, "n_embd": 64,
                  "n_head": 4, "block_size": 64, "vocab_size": 256},
        "data": {"kind": "text", "seq_len": 64},
        "training": {"steps": args.steps, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3,
                     "weight_decay": 0.1, "schedule": "cosine", "warmup_steps": 20,
                     "grad_clip": None, "eval_every": 0, "checkpoint_every": 50,
                     "keep_checkpoints": 2, "out_dir": out},
        "runtime": {"mode": args.mode, "workers": args.workers, "ps_shards": args.ps_shards,
                    "heartbeat_interval": 0.5, "heartbeat_timeout": 5.0,
                    "max_restarts": args.kills, "rejoin_timeout": 10.0}})


class Events:
    """A reporter that keeps the events and marks the first step."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.first_step = asyncio.Event()

    def start(self, total_steps: int, first_step: int) -> None:
        return None

    def emit(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})
        if event == "step":
            self.first_step.set()

    def close(self) -> None:
        return None


async def kill_randomly(coordinator: Any, events: Events, every: float, kills: int,
                        roles: set[str], rng: random.Random, log: list[dict]) -> None:
    await events.first_step.wait()
    began = time.monotonic()
    while len(log) < kills:
        await asyncio.sleep(every)
        victims = [c for c in coordinator.live_children() if c.role in roles]
        if not victims:
            continue
        victim = rng.choice(victims)
        os.kill(victim.pid, signal.SIGKILL)
        step = max((e["step"] for e in events.events if e["event"] == "step"), default=0)
        log.append({"at_s": round(time.monotonic() - began, 2), "role": victim.role,
                    "rank": victim.rank, "pid": victim.pid, "step": step})
        print(f"  kill {len(log)}: {victim.name} (pid {victim.pid}) at step {step}",
              file=sys.stderr, flush=True)


def run(args: argparse.Namespace, kills: int) -> dict[str, Any]:
    import uvloop

    from narun.runtime import Coordinator

    out = tempfile.mkdtemp(prefix="narun_chaos_")
    events = Events()
    coordinator = Coordinator(job_config(args, out), events)  # type: ignore[arg-type]
    log: list[dict] = []

    async def main() -> dict[str, Any]:
        chaos = asyncio.ensure_future(kill_randomly(
            coordinator, events, args.every, kills, set(args.roles.split(",")),
            random.Random(args.seed), log))
        try:
            return await coordinator.run()
        finally:
            chaos.cancel()

    began = time.perf_counter()
    done = uvloop.run(main())
    steps = [e["step"] for e in events.events if e["event"] == "step"]
    return {"kills": log, "completed_step": done["step"], "steps_run": len(steps),
            "restarts": done["restarts"], "steps_redone": done["steps_redone"],
            "restart_events": sum(e["event"] == "restart" for e in events.events),
            "val_loss": done["val_loss"], "seconds": time.perf_counter() - began}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--every", type=float, default=3.0, help="seconds between kills")
    p.add_argument("--kills", type=int, default=4, help="processes to kill")
    p.add_argument("--mode", choices=("ps-sync", "ps-async"), default="ps-sync")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ps-shards", type=int, default=2)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--roles", default="trainer,ps", help="whom to kill: trainer,ps")
    p.add_argument("--seed", type=int, default=0, help="picks the victims")
    args = p.parse_args(argv)
    from narun import logs

    logs.configure(json_lines=False, level="error")  # the table below is the output
    print(f"unfaulted run ({args.mode}, {args.workers} trainers, {args.ps_shards} shards, "
          f"{args.steps} steps)...", file=sys.stderr, flush=True)
    base = run(args, 0)
    print(f"faulted run: {args.kills} kills, one every {args.every:g} s...", file=sys.stderr,
          flush=True)
    chaos = run(args, args.kills)
    ratio = chaos["val_loss"] / base["val_loss"]
    print(f"\n{'run':10} {'steps':>6} {'kills':>6} {'restarts':>9} {'redone':>7} "
          f"{'seconds':>8} {'val_loss':>9}")
    for name, r in (("unfaulted", base), ("faulted", chaos)):
        print(f"{name:10} {r['completed_step']:>6} {len(r['kills']):>6} {r['restarts']:>9} "
              f"{r['steps_redone']:>7} {r['seconds']:>8.1f} {r['val_loss']:>9.4f}")
    print(f"final val_loss faulted / unfaulted = {ratio:.4f}")
    print(json.dumps({"mode": args.mode, "workers": args.workers, "ps_shards": args.ps_shards,
                      "steps": args.steps, "every_s": args.every, "unfaulted": base,
                      "faulted": chaos, "val_loss_ratio": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
