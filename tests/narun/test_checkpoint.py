import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy
from structlog.testing import capture_logs

import narun
from narun.checkpoint import (
    CheckpointError,
    latest_good,
    list_checkpoints,
    load,
    load_checkpoint,
    prune,
    read_metadata,
    run_id_of,
    save,
    save_checkpoint,
    verify_checkpoint,
)


def model_state(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    w[0, 0] = np.nan  # a NaN payload must survive bit for bit
    return {
        "blocks.0.attn.weight": w,
        "blocks.0.attn.bias": rng.standard_normal(5).astype(np.float16),
        "lm_head.weight": rng.standard_normal((5, 6)).T,  # non-contiguous float64
        "ids": np.arange(7, dtype=np.int64),
        "mask": rng.random(4) > 0.5,
        "scale": np.array(0.5, dtype=np.float32),
    }


def optimizer_state():
    return {
        "state": {0: {"step": np.int64(3), "exp_avg": np.full((6, 5), 0.25, np.float32)},
                  1: {"step": np.int64(3), "exp_avg": np.zeros(5, np.float32)}},
        "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "params": [0, 1], "nesterov": False}],
    }


def assert_bitwise_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def test_round_trip_is_exact(tmp_path):
    gen = np.random.default_rng(123)
    gen.standard_normal(10)
    extra = {"config": {"training": {"lr": 3e-4, "seed": 0}}, "rng": gen.bit_generator.state,
             "data": {"epoch": 2, "index": 5}, "legacy_rng": np.random.RandomState(1).get_state()}
    state = model_state()
    path = save_checkpoint(tmp_path, 123, state, optimizer_state(), extra)
    assert path == tmp_path / "step-000123"
    ckpt = load_checkpoint(path)
    assert ckpt.step == 123 and ckpt.path == path
    assert set(ckpt.model) == set(state)
    for key, value in state.items():
        assert_bitwise_equal(ckpt.model[key], value)
    opt = ckpt.optimizer
    assert set(opt["state"]) == {0, 1}  # integer keys survive JSON
    assert type(opt["state"][0]["step"]) is np.int64 and opt["state"][0]["step"] == 3
    assert_bitwise_equal(opt["state"][0]["exp_avg"], optimizer_state()["state"][0]["exp_avg"])
    assert opt["param_groups"] == [{"lr": 3e-4, "betas": (0.9, 0.95), "params": [0, 1],
                                    "nesterov": False}]
    assert ckpt.extra["config"] == extra["config"] and ckpt.extra["data"] == extra["data"]
    assert ckpt.extra["rng"] == extra["rng"]  # 128-bit ints through JSON
    restored = np.random.default_rng()
    restored.bit_generator.state = ckpt.extra["rng"]
    np.testing.assert_array_equal(restored.standard_normal(5), gen.standard_normal(5))
    legacy = ckpt.extra["legacy_rng"]  # a tuple holding a uint32 key array
    assert legacy[0] == "MT19937" and np.array_equal(legacy[1], extra["legacy_rng"][1])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["step"] == 123
    for name in ("model.safetensors", "optimizer.safetensors", "extra.safetensors"):
        info = manifest["files"][name]
        assert info["size"] == (path / name).stat().st_size and len(info["sha256"]) == 64


def test_tensors_and_modules_are_accepted(tmp_path):
    class Module:
        def state_dict(self):
            return {"w": narun.tensor(np.arange(4.0, dtype=np.float32), requires_grad=True)}

    path = save_checkpoint(tmp_path, 1, Module(), {"m": narun.tensor([1.0, 2.0])})
    ckpt = load_checkpoint(path)
    np.testing.assert_array_equal(ckpt.model["w"], np.arange(4.0, dtype=np.float32))
    np.testing.assert_array_equal(ckpt.optimizer["m"], [1.0, 2.0])


def test_unstorable_state_is_refused_with_its_path(tmp_path):
    with pytest.raises(CheckpointError, match="state/0/ids: cannot store a set in a checkpoint"):
        save_checkpoint(tmp_path, 1, {}, {"state": {"0": {"ids": {1, 2}}}})
    with pytest.raises(TypeError, match=r"model_state\['w'\]: expected a str key and an array"):
        save_checkpoint(tmp_path, 1, {"w": "not an array"})
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def flip_byte(path, offset=-20):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupted_file_is_refused_naming_it(tmp_path):
    path = save_checkpoint(tmp_path, 5, model_state(), optimizer_state())
    flip_byte(path / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: checksum mismatch"):
        load_checkpoint(path)


def test_truncated_file_is_refused_naming_it(tmp_path):
    path = save_checkpoint(tmp_path, 5, model_state())
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-7])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: truncated .*expected "
                                              rf"{len(data)} bytes, got {len(data) - 7}"):
        load_checkpoint(path)


