"""The `narun` command line, run as a user runs it: a subprocess per command, with a timeout.

Tiny jobs only (a 2-layer GPT for 6 steps, the blobs MLP for its 300 steps, ~1 s each);
the trained runs are module fixtures shared by the tests that read them.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import narun
import narun.models  # noqa: F401  (registers model fields for config_from_dict)
from narun.checkpoint import load_checkpoint, save_checkpoint
from narun.config import config_from_dict
from narun.data import ArrayDataset, ByteTokenizer
from narun.models import build_from_config

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
EVENTS = {"step", "eval", "checkpoint", "restart", "done", "error"}
TINY_GPT = {
    "model": {"name": "gpt", "preset": "gpt2-tiny", "n_layer": 2, "n_embd": 32, "n_head": 2,
              "block_size": 32},
    "data": {"kind": "text", "seq_len": 32, "val_fraction": 0.01},
    "training": {"steps": 6, "batch_size": 4, "lr": 3.0e-3, "warmup_steps": 1,
                 "eval_every": 3, "checkpoint_every": 3},
}


def narun_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "narun.cli", *map(str, args)], cwd=ROOT,
                          env=ENV, capture_output=True, encoding="utf-8", timeout=timeout)


def json_lines(stdout):
    records = [json.loads(line) for line in stdout.splitlines()]
    assert records and all(isinstance(r, dict) and r.get("event") in EVENTS for r in records)
    return records


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    path = tmp_path_factory.mktemp("blobs") / "data" / "blobs.npz"  # data/ does not exist yet
    out = narun_cli("data", "blobs", path, "--n", 2000, "--seed", 3)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(path)
    return path


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory, blobs):
    out_dir = tmp_path_factory.mktemp("mlp")
    out = narun_cli("train", "configs/mlp.yaml", "--set", f"data.path={blobs}",
                    "--set", f"training.out_dir={out_dir}", "--json")
    assert out.returncode == 0, out.stderr
    return json_lines(out.stdout)


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt")
    data = json.loads(json.dumps(TINY_GPT))
    data["training"]["out_dir"] = str(tmp / "run")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(data))
    out = narun_cli("train", config, "--json")
    assert out.returncode == 0, out.stderr
    return {"config": config, "run": tmp / "run", "events": json_lines(out.stdout)}


# ---- config check --------------------------------------------------------------------------

def test_config_check_prints_the_resolved_config(tmp_path, blobs):
    out = narun_cli("config", "check", "configs/mlp.yaml", "--set", f"data.path={blobs}",
                    "--set", "training.lr=0.25",
                    "--set", "model.sizes=[16, 8, 4]")
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["model"]["sizes"] == [16, 8, 4]
    assert resolved["model"]["activation"] == "relu"
    assert resolved["training"]["lr"] == 0.25 and resolved["training"]["steps"] == 300
    # keys the file leaves out come back with their documented defaults
    assert resolved["training"]["grad_accum"] == 1
    assert resolved["runtime"] == {"mode": "local", "workers": 0, "ps_shards": 1,
                                   "max_staleness": 4, "stages": 0, "micro_batches": 1,
                                   "schedule": "1f1b", "device": "cpu",
                                   "heartbeat_interval": 1.0, "heartbeat_timeout": 10.0,
                                   "max_restarts": 3, "rejoin_timeout": 30.0,
                                   "host": "127.0.0.1", "port": 0, "hosts": [],
                                   "job_retries": 0, "deadline": 0.0}
    # the resolved config is itself a valid config that resolves to the same text
    again = tmp_path / "resolved.yaml"
    again.write_text(out.stdout)
    out2 = narun_cli("config", "check", again)
    assert out2.returncode == 0, out2.stderr
    assert out2.stdout == out.stdout


@pytest.mark.parametrize("text,expected", [
    ("model:\n  name: mlp\n  sizez: [4, 2]\n", ["model.sizez", "did you mean 'sizes'"]),
    ("training:\n  steps: many\n", ["training.steps"]),
    ("runtime:\n  mode: cluster\n", ["runtime.mode", "ps-sync"]),
    ("model: [1, 2\n", ["bad.yaml"]),
])
def test_config_check_on_a_bad_file_exits_2_naming_the_key(tmp_path, text, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    out = narun_cli("config", "check", bad)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout == ""
    assert "Traceback" not in out.stderr
    for piece in expected:
        assert piece in out.stderr, (piece, out.stderr)


def test_config_check_on_a_missing_file_exits_2(tmp_path):
    out = narun_cli("config", "check", tmp_path / "nope.yaml")
    assert out.returncode == 2 and "nope.yaml" in out.stderr


# What `train` refuses, `config check` refuses: the same message, exit 2, before any step.
REFUSED = [
    (["--set", "model.name=gtp"], "model.name: must be one of bert, clip, gpt, mlp, resnet, vit, "
     "got 'gtp'; did you mean 'gpt'?"),
    (["--set", "data.path=no/such/corpus.txt"], "data.path: no such file "
     "'no/such/corpus.txt'"),
    (["--set", "data.seq_len=64"], "data.seq_len: 64 exceeds the model's block_size 32"),
    # MLX does not run a pipeline's stages; and mps needs Metal (or MLX itself), which no
    # Linux machine has.
    (["--set", "runtime.device=mps"], "runtime.device: device 'mps' needs"),
    (["--set", "runtime.device=mlx:cpu", "--set", "runtime.mode=pipeline", "--set",
      "runtime.stages=2"], "runtime.device: 'mlx:cpu' (MLX) does not run mode pipeline"),
    # No CuPy here, or no 99th GPU where there is: one process would fail to put its model
    # there, and a job's trainers would fail to start.
    (["--set", "runtime.device=cuda:99"], "runtime.device: device 'cuda"),
    (["--set", "runtime.device=cuda:99", "--set", "runtime.mode=ps-sync", "--set",
      "runtime.workers=2"], "runtime.device: device 'cuda"),
    # NumPy has no bfloat16 arrays (nor CuPy): bf16 trains on MLX devices only.
    (["--set", "training.precision=bf16"], "training.precision: bf16 needs bfloat16 arrays, "
     "which NumPy (cpu) and CuPy (cuda) do not have; use fp16 (float16 with loss scaling), "
     "or train bf16 on an MLX device (runtime.device: mps or mlx:cpu)"),
]


@pytest.mark.parametrize("args,message", REFUSED)
def test_config_check_refuses_what_train_refuses(gpt_config_file, args, message):
    check = narun_cli("config", "check", gpt_config_file, *args)
    train = narun_cli("train", gpt_config_file, *args)
    for out in (check, train):
        assert out.returncode == 2, (out.stdout, out.stderr)
        assert "Traceback" not in out.stderr
        assert message in out.stderr, out.stderr
        assert out.stderr.rstrip().endswith(f"[from --set {args[1]}]"), out.stderr
    assert check.stderr == train.stderr
    assert check.stdout == "" and not (gpt_config_file.parent / "run").exists()


def test_overwrite_with_resume_is_a_usage_error_not_a_silent_choice(gpt_config_file):
    out = narun_cli("train", gpt_config_file, "--resume", "auto", "--overwrite")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--overwrite starts afresh and --resume auto continues a run" in out.stderr
    assert not (gpt_config_file.parent / "run").exists()


def test_an_empty_config_file_is_an_error_not_a_default_run(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n")
    for args in (["config", "check", empty], ["train", empty]):
        out = narun_cli(*args)
        assert out.returncode == 2, (out.stdout, out.stderr)
        assert f"{empty}: the config is empty" in out.stderr
    assert out.stdout == ""  # `train` stopped before its first step (no step event)


@pytest.fixture
def gpt_config_file(tmp_path):
    data = json.loads(json.dumps(TINY_GPT))
    data["training"]["out_dir"] = str(tmp_path / "run")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_version_prints_the_package_version():
    out = narun_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"narun {narun.__version__}"


def test_ps_shards_in_mode_local_is_an_error_not_ignored(gpt_config_file):
    out = narun_cli("train", gpt_config_file, "--ps-shards", 2)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--ps-shards 2: parameter-server shards run only in mode ps-sync or ps-async" in \
        out.stderr and "add --workers N" in out.stderr
    assert not (gpt_config_file.parent / "run").exists()


def test_more_workers_than_cores_warns_once_with_the_reason(gpt_config_file, tmp_path):
    workers = len(os.sched_getaffinity(0)) + 1
    # a --resume that does not exist stops the job after the warning, before any process
    out = narun_cli("train", gpt_config_file, "--workers", workers, "--set",
                    f"training.batch_size={workers}", "--resume", tmp_path / "nope")
    assert out.returncode == 3, out.stderr
    warnings = [line for line in out.stderr.splitlines() if "workers_exceed_cores" in line]
    assert len(warnings) == 1, out.stderr
    assert f'"workers": {workers}' in warnings[0] and "time-share the cores" in warnings[0]
    fits = narun_cli("train", gpt_config_file, "--workers", 1, "--resume", tmp_path / "nope")
    assert fits.returncode == 3 and "workers_exceed_cores" not in fits.stderr


# ---- data blobs -----------------------------------------------------------------------------

def test_data_blobs_writes_a_balanced_known_answer_npz(blobs, tmp_path):
    with np.load(blobs, allow_pickle=False) as f:
        x, y = f["x"], f["y"]
    assert x.shape == (2000, 16) and x.dtype == np.float32
    assert y.shape == (2000,) and y.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y), [500] * 4)
    # class means are far apart relative to the unit within-class spread
    means = np.stack([x[y == c].mean(0) for c in range(4)])
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(4, 1)]
    assert gaps.min() > 6.0
    # the seed decides the data
    same = tmp_path / "same.npz"
    assert narun_cli("data", "blobs", same, "--n", 2000, "--seed", 3).returncode == 0
    with np.load(same) as f:
        np.testing.assert_array_equal(f["x"], x)


def test_one_process_training_on_a_gpu_this_machine_lacks_exits_2_naming_it(blobs):
    out = narun_cli("train", ROOT / "configs" / "mlp.yaml", "--set", "runtime.device=cuda:99",
                    "--set", f"data.path={blobs}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    # no CuPy (this machine), or CuPy and fewer than 100 GPUs
    assert ("runtime.device: device 'cuda' needs CuPy" in out.stderr
            or "runtime.device: device 'cuda:99' is out of range" in out.stderr)


def test_data_blobs_with_a_bad_size_exits_2(tmp_path):
    out = narun_cli("data", "blobs", tmp_path / "x.npz", "--classes", 1)
    assert out.returncode == 2 and "classes" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "x.npz").exists()


# ---- train + evaluate: the MLP on blobs ------------------------------------------------------

def test_train_mlp_without_its_data_file_names_the_command_that_makes_it(tmp_path):
    missing = tmp_path / "runs" / "blobs.npz"
    out = narun_cli("train", "configs/mlp.yaml", "--set", f"data.path={missing}",
                    "--set", f"training.out_dir={tmp_path / 'out'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"no such file '{missing}'" in out.stderr
    assert f"`narun data blobs {missing}`" in out.stderr, out.stderr


def test_train_mlp_reaches_the_known_accuracy(mlp_run, blobs):
    done = mlp_run[-1]
    assert done["event"] == "done" and done["step"] == 300 and not done["interrupted"]
    steps = [e for e in mlp_run if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 301))
    assert {"loss", "lr", "samples_per_s"} <= steps[0].keys()
    assert [e["step"] for e in mlp_run if e["event"] == "eval"] == [100, 200]
    assert steps[-1]["loss"] < 0.1 < steps[0]["loss"]

    ckpt = load_checkpoint(done["checkpoint"])
    cfg = config_from_dict(ckpt.extra["config"])
    assert cfg.data.path == str(blobs)
    model = build_from_config(cfg.model)
    model.load_state_dict(ckpt.model)
    model.eval()
    val = ArrayDataset(blobs, names=("x", "y"), val_fraction=cfg.data.val_fraction,
                       split="val")
    x, y = val[:]
    assert len(y) == 200
    with narun.no_grad():
        predicted = model(narun.tensor(x)).numpy().argmax(-1)
    accuracy = float((predicted == y).mean())
    assert accuracy >= 0.97, accuracy


def test_evaluate_mlp_checkpoint_reports_the_final_val_loss_and_accuracy(mlp_run, blobs):
    done = mlp_run[-1]
    out = narun_cli("evaluate", done["checkpoint"], "--json")
    assert out.returncode == 0, out.stderr
    (result,) = json_lines(out.stdout)
    assert result["event"] == "eval" and result["step"] == 300
    assert result["val_loss"] == pytest.approx(done["val_loss"], rel=1e-9)
    assert "perplexity" not in result  # perplexity is for language models
    # the accuracy a user would compute from the checkpoint's model over the val split
    ckpt = load_checkpoint(done["checkpoint"])
    cfg = config_from_dict(ckpt.extra["config"])
    model = build_from_config(cfg.model)
    model.load_state_dict(ckpt.model)
    model.eval()
    x, y = ArrayDataset(blobs, names=("x", "y"), val_fraction=cfg.data.val_fraction,
                        split="val")[:]
    with narun.no_grad():
        expected = float((model(narun.tensor(x)).numpy().argmax(-1) == y).mean())
    assert result["accuracy"] == pytest.approx(expected, abs=1e-12) and expected >= 0.97
    text = narun_cli("evaluate", done["checkpoint"])
    assert text.returncode == 0
    assert f"accuracy {expected:.4f} ({len(y)} validation rows)" in text.stdout


def test_evaluate_a_checkpoint_without_optimizer_state(gpt_run, tmp_path):
    # e.g. weights saved from Python for sharing: model and config only
    ckpt = load_checkpoint(gpt_run["events"][-1]["checkpoint"])
    path = save_checkpoint(tmp_path, ckpt.step, ckpt.model, None,
                           {"config": ckpt.extra["config"]})
    assert not (path / "optimizer.safetensors").exists()
    out = narun_cli("evaluate", path, "--json")
    assert out.returncode == 0, out.stderr
    (result,) = json_lines(out.stdout)
    assert result["val_loss"] == pytest.approx(gpt_run["events"][-1]["val_loss"], rel=1e-9)


def test_generate_on_an_mlp_checkpoint_is_a_usage_error(mlp_run):
    # the checkpoint is fine; asking it for text is the mistake: exit 2, not 3
    out = narun_cli("generate", mlp_run[-1]["checkpoint"], "hi")
    assert out.returncode == 2, out.stderr
    assert "'mlp' model" in out.stderr and "Traceback" not in out.stderr


# ---- train + generate + evaluate: a tiny GPT -------------------------------------------------

def test_train_json_is_one_event_object_per_line(gpt_run):
    events = gpt_run["events"]
    kinds = [e["event"] for e in events]
    assert kinds == ["step"] * 3 + ["eval", "checkpoint"] + ["step"] * 3 + ["checkpoint",
                                                                            "done"]
    for e in events:
        if e["event"] == "step":
            assert {"step", "loss", "lr", "tokens_per_s"} <= e.keys()
            assert math.isfinite(e["loss"]) and e["tokens_per_s"] > 0
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert next(e for e in events if e["event"] == "eval")["step"] == 3
    ckpts = [e for e in events if e["event"] == "checkpoint"]
    assert [e["step"] for e in ckpts] == [3, 6]
    assert all(Path(e["path"]).is_dir() for e in ckpts)
    done = events[-1]
    assert done["checkpoint"] == ckpts[-1]["path"] and done["step"] == 6
    assert 0 < done["val_loss"] < math.log(256) + 0.5


def test_train_without_json_on_a_pipe_still_prints_json_lines(gpt_run, tmp_path):
    out = narun_cli("train", gpt_run["config"], "--set", "training.steps=2",
                    "--set", f"training.out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert [e["event"] for e in json_lines(out.stdout)] == ["step", "step", "checkpoint",
                                                            "done"]


def test_train_json_reports_a_config_error_as_an_error_event(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  stpes: 3\n")
    out = narun_cli("train", bad, "--json")
    assert out.returncode == 2
    (event,) = json_lines(out.stdout)
    assert event["event"] == "error" and "training.stpes" in event["message"]


def library_sample(checkpoint, prompt, n, **kw):
    """What `narun generate` should print, computed in this process."""
    c = load_checkpoint(checkpoint)
    model = build_from_config(config_from_dict(c.extra["config"]).model)
    model.load_state_dict(c.model)
    tok = ByteTokenizer()
    return tok.decode(model.generate(tok.encode(prompt)[None], n, **kw)[0])


def test_generate_continues_the_prompt_as_the_library_does(gpt_run):
    ckpt = gpt_run["events"][-1]["checkpoint"]
    prompt = "The quick brown fox"
    out = narun_cli("generate", ckpt, prompt, "--max-new-tokens", 24, "--seed", 3,
                    "--top-k", 50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(prompt)
    assert out.stdout == library_sample(ckpt, prompt, 24, temperature=0.8, top_k=50,
                                        seed=3) + "\n"
    # a run directory means its newest good checkpoint
    by_run = narun_cli("generate", gpt_run["run"], prompt, "--max-new-tokens", 24,
                       "--seed", 3, "--top-k", 50)
    assert by_run.returncode == 0, by_run.stderr
    assert by_run.stdout == out.stdout


def test_load_trained_gives_the_model_of_a_run_or_a_step_directory(gpt_run, tmp_path):
    from narun.errors import CheckpointError
    from narun.models import GPT, load_trained

    ckpt = gpt_run["events"][-1]["checkpoint"]
    model, config, step, path = load_trained(gpt_run["run"])  # the newest good checkpoint
    assert isinstance(model, GPT) and not model.training
    assert step == 6 and path == Path(ckpt) and config.model.name == "gpt"
    tok = ByteTokenizer()
    out = model.generate(tok.encode("hi")[None], 8, temperature=0.0)
    assert tok.decode(out[0]) == library_sample(ckpt, "hi", 8, temperature=0.0)
    first = load_trained(gpt_run["events"][4]["path"])  # a step directory as given
    assert first.step == 3
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        load_trained(tmp_path)


def test_generate_greedy_with_a_prompt_longer_than_the_context(gpt_run):
    ckpt = gpt_run["events"][-1]["checkpoint"]
    prompt = "x" * 40 + " and then"  # 49 bytes > block_size 32: the context is cropped
    out = narun_cli("generate", ckpt, prompt, "--max-new-tokens", 10, "--temperature", 0)
    assert out.returncode == 0, out.stderr
    assert out.stdout == library_sample(ckpt, prompt, 10, temperature=0.0) + "\n"


def test_generate_with_bad_sampling_arguments_exits_2(gpt_run):
    out = narun_cli("generate", gpt_run["events"][-1]["checkpoint"], "a", "--top-k", -1)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    # the message names the flag and suggests values the CLI accepts
    assert "--top-k" in out.stderr and "0 (no limit)" in out.stderr, out.stderr
    assert "--top-k 40" in out.stderr


def test_generate_top_k_0_means_no_limit(gpt_run):
    ckpt = gpt_run["events"][-1]["checkpoint"]
    out = narun_cli("generate", ckpt, "ab", "--max-new-tokens", 12, "--top-k", 0)
    assert out.returncode == 0, out.stderr
    assert out.stdout == library_sample(ckpt, "ab", 12, temperature=0.8, seed=0) + "\n"


def test_every_generate_option_has_help_and_its_default():
    import argparse

    from narun.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["generate"]._actions:
        if action.dest in ("help", "checkpoint"):
            continue
        assert action.help, action.dest
        assert "default" in action.help, (action.dest, action.help)
    text = " ".join(narun_cli("generate", "--help").stdout.split())  # unwrapped
    assert "(default: 200)" in text and "0 means no limit (default: 0)" in text


def test_generate_streams_tokens_and_ctrl_c_stops_it_cleanly(gpt_run):
    import select
    import signal
    import time

    ckpt = gpt_run["events"][-1]["checkpoint"]
    prompt = "stream"
    buffered = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # as a user runs it
    proc = subprocess.Popen([sys.executable, "-m", "narun.cli", "generate", str(ckpt), prompt,
                             "--max-new-tokens", "100000"], cwd=ROOT, env=buffered,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        got = b""
        deadline = time.monotonic() + 30
        # a few sampled bytes after the prompt arrive while the process is still running
        while len(got) < len(prompt) + 8 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                got += os.read(proc.stdout.fileno(), 4096)
        assert proc.poll() is None, "still sampling the 100,000 tokens"
        assert got.startswith(prompt.encode()) and len(got) >= len(prompt) + 8, got
        # piece by piece, not a whole stdio buffer (4 KiB or more) at a time
        assert len(got) < len(prompt) + 1024, len(got)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err
    assert (got + rest).endswith(b"\n")


def test_evaluate_json_gives_val_loss_and_perplexity(gpt_run):
    done = gpt_run["events"][-1]
    out = narun_cli("evaluate", done["checkpoint"], "--json")
    assert out.returncode == 0, out.stderr
    (result,) = json_lines(out.stdout)
    assert result["event"] == "eval" and result["step"] == 6
    # train's final evaluation and `evaluate` both use the whole validation split
    assert result["val_loss"] == pytest.approx(done["val_loss"], rel=1e-9)
    assert result["perplexity"] == pytest.approx(math.exp(result["val_loss"]), rel=1e-12)
    assert result["bits_per_byte"] == pytest.approx(result["val_loss"] / math.log(2),
                                                    rel=1e-12)
    text = narun_cli("evaluate", done["checkpoint"])
    assert text.returncode == 0
    assert text.stdout.startswith(f"step 6: val_loss {result['val_loss']:.4f}, perplexity "
                                  f"{result['perplexity']:.3f}")


def test_a_corrupted_checkpoint_exits_3_naming_the_file(gpt_run, tmp_path):
    bad = tmp_path / "step-000006"
    shutil.copytree(gpt_run["events"][-1]["checkpoint"], bad)
    weights = bad / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    for args in (("generate", bad, "hello"), ("evaluate", bad, "--json")):
        out = narun_cli(*args)
        assert out.returncode == 3, (args, out.stderr)
        assert str(weights) in out.stderr and "Traceback" not in out.stderr
    missing = narun_cli("generate", tmp_path / "no-such-run", "hi")
    assert missing.returncode == 3 and "no-such-run" in missing.stderr


def test_keys_generate_writes_a_loadable_keypair_and_never_overwrites(tmp_path):
    from protocol.keys import load_keypair, load_public_key

    out = narun_cli("keys", "generate", str(tmp_path / "keys"), "--name", "node1")
    assert out.returncode == 0, out.stderr
    public, secret = tmp_path / "keys" / "node1.key", tmp_path / "keys" / "node1.key_secret"
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    pair = load_keypair(secret)
    assert load_public_key(public) == pair.public and len(pair.public) == 40
    again = narun_cli("keys", "generate", str(tmp_path / "keys"), "--name", "node1")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert load_keypair(secret).secret == pair.secret  # untouched


def test_an_unknown_narun_log_level_exits_2_naming_it(tmp_path):
    run = subprocess.run([sys.executable, "-m", "narun.cli", "config", "check",
                          str(tmp_path / "none.yaml")], cwd=ROOT,
                         env={**ENV, "NARUN_LOG_LEVEL": "loud"}, capture_output=True,
                         encoding="utf-8", timeout=60)
    assert run.returncode == 2
    assert "NARUN_LOG_LEVEL='loud': expected one of debug, info, warning" in run.stderr
