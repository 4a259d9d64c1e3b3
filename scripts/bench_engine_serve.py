#!/usr/bin/env python3
"""Generated tokens/s of the serving engine (narun.serve.Engine) with 1, 8 and 32 concurrent
streams, against the same requests one at a time through GPT.generate.

Model: the gpt2-tiny preset (4 layers, d 128, 4 heads, vocab 256) with --block-size 128 as
configs/quickstart.yaml serves it, float32, CPU, random weights (throughput does not depend on
them). Each request: a 64-token prompt, 64 new tokens, greedy. A run adds all its requests at
once and steps until idle, so its time includes every prefill. Each measurement keeps its
best of --rounds (noise on a shared machine only adds time). BLAS threads are set before NumPy
loads (--threads).

    python scripts/bench_engine_serve.py                # table + JSON line
    python scripts/bench_engine_serve.py --profile 32   # where one 32-stream step's time goes
    python scripts/bench_engine_serve.py --clock cpu    # CPU time: steadier on a busy machine

"x 1-str" is a run's tokens/s over the engine's with one stream: the issue's ratio bar.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# what a run is timed with: wall time, or the process's CPU time (--clock cpu), which other
# processes on a shared machine inflate far less (the bench runs on one thread)
CLOCK = [time.perf_counter]


def build(block_size: int, seed: int = 0):
    import numpy as np

    import narun
    from narun.models import GPT, gpt_config

    narun.manual_seed(seed)
    model = GPT(gpt_config("gpt2-tiny", block_size=block_size))
    model.to(dtype=np.float32)
    return model


def prompts(n: int, length: int, seed: int = 1):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, length) for _ in range(n)]


def run_engine(model, ps, n_new: int, prefill_chunk: int) -> tuple[float, int, int]:
    from narun.serve import Engine

    engine = Engine(model, max_batch=len(ps), prefill_chunk=prefill_chunk)
    t0 = CLOCK[0]()
    for i, p in enumerate(ps):
        engine.add(i, p, max_new_tokens=n_new)
    made = steps = 0
    while not engine.idle:
        made += sum(o.token is not None for o in engine.step())
        steps += 1
    return CLOCK[0]() - t0, made, steps


def run_generate(model, ps, n_new: int) -> tuple[float, int]:
    t0 = CLOCK[0]()
    made = 0
    for p in ps:
        made += model.generate(p[None], n_new, temperature=0.0).shape[1] - len(p)
    return CLOCK[0]() - t0, made


def best(fn, rounds: int):
    runs = [fn() for _ in range(rounds)]
    return min(runs, key=lambda r: r[0])


def profile(model, streams: int, prompt: int, n_new: int, prefill_chunk: int) -> None:
    """cProfile of decode steps with `streams` sequences running (prefill done first)."""
    import cProfile
    import pstats

    from narun.serve import Engine

    engine = Engine(model, max_batch=streams, prefill_chunk=prefill_chunk)
    for i, p in enumerate(prompts(streams, prompt)):
        engine.add(i, p, max_new_tokens=n_new)
    while any(engine._slots[i] is None or engine._slots[i].prefilling  # noqa: SLF001
              for i in range(streams)):
        engine.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        engine.step()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--block-size", type=int, default=128,
                    help="the model's context (quickstart.yaml: 128); prompt + new must fit")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prefill-chunk", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", type=int, metavar="STREAMS")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: time runs by process CPU time, steadier on a busy machine")
    args = ap.parse_args()
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if args.prompt + args.new > args.block_size:
        ap.error(f"--prompt {args.prompt} + --new {args.new} exceeds --block-size "
                 f"{args.block_size}")
    model = build(args.block_size)
    if args.profile:
        profile(model, args.profile, args.prompt, args.new, args.prefill_chunk)
        return

    # the single-stream baseline: requests one at a time through GPT.generate
    n_base = 4
    g_s, g_made = best(lambda: run_generate(model, prompts(n_base, args.prompt), args.new),
                       args.rounds)
    base = g_made / g_s
    rows = [("generate, one at a time", 1, g_made, g_s, base, None)]
    result = {"generate_tok_s": round(base, 1), "engine": {}}
    for n in args.streams:
        e_s, made, steps = best(
            lambda n=n: run_engine(model, prompts(n, args.prompt), args.new, args.prefill_chunk),
            args.rounds)
        rows.append((f"engine, {n} concurrent", n, made, e_s, made / e_s, e_s / steps))
        result["engine"][str(n)] = {"tok_s": round(made / e_s, 1),
                                    "x_generate": round(made / e_s / base, 2),
                                    "ms_per_step": round(1e3 * e_s / steps, 3)}

    print(f"gpt2-tiny block {args.block_size} float32, CPU, {args.threads} BLAS thread(s); "
          f"{args.clock} clock, prompt {args.prompt}, "
          f"{args.new} new tokens, greedy, prefill_chunk {args.prefill_chunk}, "
          f"best of {args.rounds}")
    print(f"{'mode':<26}{'streams':>8}{'tokens':>8}{'seconds':>9}{'tok/s':>9}"
          f"{'x gen':>7}{'ms/step':>9}{'x 1-str':>8}")
    # the ratio bar: n streams against the engine serving one stream
    one = next((rate for _, n, _, _, rate, step in rows if n == 1 and step is not None), None)
    for name, n, made, secs, rate, per_step in rows:
        step = "" if per_step is None else f"{1e3 * per_step:9.2f}"
        x_one = "" if one is None or per_step is None else f"{rate / one:8.2f}"
        print(f"{name:<26}{n:>8}{made:>8}{secs:>9.3f}{rate:>9.0f}{rate / base:>7.2f}{step}"
              f"{x_one}")
        if x_one:
            result["engine"][str(n)]["x_engine_1"] = round(rate / one, 2)
    sys.stdout.flush()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