def test_corrupted_or_missing_manifest(tmp_path):
    path = save_checkpoint(tmp_path, 5, model_state())
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format_version": 1', '"format_version": 0'))
    with pytest.raises(CheckpointError, match=r"manifest\.json: checksum mismatch"):
        load_checkpoint(path)
    manifest.write_text(manifest.read_text()[:50])
    with pytest.raises(CheckpointError, match=r"manifest\.json: unreadable"):
        load_checkpoint(path)
    manifest.unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json: missing: .*incomplete"):
        load_checkpoint(path)
    assert list_checkpoints(tmp_path) == []
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "step-000009")


def test_latest_good_falls_back_and_says_why(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model_state(step))
    flip_byte(tmp_path / "step-000040" / "model.safetensors")
    (tmp_path / "step-000030" / "manifest.json").unlink()  # half-written
    assert list_checkpoints(tmp_path) == [tmp_path / f"step-0000{s}" for s in (10, 20, 40)]
    with capture_logs() as logs:
        good = latest_good(tmp_path)
    assert good == tmp_path / "step-000020"
    # newest written first; one without a manifest has no known age and is tried first
    assert [entry["path"] for entry in logs] == [str(tmp_path / "step-000030"),
                                                 str(tmp_path / "step-000040")]
    assert all(e["log_level"] == "warning" and e["event"] == "checkpoint_skipped" for e in logs)
    assert "manifest.json: missing" in logs[0]["reason"]
    assert "model.safetensors: checksum mismatch" in logs[1]["reason"]
    assert load_checkpoint(good).step == 20
    assert latest_good(tmp_path / "nothing-here") is None


def test_prune_keeps_the_newest_k(tmp_path):
    for step in (1, 2, 3, 1000, 1_000_000):
        save_checkpoint(tmp_path, step, {"w": np.full(2, step)})
    removed = prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step-000001", "step-000002", "step-000003"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-001000", "step-1000000"]
    save_checkpoint(tmp_path, 1_000_001, {"w": np.zeros(1)}, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1000001"]
    with pytest.raises(ValueError, match="keep must be an integer >= 1"):
        prune(tmp_path, 0)


def test_pruning_and_latest_keep_to_one_run_and_the_newest_written(tmp_path):
    # issue 12: a second run's step 40 sorted before the first run's step 200..600, so its
    # own keep_checkpoints pruned it, and "latest" picked the old run's step 600
    for step in (200, 400, 600):
        save_checkpoint(tmp_path, step, {"w": np.full(2, step)}, run_id="old", keep=5)
    new = save_checkpoint(tmp_path, 40, {"w": np.zeros(2)}, run_id="new", keep=2)
    assert new.is_dir()
    assert latest_good(tmp_path) == new
    assert latest_good(tmp_path, run_id="old") == tmp_path / "step-000600"
    for step in (50, 60):
        save_checkpoint(tmp_path, step, {"w": np.zeros(2)}, run_id="new", keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-000200", "step-000400", "step-000600", "step-000050", "step-000060"]
    assert prune(tmp_path, keep=1, run_id="old") == [tmp_path / "step-000200",
                                                     tmp_path / "step-000400"]
    assert run_id_of(tmp_path / "step-000600") == "old"


def test_saving_a_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 7, {"w": np.zeros(3)})
    path = save_checkpoint(tmp_path, 7, {"w": np.ones(3)})
    np.testing.assert_array_equal(load_checkpoint(path).model["w"], np.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["step-000007"]


CRASH = textwrap.dedent("""
    import os, sys
    import numpy as np
    import safetensors.numpy
    from narun.checkpoint import save_checkpoint

    real, calls = safetensors.numpy.save_file, []
    def dying_save_file(arrays, path, metadata=None):
        calls.append(path)
        if len(calls) == int(sys.argv[2]):  # the process dies in the middle of this file
            with open(path, "wb") as f:
                f.write(b"partial")
            os._exit(3)
        real(arrays, path, metadata)
    safetensors.numpy.save_file = dying_save_file
    save_checkpoint(sys.argv[1], 2, {"w": np.ones(4)}, {"m": np.zeros(4)})
""")


@pytest.mark.parametrize("die_at_file", [1, 2])
def test_a_crash_mid_write_leaves_no_complete_looking_checkpoint(tmp_path, die_at_file):
    good = save_checkpoint(tmp_path, 1, {"w": np.zeros(4)})
    proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path), str(die_at_file)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".step-000002.tmp-")]
    assert len(leftovers) == 1  # the temp dir of the dead writer, invisible to readers
    assert list_checkpoints(tmp_path) == [good]
    assert latest_good(tmp_path) == good
    assert prune(tmp_path, keep=5) == leftovers  # its writer is dead: cleaned up
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]


