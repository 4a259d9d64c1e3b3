"""Helpers of the inference server's tests: a small GPT checkpoint, and a server running in
the test's own event loop (its workers are real processes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

import narun
from narun.checkpoint import save_checkpoint
from narun.config import load_config, to_dict
from narun.models import load_trained
from narun.serve.server import InferenceServer

ROOT = Path(__file__).resolve().parents[2]


def make_checkpoint(directory: Path, block_size: int = 64, seed: int = 0,
                    **model: int) -> Path:
    """A randomly initialised quickstart GPT (gpt2-tiny, byte vocabulary; `model` overrides
    fields such as n_layer) saved as a run: random weights make varied greedy tokens, which
    is what equality tests need."""
    from narun.models._registry import build_from_config

    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      [f"model.block_size={block_size}", f"data.seq_len={block_size}",
                       *(f"model.{k}={v}" for k, v in model.items())])
    narun.manual_seed(seed)
    model = build_from_config(cfg.model)
    save_checkpoint(directory / "checkpoints", 1, model.state_dict(), None,
                    {"config": to_dict(cfg)})
    return directory


def reference_tokens(checkpoint: Path, prompt: list[int], n: int, **kw) -> list[int]:
    """What one process's GPT.generate makes for `prompt`: the tokens a server must send."""
    model = load_trained(checkpoint).model
    out = model.generate(np.asarray(prompt)[None], n, **kw)
    return out[0, len(prompt):].tolist()


@contextlib.asynccontextmanager
async def running_server(checkpoint: Path, **options) -> AsyncIterator[InferenceServer]:
    server = InferenceServer(str(checkpoint), "tcp://127.0.0.1:0", signals=False, **options)
    task = asyncio.create_task(server.run())
    try:
        while not server.accepting:
            if task.done():
                task.result()  # raises why it could not start
                raise AssertionError("the server returned before it served")
            await asyncio.sleep(0.02)
        yield server
    finally:
        server.stop()
        await asyncio.wait_for(task, 60)
