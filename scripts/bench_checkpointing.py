#!/usr/bin/env python3
"""Gradient checkpointing's trade: memory held for backward against recomputation time.

Model: the GPT of scripts/bench_engine.py with 8 layers (gpt-modern-tiny: d_model 256, 4
heads, seq 128, batch 16, vocab 256), one training step (forward, cross-entropy, backward,
Adam), with and without `model.gradient_checkpointing` (narun.utils.checkpoint around each
block). Each variant runs in a fresh process: after --warmup steps, the peak of NumPy's
allocations during one step (tracemalloc, which NumPy reports to) above what is allocated
before it, the process's peak RSS, and the median step time of --steps steps.

    python scripts/bench_checkpointing.py            # table, then a JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(recompute: bool, steps: int, warmup: int) -> dict:
    """In this process: one variant's step memory and time."""
    import tracemalloc

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from bench_engine import time_steps, training_step

    import narun
    from narun.models import GPT, gpt_config

    narun.manual_seed(0)
    model = GPT(gpt_config("gpt-modern-tiny", n_layer=8, n_embd=256, n_head=4, block_size=128,
                           vocab_size=256, gradient_checkpointing=recompute)).train()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (16, 128)), rng.integers(0, 256, (16, 128))
    step = training_step(narun.optim.Adam(model.parameters(), lr=1e-4),
                         lambda: model.loss(x, y))
    times = time_steps(step, steps, warmup)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    step()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return {"gradient_checkpointing": recompute, "step_peak_mb": peak / 2**20,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_ms": statistics.median(times) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--one", choices=("plain", "recompute"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one == "recompute", args.steps, args.warmup)))
        return
    rows = []
    for variant in ("plain", "recompute"):
        out = subprocess.run([sys.executable, __file__, "--one", variant, "--steps",
                              str(args.steps), "--warmup", str(args.warmup)],
                             capture_output=True, text=True, check=True, cwd=ROOT,
                             env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        rows.append(json.loads(out.stdout.splitlines()[-1]))
    print("GPT gpt-modern-tiny, 8 layers, d 256, seq 128, batch 16, Adam, 1 BLAS thread")
    print(f"{'run':<28} {'step peak MB':>12} {'peak RSS MB':>12} {'step ms':>8}")
    for r in rows:
        name = "gradient checkpointing" if r["gradient_checkpointing"] else "plain"
        print(f"{name:<28} {r['step_peak_mb']:>12.1f} {r['rss_mb']:>12.1f} {r['step_ms']:>8.1f}")
    plain, recompute = rows
    ratio = recompute["step_peak_mb"] / plain["step_peak_mb"]
    slower = recompute["step_ms"] / plain["step_ms"]
    print(f"\nstep memory with / without: {ratio:.2f}; step time with / without: {slower:.2f}")
    print(json.dumps({"bench": "checkpointing", "runs": rows, "memory_ratio": round(ratio, 3),
                      "time_ratio": round(slower, 3)}))


if __name__ == "__main__":
    main()
