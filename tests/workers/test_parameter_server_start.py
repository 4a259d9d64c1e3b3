"""A parameter-server shard starts without the model: from the coordinator's initial-state
file or a checkpoint's byte ranges it holds exactly what cutting its slice out of the whole
job, built and restored in this process, gives: values, optimizer groups and state, lrs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

import narun.models  # noqa: F401  (registers model config fields)
from narun import data, nn
from narun.checkpoint import read_header
from narun.config import config_from_dict, to_dict
from narun.events import JsonLinesReporter
from narun.runtime import shard_start
from narun.runtime.buckets import pack, plan_for
from narun.runtime.shard_start import write_init_state
from narun.runtime.spec import WorkerSpec
from narun.train import build_job, restore
from narun.train import train as local_train
from tests.integration.conftest import mlp_config
from workers.parameter_server import ParameterServer

GPT_BUCKET, MLP_BUCKET = 4096, 512  # bytes: several buckets per shard, tensors split


def gpt_config(out, mode="ps-sync", shards=3, optimizer="adamw", **training):
    """A tiny byte GPT: a tied embedding (one parameter under two names), matrices with
    weight decay and vectors without, a warmup + cosine schedule."""
    t = {"steps": 8, "batch_size": 4, "optimizer": optimizer, "lr": 1e-2,
         "weight_decay": 0.1, "schedule": "cosine", "warmup_steps": 2, "grad_clip": None,
         "eval_every": 0, "checkpoint_every": 0, "out_dir": str(out)}
    t.update(training)
    return config_from_dict({
        "model": {"name": "gpt", "preset": "gpt2-tiny", "n_layer": 1, "n_embd": 16,
                  "n_head": 2, "block_size": 16, "dropout": 0.0, "tie_weights": True},
        "data": {"kind": "text", "seq_len": 16},
        "training": t,
        "runtime": {"mode": mode, "workers": 2 if mode != "local" else 0,
                    "ps_shards": shards}})


def configs(kind, blobs, out, **training):
    """(local config, ps-sync config, bucket bytes) of the GPT or the MLP job."""
    if kind == "gpt":
        return (gpt_config(out / "local", "local", **training),
                gpt_config(out / "dist", **training), GPT_BUCKET)
    return (mlp_config(blobs, out / "local", "local", 0, **training),
            mlp_config(blobs, out / "dist", "ps-sync", 2, 2, **training), MLP_BUCKET)


def shards(cfg, bucket, init, resume=None):
    spec = WorkerSpec(to_dict(cfg), coordinator="tcp://127.0.0.1:9", bucket_bytes=bucket,
                      wait_timeout=5.0, init_state=str(init),
                      resume=None if resume is None else str(resume))
    return [ParameterServer(k, spec) for k in range(cfg.runtime.ps_shards)]


def forbid_building_the_job(monkeypatch):
    """Any model, layer or dataset built from here on fails the test."""
    def built(*args, **kwargs):
        raise AssertionError("the shard built a module or a dataset")
    monkeypatch.setattr(nn.Module, "__init__", built)
    monkeypatch.setattr(data.TextDataset, "__init__", built)
    monkeypatch.setattr(data.ArrayDataset, "__init__", built)


def lrs(job, steps):
    """The lr of each of the job's optimizer groups at each step, from its own scheduler."""
    out = {}
    sched, groups = job.scheduler, job.optimizer.param_groups
    out[sched.last_epoch] = [g["lr"] for g in groups]
    while sched.last_epoch < steps:
        sched.step()
        out[sched.last_epoch] = [g["lr"] for g in groups]
    return out


def assert_shards_hold(ps_list, job, cfg, bucket):
    """Each shard's buckets are the job's parameters and optimizer state cut to the plan."""
    params = list(job.model.parameters())
    arrays = [p.data for p in params]
    full = job.optimizer
    group_of = {id(p): gi for gi, g in enumerate(full.param_groups) for p in g["params"]}
    plan = plan_for(job.model, cfg.runtime.ps_shards, bucket)
    held = []
    for ps in ps_list:
        assert ps.plan == plan
        assert ps.start == job.scheduler.last_epoch
        for key, b in ps.buckets.items():
            held.append(key)
            assert b.version == ps.start
            np.testing.assert_array_equal(b.w, pack(b.bucket, arrays, np.empty_like(b.w)),
                                          err_msg=key)
            states = b.piece_states()
            for i, piece in enumerate(b.bucket.pieces):
                p = params[piece.index]
                (group,) = [g for g in b.optimizer.param_groups
                            if any(t is b.pieces[i] for t in g["params"])]
                want = {k: v for k, v in full.param_groups[group_of[id(p)]].items()
                        if k != "params"}
                assert {k: v for k, v in group.items() if k != "params"} == want, piece.name
                expected = {}
                for name, value in full.state.get(p, {}).items():
                    if getattr(value, "shape", None) == p.shape:
                        value = np.asarray(value).reshape(-1)[piece.start:piece.stop]
                    expected[name] = value
                assert states[i].keys() == expected.keys(), piece.name
                for name, value in expected.items():
                    got = states[i][name]
                    if isinstance(value, np.ndarray):
                        assert got.dtype == np.float32
                        np.testing.assert_array_equal(got, value, err_msg=f"{key} {name}")
                    else:
                        assert got == value and type(got) is type(value), (piece.name, name)
    assert sorted(held) == sorted(b.key for b in plan.buckets)  # every bucket, once
    want_lrs = lrs(job, cfg.training.steps)
    for ps in ps_list:
        for step in range(ps.start, cfg.training.steps):
            assert ps.lrs_at(step) == want_lrs[step], step