def test_a_failed_write_cleans_up(tmp_path, monkeypatch):
    def failing(arrays, path, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", failing)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 3, {"w": np.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_single_file_save_load_round_trip(tmp_path):
    state = model_state()
    path = save(state, tmp_path / "m.safetensors", metadata={"preset": "gpt2-tiny", "n": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left
    loaded = load(path)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert_bitwise_equal(loaded[key], value)
    assert read_metadata(path) == {"preset": "gpt2-tiny", "n": 2}
    with safetensors.safe_open(str(path), framework="numpy") as f:  # plain safetensors
        assert json.loads(f.metadata()["narun"])["format"] == "narun-state-dict"


def test_single_file_corruption_and_truncation_are_refused(tmp_path):
    path = save(model_state(), tmp_path / "m.safetensors")
    flip_byte(path, offset=-3)
    with pytest.raises(CheckpointError, match=r"m\.safetensors: checksum mismatch"):
        load(path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=r"m\.safetensors: not a readable safetensors"):
        load(path)
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file"):
        load(tmp_path / "nope.safetensors")


def test_load_on_a_checkpoint_directory_gives_its_weights_or_names_the_file(tmp_path):
    state = model_state()
    run = tmp_path / "run"
    step = save_checkpoint(run / "checkpoints", 7, state, optimizer_state())
    loaded = load(step)  # a step directory: its model's weights, verified
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert_bitwise_equal(loaded[key], value)
    flip_byte(step / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load(step)
    good = save_checkpoint(run / "checkpoints", 8, state)
    for where in (run, run / "checkpoints"):  # several checkpoints: say which file to pass
        with pytest.raises(CheckpointError, match="directory of checkpoints") as err:
            load(where)
        assert f"narun.load('{good / 'model.safetensors'}')" in str(err.value)
        assert "narun.models.load_trained" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: is a directory, not a \.safetensors"):
        load(tmp_path / "empty")


def test_foreign_safetensors_files_load_unverified(tmp_path):
    safetensors.numpy.save_file({"a": np.arange(3)}, str(tmp_path / "hf.safetensors"))
    np.testing.assert_array_equal(load(tmp_path / "hf.safetensors")["a"], np.arange(3))
    assert read_metadata(tmp_path / "hf.safetensors") == {}


def test_verify_returns_the_manifest(tmp_path):
    path = save_checkpoint(tmp_path, 4, {"w": np.zeros(2)}, extra={"k": "v"})
    manifest = verify_checkpoint(path)
    assert manifest["extra"] == {"k": "v"} and set(manifest["files"]) == {"model.safetensors"}
    assert os.path.getsize(path / "model.safetensors") == manifest["files"][
        "model.safetensors"]["size"]
