#!/usr/bin/env python3
"""Pipeline-parallel training against one process: tokens/s, step time, the bubble, and the
activations each stage holds.

Model: the GPT of scripts/bench_engine.py grown to 8 layers (gpt-modern-tiny: d_model 256,
4 heads, seq 128, batch 16, vocab 256; Adam), trained on the CPython docs text. Runs, each
`narun train` in a fresh process, alone or over stage processes (`--stages 2`):
- one process with 1 BLAS thread, and with 2 (both cores);
- 2 stages (1 BLAS thread each) with 2, 4 and 8 micro-batches under gpipe and 1f1b.
Per run: the median step time and tokens/s over the steps after --warmup (the fastest of
--rounds interleaved runs); per stage, its measured bubble (1 - seconds in forward,
backward and the optimizer step / step time, medians) beside the theoretical
(p - 1) / (m + p - 1), the most micro-batches' activations it held at once (GPipe holds
all m, 1F1B at most p - stage) and its peak resident memory, where what the held
activations cost shows.

    python scripts/bench_pipeline.py               # table, the bar, then a JSON line
    python scripts/bench_pipeline.py --steps 8 --rounds 1    # quicker

The bar (issue 16): 2 stages, 8 micro-batches, 1F1B reach >= 1.5x one process's tokens/s
(1 BLAS thread) and beat one process with 2 BLAS threads; the measured bubble is within 5
points of the theoretical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

N_LAYER = 8  # bench_engine's GPT (and bench_dp's job) with twice the layers


def job_config(mode: str, stages: int, micro_batches: int, schedule: str, steps: int,
               out: str) -> dict:
    """bench_dp's GPT job (the same model, data and optimizer) in `mode`, 8 layers."""
    from bench_dp import GPT, gpt_config

    from narun.config import to_dict

    config = to_dict(gpt_config("local", 0, 1, steps, out))
    config["model"]["n_layer"] = N_LAYER
    config["runtime"].update(mode=mode, stages=stages, micro_batches=micro_batches,
                             schedule=schedule)
    assert config["training"]["batch_size"] == GPT["batch"]
    return config


def run(mode: str, threads: int, stages: int, micro_batches: int, schedule: str, steps: int,
        warmup: int) -> dict:
    """One `narun train` in a fresh process (its BLAS threads fixed before NumPy loads)."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        config = Path(tmp) / "job.yaml"
        config.write_text(yaml.safe_dump(job_config(mode, stages, micro_batches, schedule,
                                                    steps, str(Path(tmp) / "run"))))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        proc = subprocess.run([sys.executable, "-m", "narun.cli", "train", str(config),
                               "--json"], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"narun train ({mode}, {stages} stages, m {micro_batches}, "
                             f"{schedule}) failed:\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    steps_ev = [e for e in events if e.get("event") == "step"][warmup:]
    from bench_dp import GPT

    tokens = GPT["batch"] * GPT["seq"]
    step_s = statistics.median(tokens / e["tokens_per_s"] for e in steps_ev)
    result = {"mode": mode, "threads": threads, "stages": stages,
              "micro_batches": micro_batches, "schedule": schedule, "step_s": step_s,
              "tokens_per_s": tokens / step_s}
    if mode == "pipeline":
        per_stage = []
        for s in range(stages):
            rows = [e["stages"][s] for e in steps_ev]
            per_stage.append({
                "bubble": statistics.median(1 - r["busy"] / r["step"] for r in rows),
                "held": max(r["held"] for r in rows),
                "rss_mb": max(r["rss_mb"] for r in rows)})
        result["per_stage"] = per_stage
        result["theoretical_bubble"] = (stages - 1) / (micro_batches + stages - 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rounds", type=int, default=2,
                    help="run every configuration this many times, the rounds interleaved, "
                         "and keep each one's fastest (noise on a shared machine only slows)")
    args = ap.parse_args()
    configs = [("local", 1, 0, 1, "1f1b"), ("local", 2, 0, 1, "1f1b")]
    configs += [("pipeline", 1, 2, m, schedule) for m in args.micro_batches
                for schedule in ("gpipe", "1f1b")]
    rounds = [[run(*c, args.steps, args.warmup) for c in configs] for _ in range(args.rounds)]
    runs = [max(tries, key=lambda r: r["tokens_per_s"]) for tries in zip(*rounds)]
    for r, tries in zip(runs, zip(*rounds)):
        r["tokens_per_s_rounds"] = [round(t["tokens_per_s"], 1) for t in tries]
    from bench_dp import GPT

    base = runs[0]["tokens_per_s"]
    print(f"GPT gpt-modern-tiny, {N_LAYER} layers, d {GPT['n_embd']}, seq {GPT['seq']}, "
          f"batch {GPT['batch']}; median of steps {args.warmup + 1}..{args.steps}")
    print(f"{'run':<28}{'tok/s':>8}{'x 1 proc':>9}{'step ms':>9}  "
          f"{'bubble per stage (theory)':<28}{'held (peak RSS MB)':<24}")
    for r in runs:
        if r["mode"] == "local":
            name = f"one process, {r['threads']} thread(s)"
            extra = ""
        else:
            name = f"2 stages, m {r['micro_batches']}, {r['schedule']}"
            bubbles = " ".join(f"{s['bubble']:.2f}" for s in r["per_stage"])
            held = " ".join(f"{s['held']} ({s['rss_mb']:.0f})" for s in r["per_stage"])
            theory = f"{r['theoretical_bubble']:.2f}"
            extra = f"  {bubbles + ' (' + theory + ')':<28}{held:<24}"
        print(f"{name:<28}{r['tokens_per_s']:>8.0f}{r['tokens_per_s'] / base:>9.2f}"
              f"{1e3 * r['step_s']:>9.1f}{extra}")
    bar = next((r for r in runs if r["mode"] == "pipeline" and r["micro_batches"] == 8
                and r["schedule"] == "1f1b"), None)
    bars = {}
    if bar is not None:
        two = runs[1]["tokens_per_s"]
        worst = max(abs(s["bubble"] - bar["theoretical_bubble"]) for s in bar["per_stage"])
        bars = {"x_one_process_1_thread": round(bar["tokens_per_s"] / base, 2),
                "x_one_process_2_threads": round(bar["tokens_per_s"] / two, 2),
                "bubble_off_by": round(worst, 3)}
        x1, x2 = bars["x_one_process_1_thread"], bars["x_one_process_2_threads"]
        print(f"\n2 stages, m 8, 1f1b / one process 1 thread    {x1:.2f}"
              f"   bar >= 1.5: {'PASS' if x1 >= 1.5 else 'FAIL'}")
        print(f"2 stages, m 8, 1f1b / one process 2 threads   {x2:.2f}"
              f"   bar > 1: {'PASS' if x2 > 1 else 'FAIL'}")
        print(f"bubble: measured - theoretical, worst stage   {bars['bubble_off_by']:.3f}"
              f"   bar <= 0.05: {'PASS' if bars['bubble_off_by'] <= 0.05 else 'FAIL'}")
    print(json.dumps({"bench": "pipeline", "runs": runs, "bars": bars}))


if __name__ == "__main__":
    main()
