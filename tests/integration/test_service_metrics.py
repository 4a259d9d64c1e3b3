"""The job service's Prometheus endpoint, scraped over HTTP after real jobs and parsed with
prometheus_client's parser."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from narun.client import SyncClient
from narun.config import to_dict

parser = pytest.importorskip("prometheus_client.parser")


def test_metrics_describe_jobs_by_state_and_each_job_s_steps(make_config, tmp_path):
    log = tmp_path / "service.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "narun.cli", "--log-json", "coordinator", "--listen",
             "tcp://127.0.0.1:0", "--state-dir", str(tmp_path / "state"), "--slots", "4",
             "--metrics-port", "0"], stderr=out, stdout=subprocess.DEVNULL)
    try:
        listening = _wait_for(log, "service.listening")
        with SyncClient(listening["endpoint"]) as client:
            job = client.submit(to_dict(make_config("ps-sync", 2, out="m", steps=7)))
            assert client.wait(job).state == "done"
            time.sleep(1.5)  # the service counts job states once a second
        text = urllib.request.urlopen(listening["metrics"], timeout=10).read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in parser.text_string_to_metric_families(text)
               for s in family.samples}
    assert samples[("narun_jobs", (("state", "done"),))] == 1
    assert samples[("narun_jobs", (("state", "running"),))] == 0
    assert samples[("narun_step", (("job", job),))] == 7
    assert samples[("narun_steps_total", (("job", job),))] == 7
    assert samples[("narun_checkpoints_total", (("job", job),))] >= 1
    assert ("narun_messages_refused_total", ()) in samples


def _wait_for(log, event: str) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if f'"{event}"' in line:
                return json.loads(line)
        time.sleep(0.05)
    raise TimeoutError(log.read_text())
