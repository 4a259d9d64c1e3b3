"""The job service with real processes: `narun coordinator` as a process, narun.client as
its client. A submitted job ends with the parameters `narun train` gives; jobs wait for a
slot in order; cancel drains to a loadable checkpoint; the service killed with -9 and
started again finishes the job while a client's event stream goes on."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import uvloop

from narun.checkpoint import latest_good, load_checkpoint
from narun.client import Client, JobNotFound, SyncClient
from narun.config import to_dict
from narun.errors import Refused
from narun.events import ListReporter
from narun.train import train as local_train
from tests.integration.services import ServiceProcess


@pytest.fixture
def service(tmp_path):
    started: list[ServiceProcess] = []

    def make(slots: int = 4) -> ServiceProcess:
        started.append(ServiceProcess(tmp_path / "service", slots))
        return started[-1]

    yield make
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


def _config(make_config, **options) -> dict:
    return to_dict(make_config(**options))


def test_a_submitted_job_ends_with_the_parameters_narun_train_gives(service, make_config):
    svc = service()
    config = _config(make_config, mode="ps-sync", workers=2, out="svc", steps=12,
                     eval_every=4)
    reference = local_train(make_config("local", 0, out="local", steps=12, eval_every=4),
                            ListReporter())

    async def main():
        async with Client(svc.endpoint) as client:
            job = await client.submit(config, name="equal")
            events = [e async for e in client.events(job)]
            return job, events, await client.status(job), await client.list()

    job, events, status, listed = uvloop.run(main())
    assert status.state == "done" and status.step == status.steps == 12
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 13))
    done = events[-1]
    assert done["event"] == "done"
    ours, theirs = load_checkpoint(done["checkpoint"]), load_checkpoint(reference["checkpoint"])
    for name in theirs.model:
        np.testing.assert_allclose(ours.model[name], theirs.model[name], rtol=1e-5,
                                   atol=1e-7, err_msg=name)
    assert [(s.job, s.name, s.state) for s in listed] == [(job, "equal", "done")]
    assert svc.stop() == 0


def test_jobs_wait_for_a_slot_in_order(service, make_config):
    svc = service(slots=1)
    with SyncClient(svc.endpoint) as client:
        first = client.submit(_config(make_config, mode="local", workers=0, out="a", steps=15))
        second = client.submit(_config(make_config, mode="local", workers=0, out="b",
                                       steps=5))
        assert client.status(second).state == "queued"
        assert client.wait(first).state == "done"
        assert client.wait(second).state == "done"
    states = {j: json.loads((svc.state_dir / "jobs" / j / "state.json").read_text())
              for j in (first, second)}
    assert states[second]["started"] >= states[first]["ended"]  # one after the other
    svc.stop()


def test_cancel_drains_to_a_loadable_checkpoint(service, make_config):
    svc = service()
    config = _config(make_config, mode="ps-sync", workers=2, out="c", steps=100000,
                     checkpoint_every=1000)

    async def main():
        async with Client(svc.endpoint) as client:
            job = await client.submit(config)
            async for event in client.events(job):
                if event["event"] == "step" and event["step"] >= 5:
                    await client.cancel(job, "enough")
            return await client.status(job)

    status = uvloop.run(main())
    assert status.state == "cancelled" and status.message == "cancelled: enough"
    run = Path(config["training"]["out_dir"])
    if not run.is_absolute():
        run = svc.state_dir / "jobs" / status.job / "run"
    checkpoint = latest_good(run / "checkpoints")
    assert checkpoint is not None
    assert load_checkpoint(checkpoint).step >= 5
    svc.stop()


@pytest.mark.timeout(180)
def test_a_killed_service_started_again_finishes_the_job_and_the_stream_goes_on(
        service, make_config):
    clean = local_train(make_config("local", 0, out="clean", steps=60,
                                    checkpoint_every=10), ListReporter())
    svc = service()
    port = int(svc.endpoint.rsplit(":", 1)[1])
    config = _config(make_config, mode="ps-sync", workers=2, out="k", steps=60,
                     checkpoint_every=10)
    config["runtime"]["heartbeat_timeout"] = 3.0

    async def main():
        async with Client(svc.endpoint, timeout=30.0, follow_idle=1.0) as client:
            job = await client.submit(config)
            seen: list[dict] = []
            async for event in client.events(job):
                seen.append(event)
                if event["event"] == "checkpoint" and event["step"] == 20 and \
                        svc.proc.poll() is None:
                    svc.proc.kill()  # kill -9: its job dies with it
                    svc.proc.wait(10)
                    await asyncio.to_thread(svc.start, port)
            return seen, await client.status(job)

    seen, status = uvloop.run(main())
    assert status.state == "done", status
    kinds = [e["event"] for e in seen]
    assert "resumed" in kinds
    assert [e["seq"] for e in seen] == list(range(len(seen)))  # nothing lost or repeated
    resumed = next(e for e in seen if e["event"] == "resumed")
    assert resumed["step"] >= 20
    assert seen[-1]["event"] == "done"
    assert seen[-1]["val_loss"] == pytest.approx(clean["val_loss"], rel=0.05)
    svc.stop()


def test_errors_are_typed(service, make_config):
    svc = service()

    async def main():
        async with Client(svc.endpoint) as client:
            with pytest.raises(JobNotFound):
                await client.status("nope-0001")
            bad = _config(make_config)
            bad["model"]["name"] = "gtp"
            with pytest.raises(Refused, match=r"submit.config: model.name: must be one of"):
                await client.submit(bad)

    uvloop.run(main())
    svc.stop()



def test_sigterm_drains_running_jobs_and_they_resume_when_it_is_back(service, make_config):
    svc = service()
    port = int(svc.endpoint.rsplit(":", 1)[1])
    config = _config(make_config, mode="ps-sync", workers=2, out="d", steps=400,
                     checkpoint_every=1000)
    with SyncClient(svc.endpoint) as client:
        job = client.submit(config)
        for event in client.events(job):
            if event["event"] == "step" and event["step"] >= 5:
                break
    assert svc.stop() == 0  # drained: the job checkpointed, then the service exited
    state = json.loads((svc.state_dir / "jobs" / job / "state.json").read_text())
    assert (state["state"], state["resume"]) == ("queued", True)
    svc.start(port)
    with SyncClient(svc.endpoint) as client:
        final = client.wait(job)
        events = list(client.events(job))
    assert final.state == "done" and final.step == 400
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] >= 5
    svc.stop()


def test_a_deadline_fails_the_job_in_words(service, make_config):
    svc = service()
    config = _config(make_config, mode="local", workers=0, out="late", steps=10**7,
                     checkpoint_every=10**6)
    config["runtime"]["deadline"] = 2.0
    with SyncClient(svc.endpoint) as client:
        final = client.wait(client.submit(config))
    assert final.state == "failed"
    assert final.message.startswith("deadline: it ran ")
    assert "over runtime.deadline 2 s" in final.message
    svc.stop()


def test_a_failing_job_is_retried_then_fails_saying_why(service, make_config, tmp_path):
    svc = service()
    config = _config(make_config, mode="local", workers=0, out="bad", steps=5)
    config["data"]["path"] = str(tmp_path / "vanishes.npz")
    np.savez(config["data"]["path"], x=np.zeros((8, 16), np.float32),
             y=np.zeros(8, np.int64))
    config["runtime"]["job_retries"] = 1
    with SyncClient(svc.endpoint) as client:
        job = client.submit(config)  # checks, then the data goes away before it runs
        Path(config["data"]["path"]).unlink()
        final = client.wait(job)
    state = json.loads((svc.state_dir / "jobs" / job / "state.json").read_text())
    assert final.state == "failed" and state["attempts"] == 2  # once, and one retry
    assert "vanishes.npz" in final.message and "narun data blobs" in final.message
    svc.stop()


@pytest.mark.timeout(120)
def test_a_service_over_agents_runs_jobs_through_launch(tmp_path, make_config):
    from tests.integration.agents import AgentProcess

    agents = [AgentProcess("tcp://127.0.0.1:0", tmp_path / f"agent{i}", slots=2)
              for i in range(2)]
    hosts = ",".join(a.endpoint.removeprefix("tcp://") for a in agents)
    svc = ServiceProcess(tmp_path / "service", slots=None, hosts=hosts)  # the agents' slots
    try:
        with SyncClient(svc.endpoint) as client:
            job = client.submit(_config(make_config, mode="ps-sync", workers=2, out="h",
                                        steps=8))
            events = list(client.events(job))
            final = client.status(job)
    finally:
        svc.stop()
        for a in agents:
            a.stop()
    assert final.state == "done"
    assert svc.lines("service.listening")[0]["slots"] == 4  # 2 agents x 2
    placement = next(e for e in events if e["event"] == "placement")
    assert {p["host"] for p in placement["processes"]} == set(hosts.split(","))


def test_a_client_fetches_a_job_s_checkpoint(service, make_config, tmp_path):
    svc = service()
    config = _config(make_config, mode="local", workers=0, out="f", steps=6)
    with SyncClient(svc.endpoint) as client:
        job = client.submit(config)
        assert client.wait(job).state == "done"
        local = client.fetch_checkpoint(job, tmp_path / "fetched")
        with pytest.raises(Refused, match="read only"):
            uvloop.run(_remove(svc.endpoint, job))
    done = load_checkpoint(local)
    served = load_checkpoint(Path(config["training"]["out_dir"]) / "checkpoints" / local.name)
    assert done.step == 6 and local.name == "step-000006"
    for name in served.model:
        np.testing.assert_array_equal(done.model[name], served.model[name])
    svc.stop()


async def _remove(endpoint: str, job: str) -> None:
    from narun.runtime.mailbox import new_id
    from protocol import message

    async with Client(endpoint) as client:
        await client._call(message("file_get", new_id(), job=job, path="checkpoints",
                                   offset=0, size=1, remove=True), "a removal")


def test_the_command_line_client(service, make_config, tmp_path):
    svc = service()
    env = {**os.environ, "NARUN_COORDINATOR": svc.endpoint}

    def narun(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "narun.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(_config(make_config, mode="local", workers=0, out="cli",
                                         steps=5)))
    followed = narun("submit", str(config), "--follow", "--json", "--name", "cli")
    assert followed.returncode == 0, followed.stderr
    events = [json.loads(line) for line in followed.stdout.splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5]
    assert events[-1]["event"] == "done"
    queued = narun("submit", str(config), "--set", "training.steps=100000", "--set",
                   "training.out_dir=long", "--name", "long")  # relative: in the job's dir
    job = queued.stdout.strip()
    assert queued.returncode == 0 and job.startswith("long-")
    table = narun("status")
    assert table.returncode == 0
    rows = [line.split() for line in table.stdout.splitlines()]
    assert rows[0] == ["JOB", "STATE", "STEP", "MESSAGE"] and rows[1][:3] == [
        "cli-0001", "done", "5/5"]
    logs = narun("logs", "cli-0001")
    assert [json.loads(line) for line in logs.stdout.splitlines()] == [
        {**e, "seq": i} for i, e in enumerate(events)]
    cancelled = narun("cancel", job, "--reason", "test over")
    assert cancelled.returncode == 0 and "cancelled: test over" in cancelled.stdout
    with SyncClient(svc.endpoint) as client:
        assert client.wait(job).state == "cancelled"
    missing = narun("status", "nope-0009")
    assert missing.returncode == 1 and "no job 'nope-0009'" in missing.stderr
    svc.stop()


def test_the_service_speaks_sd_notify(tmp_path):
    import socket

    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        svc = ServiceProcess(tmp_path / "service",
                             env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        got = [sock.recv(4096).decode() for _ in range(3)]
        assert got[0].startswith("READY=1\nSTATUS=serving on tcp://127.0.0.1:")
        assert got[1:] == ["WATCHDOG=1"] * 2
        assert svc.stop() == 0
        messages = []
        while not any(m.startswith("STOPPING=1") for m in messages):
            messages.append(sock.recv(4096).decode())
    finally:
        sock.close()
