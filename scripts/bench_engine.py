#!/usr/bin/env python3
"""Training-step throughput of narun's engine vs PyTorch on the same models.

Models: (a) a GPT-style decoder (4 layers, d_model 256, 4 heads, seq 128, batch 16,
vocab 256, RMSNorm, RoPE, SwiGLU hidden 2*d, tied head, Adam); (b) an MLP
784-1024-1024-10, batch 256, ReLU, Adam. A step is forward + cross_entropy + backward +
optimizer step. Each (framework, model, threads) runs in a fresh process with its BLAS
thread count set before import; narun and torch alternate over --rounds rounds so drift
hits both alike, and each keeps its best round (noise on a shared machine only adds time).

    python scripts/bench_engine.py              # full table + JSON line
    python scripts/bench_engine.py --steps 5    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

GPT = dict(n_layer=4, n_embd=256, n_head=4, seq=128, batch=16, vocab=256)
MLP = dict(sizes=(784, 1024, 1024, 10), batch=256)


# ---- the workloads, one per framework ----------------------------------------------------
def training_step(opt, loss_fn):
    """One step as both frameworks spell it: zero_grad, forward + loss, backward, update."""

    def step() -> float:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def narun_step(model_name: str):
    import numpy as np

    import narun
    from narun.models import GPT as NGPT
    from narun.models import MLP as NMLP
    from narun.models import gpt_config
    from narun.nn import functional as F

    narun.manual_seed(0)
    rng = np.random.default_rng(0)
    if model_name == "gpt":
        cfg = gpt_config("gpt-modern-tiny", n_layer=GPT["n_layer"], n_embd=GPT["n_embd"],
                         n_head=GPT["n_head"], block_size=GPT["seq"], vocab_size=GPT["vocab"])
        model = NGPT(cfg)
        x = narun.tensor(rng.integers(0, GPT["vocab"], (GPT["batch"], GPT["seq"])))
        y = narun.tensor(rng.integers(0, GPT["vocab"], (GPT["batch"], GPT["seq"])))

        def loss_fn():
            return model.loss(x, y)
    else:
        model = NMLP(MLP["sizes"], "relu")
        x = narun.tensor(rng.standard_normal((MLP["batch"], 784)).astype(np.float32))
        y = narun.tensor(rng.integers(0, 10, MLP["batch"]))

        def loss_fn():
            return F.cross_entropy(model(x), y)

    return training_step(narun.optim.Adam(model.parameters(), lr=1e-4), loss_fn)


def torch_step(model_name: str):
    import torch
    import torch.nn as tnn
    import torch.nn.functional as TF

    torch.manual_seed(0)
    if model_name == "gpt":
        d, H, T, V = GPT["n_embd"], GPT["n_head"], GPT["seq"], GPT["vocab"]
        hd = d // H
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        freqs = torch.outer(torch.arange(T).float(), inv)
        cos = torch.cat([freqs.cos(), freqs.cos()], -1)
        sin = torch.cat([freqs.sin(), freqs.sin()], -1)

        def rope(x):
            x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
            return x * cos + torch.cat([-x2, x1], -1) * sin

        class Block(tnn.Module):
            def __init__(self):
                super().__init__()
                self.ln_1, self.ln_2 = tnn.RMSNorm(d), tnn.RMSNorm(d)
                self.qkv = tnn.Linear(d, 3 * d, bias=False)
                self.proj = tnn.Linear(d, d, bias=False)
                self.w1 = tnn.Linear(d, 2 * d, bias=False)
                self.w3 = tnn.Linear(d, 2 * d, bias=False)
                self.w2 = tnn.Linear(2 * d, d, bias=False)

            def forward(self, x):
                B = x.shape[0]
                q, k, v = self.qkv(self.ln_1(x)).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
                y = TF.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
                x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
                h = self.ln_2(x)
                return x + self.w2(TF.silu(self.w1(h)) * self.w3(h))

        class Model(tnn.Module):
            def __init__(self):
                super().__init__()
                self.wte = tnn.Embedding(V, d)
                self.h = tnn.ModuleList([Block() for _ in range(GPT["n_layer"])])
                self.ln_f = tnn.RMSNorm(d)

            def forward(self, idx):
                x = self.wte(idx)
                for b in self.h:
                    x = b(x)
                return self.ln_f(x) @ self.wte.weight.T

        model = Model()
        x = torch.randint(0, V, (GPT["batch"], T))
        y = torch.randint(0, V, (GPT["batch"], T))

        def loss_fn():
            return TF.cross_entropy(model(x).view(-1, V), y.view(-1))
    else:
        s = MLP["sizes"]
        model = tnn.Sequential(tnn.Linear(s[0], s[1]), tnn.ReLU(), tnn.Linear(s[1], s[2]),
                               tnn.ReLU(), tnn.Linear(s[2], s[3]))
        x = torch.randn(MLP["batch"], s[0])
        y = torch.randint(0, 10, (MLP["batch"],))

        def loss_fn():
            return TF.cross_entropy(model(x), y)

    return training_step(torch.optim.Adam(model.parameters(), lr=1e-4), loss_fn)


def time_steps(step, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls of `step`, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def worker(framework: str, model: str, threads: int, steps: int, warmup: int) -> None:
    if framework == "torch":
        import torch

        torch.set_num_threads(threads)
        step = torch_step(model)
    else:  # as a library user runs it: only what `import narun` does itself
        step = narun_step(model)
    times = time_steps(step, steps, warmup)
    per_step = GPT["batch"] * GPT["seq"] if model == "gpt" else MLP["batch"]
    med = statistics.median(times)
    print(json.dumps({"median_step_s": med, "throughput": per_step / med,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_one(framework: str, model: str, threads: int, steps: int, warmup: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    out = subprocess.run(
        [sys.executable, __file__, "--worker", framework, model, str(threads),
         "--steps", str(steps), "--warmup", str(warmup)],
        env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{framework}/{model}/{threads} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=3, metavar=("FRAMEWORK", "MODEL", "THREADS"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--models", default="gpt,mlp")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    if args.worker:
        fw, model, threads = args.worker
        worker(fw, model, int(threads), args.steps, args.warmup)
        return
    try:
        import torch  # noqa: F401
        have_torch = not args.no_torch
    except ImportError:
        have_torch = False
    frameworks = ["narun", "torch"] if have_torch else ["narun"]
    results: dict[str, dict] = {}
    print(f"{'model':5} {'threads':>7} {'framework':>9} {'throughput':>12} {'unit':>9} "
          f"{'step ms':>8} {'peak RSS MB':>11} {'narun/torch':>11}")
    for model in args.models.split(","):
        steps = args.steps if model == "gpt" else args.steps * 3
        unit = "tokens/s" if model == "gpt" else "samples/s"
        for threads in (int(t) for t in args.threads.split(",")):
            row: dict[str, dict] = {}
            for _ in range(args.rounds):
                for fw in frameworks:
                    r = run_one(fw, model, threads, steps, args.warmup)
                    if fw not in row or r["throughput"] > row[fw]["throughput"]:
                        row[fw] = r
            key = f"{model}_t{threads}"
            results[key] = {fw: row[fw] for fw in frameworks}
            ratio = None
            if have_torch:
                ratio = row["narun"]["throughput"] / row["torch"]["throughput"]
                results[key]["ratio"] = ratio
            for fw in frameworks:
                r = row[fw]
                shown = f"{ratio:11.2f}" if (ratio is not None and fw == "narun") else " " * 11
                print(f"{model:5} {threads:>7} {fw:>9} {r['throughput']:12.0f} {unit:>9} "
                      f"{r['median_step_s'] * 1e3:8.1f} {r['peak_rss_mb']:11.0f} {shown}")
    print(json.dumps({"bench": "engine", "results": results}))


if __name__ == "__main__":
    main()
