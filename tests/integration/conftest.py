"""Fixtures for runtime tests with real processes on loopback: a blobs dataset and a tiny
MLP job config (dropout-free, float32) whose runs take a few seconds on 2 cores, and a
reporter that signals the job's processes at given steps."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import narun.models  # noqa: F401  (registers model config fields)
from narun.checkpoint import load_checkpoint
from narun.config import JobConfig, config_from_dict
from narun.events import JsonLinesReporter
from narun.runtime import Coordinator, launcher


@pytest.fixture(scope="session")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 3.0, (4, 16))
    y = rng.integers(0, 4, 600)
    x = (centers[y] + rng.normal(0.0, 1.0, (600, 16))).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    np.savez(path, x=x, y=y.astype(np.int64))
    return path


def mlp_config(blobs: Path, out_dir: Path, mode: str = "ps-sync", workers: int = 2,
               shards: int = 2, heartbeat_timeout: float = 5.0, max_restarts: int = 3,
               rejoin_timeout: float = 30.0, device: str = "cpu",
               **training: Any) -> JobConfig:
    t = {"steps": 10, "batch_size": 12, "optimizer": "adamw", "lr": 1e-2,
         "weight_decay": 0.1, "schedule": "cosine", "warmup_steps": 2, "grad_clip": None,
         "eval_every": 0, "checkpoint_every": 0, "out_dir": str(out_dir)}
    t.update(training)
    return config_from_dict({
        "model": {"name": "mlp", "sizes": [16, 32, 4], "activation": "relu"},
        "data": {"kind": "arrays", "path": str(blobs), "val_fraction": 0.1},
        "training": t,
        "runtime": {"mode": mode, "workers": workers, "ps_shards": shards,
                    "max_staleness": 2, "heartbeat_interval": 0.5,
                    "heartbeat_timeout": heartbeat_timeout,
                    "max_restarts": max_restarts, "rejoin_timeout": rejoin_timeout,
                    "device": device}})


@pytest.fixture
def make_config(blobs: Path, tmp_path: Path):
    def make(mode: str = "ps-sync", workers: int = 2, shards: int = 2, out: str = "run",
             **options: Any) -> JobConfig:
        return mlp_config(blobs, tmp_path / out, mode, workers, shards, **options)
    return make


class Faults(JsonLinesReporter):
    """Sends signals to the job's processes when given steps are reported; keeps events."""

    def __init__(self, plan: dict[int, tuple[str, int, int]]) -> None:
        super().__init__(io.StringIO())
        self.plan = dict(plan)
        self.events: list[tuple[str, dict]] = []
        self.coordinator: Coordinator | None = None
        self.signalled: list[tuple[str, int, int, int]] = []  # (role, rank, pid, at step)

    def emit(self, event: str, **fields) -> None:
        super().emit(event, **fields)
        self.events.append((event, fields))
        if event == "step" and fields["step"] in self.plan:
            role, rank, sig = self.plan.pop(fields["step"])
            assert self.coordinator is not None
            child = next(c for c in self.coordinator.children
                         if (c.role, c.rank) == (role, rank))
            self.signalled.append((role, rank, child.pid, fields["step"]))
            os.kill(child.pid, sig)

    def of(self, kind: str) -> list[dict]:
        return [f for e, f in self.events if e == kind]


class Recorder(Coordinator):
    """A coordinator that keeps (rank, step, pid) of every step_done in the order it
    receives them (pid tells a restarted trainer from its predecessor)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reports: list[tuple[int, int, int]] = []

    async def _handle(self, msg: Any, route: bytes | None) -> Any:
        if msg.type == "step_done":
            child = self._current(route) if route is not None else None
            self.reports.append((msg["rank"], msg["step"], child.pid if child else -1))
        return await super()._handle(msg, route)


def gpu_count() -> int:
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # not installed, no driver: no GPU here
        return 0


def assert_all_gone(pids: list[int]) -> None:
    """Every process the run started is gone and reaped."""
    assert pids, "the run started no process"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not set(pids) & set(launcher.live_pids())


def assert_same_checkpoint(a: str, b: str) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step
    assert set(ca.model) == set(cb.model)
    for name in ca.model:
        np.testing.assert_allclose(cb.model[name], ca.model[name], rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    kept = [{i for i, state in c.optimizer["state"].items() if state} for c in (ca, cb)]
    assert kept[0] == kept[1]  # (plain SGD keeps empty states in one process, none here)
    for i, state in ca.optimizer["state"].items():
        for key, value in state.items():
            np.testing.assert_allclose(np.asarray(cb.optimizer["state"][i][key]),
                                       np.asarray(value), rtol=1e-5, atol=1e-9,
                                       err_msg=f"optimizer state {i}.{key}")
    assert cb.extra["scheduler"] == ca.extra["scheduler"]
    assert cb.extra["sampler"] == ca.extra["sampler"]
