"""The job store: jobs and events survive a restart; events live on disk, not in memory."""

from __future__ import annotations

import json

from narun.runtime.jobstore import JobStore, StoredJob


def _config(out_dir: str = "run") -> dict:
    return {"training": {"out_dir": out_dir, "steps": 10}, "runtime": {}}


def test_events_are_read_back_in_order_from_memory_and_from_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(StoredJob, "TAIL", 8)
    store = JobStore(tmp_path)
    job = store.add("demo", _config(), now=1.0)
    events = [job.append({"event": "step", "step": i, "loss": 1.0 / (i + 1)})
              for i in range(50)]
    assert [e["seq"] for e in events] == list(range(50))
    assert [e["seq"] for e in job._tail] == list(range(42, 50))
    assert job.read(45, 100) == events[45:]  # the tail, in memory
    assert job.read(0, 20) == events[:20]  # from events.jsonl
    assert job.read(40, 5) == events[40:45]  # across the boundary
    assert job._read_disk(10, 50) == events[10:]
    assert len(job._tail) == 8  # what is held in memory is bounded
    job.close()
    again = JobStore(tmp_path).jobs[job.state.job]
    assert again.count == 50 and again.read(0, 100) == events
    assert again.config["training"]["out_dir"] == str(job.directory / "run")


def test_a_line_cut_by_a_crash_is_dropped_and_appends_follow_the_last_whole_one(tmp_path):
    store = JobStore(tmp_path)
    job = store.add("demo", _config("/abs/out"), now=1.0)
    for i in range(3):
        job.append({"event": "step", "step": i})
    job.close()
    with open(job.directory / "events.jsonl", "ab") as f:
        f.write(b'{"seq": 3, "event": "st')  # the coordinator died mid-write
    again = JobStore(tmp_path).jobs[job.state.job]
    assert again.count == 3 and again.config["training"]["out_dir"] == "/abs/out"
    again.append({"event": "done", "step": 3})
    lines = (job.directory / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [0, 1, 2, 3]


def test_a_submit_that_never_completed_is_not_a_job(tmp_path):
    store = JobStore(tmp_path)
    (store.root / "half-0009").mkdir()
    (store.root / "half-0009" / "config.json").write_text("{}")  # no state.json yet
    job = store.add("next", _config(), now=1.0)
    assert list(JobStore(tmp_path).jobs) == [job.state.job]