@pytest.mark.parametrize("kind, optimizer", [("gpt", "adamw"), ("mlp", "lion")])
def test_a_fresh_shard_holds_the_seeded_jobs_slice_without_building_it(
        blobs, tmp_path, monkeypatch, kind, optimizer):
    _, cfg, bucket = configs(kind, blobs, tmp_path, optimizer=optimizer)
    job = build_job(cfg)  # what every process built before: the reference
    init = write_init_state(job.model, tmp_path, values=True)
    forbid_building_the_job(monkeypatch)
    assert_shards_hold(shards(cfg, bucket, init), job, cfg, bucket)


@pytest.mark.parametrize("kind, optimizer", [("gpt", "adamw"), ("mlp", "lion")])
def test_a_resumed_shard_holds_the_restored_jobs_slice_without_building_it(
        blobs, tmp_path, monkeypatch, kind, optimizer):
    """The checkpoint's optimizer hyperparameters and schedule win over the config's, as
    restore() has it: the job resumes with another lr and weight_decay in its config."""
    local, _, bucket = configs(kind, blobs, tmp_path, optimizer=optimizer)
    ckpt = local_train(local, JsonLinesReporter(io.StringIO()), stop_at=5)["checkpoint"]
    _, cfg, _ = configs(kind, blobs, tmp_path, optimizer=optimizer, lr=0.5, weight_decay=0.3)
    job = build_job(cfg)
    init = write_init_state(job.model, tmp_path, values=False)
    assert restore(job, ckpt) == 5
    assert {g["weight_decay"] for g in job.optimizer.param_groups} == {0.1, 0.0}
    assert {g["initial_lr"] for g in job.optimizer.param_groups} == {1e-2}
    forbid_building_the_job(monkeypatch)
    assert_shards_hold(shards(cfg, bucket, init, ckpt), job, cfg, bucket)


def test_a_resumed_shard_reads_only_its_slice_of_the_checkpoint(blobs, tmp_path, monkeypatch):
    """Shard 1 of 3 asks for exactly its pieces' ranges of the weights and of each optimizer
    array; every other byte of the checkpoint's data is overwritten with garbage first."""
    local, cfg, bucket = configs("gpt", blobs, tmp_path)
    ckpt = local_train(local, JsonLinesReporter(io.StringIO()), stop_at=5)["checkpoint"]
    job = build_job(cfg)
    init = write_init_state(job.model, tmp_path, values=False)
    restore(job, ckpt)
    plan = plan_for(job.model, 3, bucket)
    pieces = [p for b in plan.shard_buckets(1) for p in b.pieces]
    order = [p for g in job.optimizer.param_groups for p in g["params"]]
    index = {id(p): i for i, p in enumerate(order)}  # the optimizer state dict's numbering
    params = list(job.model.parameters())
    want = {("model.safetensors", p.name, p.start, p.stop) for p in pieces}
    want |= {("optimizer.safetensors", f"state/{index[id(params[p.index])]}/{name}",
              p.start, p.stop) for p in pieces for name in ("exp_avg", "exp_avg_sq")}

    keep: dict[str, list[tuple[int, int]]] = {}
    for fname, name, start, stop in want:
        info = read_header(f"{ckpt}/{fname}")[0][name]
        keep.setdefault(fname, []).append((info.begin + 4 * start, info.begin + 4 * stop))
    for fname, ranges in keep.items():
        path = Path(ckpt) / fname
        raw = path.read_bytes()
        begin = min(i.begin for i in read_header(path)[0].values())
        poisoned = bytearray(b"\xff" * len(raw))  # NaN in every float32
        poisoned[:begin] = raw[:begin]
        for lo, hi in ranges:
            poisoned[lo:hi] = raw[lo:hi]
        path.write_bytes(bytes(poisoned))

    asked = []
    real = shard_start.read_range

    def spy(path, name, start=0, stop=None, **kwargs):
        asked.append((path.name, name, start, stop))
        return real(path, name, start, stop, **kwargs)

    monkeypatch.setattr(shard_start, "read_range", spy)
    forbid_building_the_job(monkeypatch)
    spec = WorkerSpec(to_dict(cfg), coordinator="tcp://127.0.0.1:9", bucket_bytes=bucket,
                      wait_timeout=5.0, init_state=str(init), resume=str(ckpt))
    ps = ParameterServer(1, spec)
    assert len(asked) == len(set(asked)) and set(asked) == want
    arrays = [p.data for p in params]
    for key, b in ps.buckets.items():
        np.testing.assert_array_equal(b.w, pack(b.bucket, arrays, np.empty_like(b.w)),
                                      err_msg=key)
        for i, piece in enumerate(b.bucket.pieces):
            state = job.optimizer.state[params[piece.index]]
            for name in ("exp_avg", "exp_avg_sq"):
                np.testing.assert_array_equal(
                    b.piece_states()[i][name],
                    state[name].reshape(-1)[piece.start:piece.stop], err_msg=f"{key} {name}")
