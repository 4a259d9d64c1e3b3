"""`narun plot`: the PNG it writes, and the points it drew compared with the run's events."""

import json
import struct

import numpy as np
import pytest

from narun.events import ListReporter
from narun.plot import plot_run
from narun.train import train
from tests.narun.test_runlog import blobs, mlp, narun_cli  # noqa: F401  (blobs: a fixture)

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def write_events(run, events):
    run.mkdir(parents=True)
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_plot_of_a_real_run_draws_its_step_and_eval_losses(blobs, tmp_path):  # noqa: F811
    run = tmp_path / "blobs-run"
    reporter = ListReporter()
    train(mlp(blobs, run), reporter)
    out = narun_cli("plot", run)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(run / "loss.png")
    assert png_size(run / "loss.png") == (800, 500)

    plot = plot_run(run, tmp_path / "elsewhere" / "curves.png")
    assert png_size(plot.path) == (800, 500) and plot.path.stat().st_size > 1000
    events = reporter.events
    steps = [e for e in events if e["event"] == "step"]
    (done,) = [e for e in events if e["event"] == "done"]
    assert plot.title == "blobs-run" and set(plot.lines) == {"loss", "val_loss"}
    np.testing.assert_array_equal(plot.lines["loss"][0], [e["step"] for e in steps])
    np.testing.assert_array_equal(plot.lines["loss"][1], [e["loss"] for e in steps])
    evals = [(e["step"], e["val_loss"]) for e in events if e["event"] == "eval"]
    val = [*evals, (done["val_step"], done["val_loss"])]  # the last: the whole split
    assert [s for s, _ in val] == [5, 10, 15, 20]
    np.testing.assert_array_equal(plot.lines["val_loss"][0], [s for s, _ in val])
    np.testing.assert_array_equal(plot.lines["val_loss"][1], [v for _, v in val])
    losses = [e["loss"] for e in steps]
    assert max(losses) / min(losses) > 100 and plot.log_y  # 1.31 down to 0.0116 (seeded)


def test_redone_steps_keep_their_last_value_nan_is_left_out_and_log_y_past_two_decades(
        tmp_path):
    run = tmp_path / "r"
    write_events(run, [
        {"event": "step", "step": 1, "loss": 500.0}, {"event": "step", "step": 2, "loss": 50.0},
        {"event": "step", "step": 3, "loss": "nan"},
        {"event": "restart", "role": "ps", "rank": 0, "step": 1, "rolled_back_to": 1},
        {"event": "step", "step": 2, "loss": 40.0}, {"event": "step", "step": 3, "loss": 4.0},
        {"event": "eval", "step": 3, "val_loss": 4.5},
        {"event": "done", "step": 3, "val_loss": 4.25, "val_step": 3}])
    plot = plot_run(run)
    assert plot.path == run / "loss.png" and png_size(plot.path) == (800, 500)
    np.testing.assert_array_equal(plot.lines["loss"][0], [1, 2, 3])
    np.testing.assert_array_equal(plot.lines["loss"][1], [500.0, 40.0, 4.0])
    np.testing.assert_array_equal(plot.lines["val_loss"][0], [3])
    np.testing.assert_array_equal(plot.lines["val_loss"][1], [4.25])  # done's, the later
    assert plot.log_y  # 500 / 4: over two decades

    flat = tmp_path / "flat"
    write_events(flat, [{"event": "step", "step": s, "loss": 3.0 - s / 10} for s in range(5)])
    flat_plot = plot_run(flat)
    assert not flat_plot.log_y and set(flat_plot.lines) == {"loss"}


def test_plot_says_what_is_missing(tmp_path):
    write_events(tmp_path / "started", [{"event": "placement", "processes": []}])
    write_events(tmp_path / "run", [{"event": "step", "step": 1, "loss": 1.0}])
    for run, missing, expected in [
            ("nothing", [], "nothing: no events.jsonl here"),
            ("started", [], "started: events.jsonl holds no loss to plot yet"),
            ("run", ["matplotlib"], "needs matplotlib, which is not installed: pip install "
                                    "'narun[plot]'")]:
        out = narun_cli("plot", tmp_path / run, missing=missing)
        assert out.returncode == 2 and expected in out.stderr, (run, out.stderr)
    assert not (tmp_path / "run" / "loss.png").exists()
