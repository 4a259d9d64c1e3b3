"""Agents on this machine (loopback): launch through them gives one process's result, a
silent coordinator leaves no process behind, an unauthorised peer gets nothing through,
systemd hears READY / WATCHDOG / STOPPING, a lost host is survived. The same across
network namespaces is tests/integration/test_hosts.py."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from narun.checkpoint import load_checkpoint
from narun.errors import ConfigError
from narun.events import JsonLinesReporter
from narun.runtime.launch import launch
from narun.train import train as local_train
from protocol import message
from protocol.codec import encode
from protocol.keys import generate_keypair, load_keypair, load_node_keys, load_public_key
from tests.integration.agents import AgentProcess, agent_thread, make_keys
from tests.integration.conftest import Faults, assert_same_checkpoint

BUCKET = 512


def _launch(cfg, hosts, keys=None, reporter=None, **options):
    cfg.runtime.hosts = hosts
    out = io.StringIO()
    done = launch(cfg, keys, reporter or JsonLinesReporter(out), bucket_bytes=BUCKET,
                  wait_timeout=30.0, **options)
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    return done, events


@pytest.mark.timeout(120)
def test_launch_over_two_agents_equals_one_process(make_config, tmp_path):
    agents = [AgentProcess("tcp://127.0.0.1:0", tmp_path / f"agent{i}", slots=2)
              for i in range(2)]
    try:
        reference = local_train(make_config("local", 0, out="local"),
                                JsonLinesReporter(io.StringIO()))
        hosts = [a.endpoint.removeprefix("tcp://") for a in agents]
        done, events = _launch(make_config("ps-sync", 2, out="dist", eval_every=5), hosts)
    finally:
        codes = [a.stop() for a in agents]
    assert codes == [0, 0]  # drained on SIGTERM
    assert done["step"] == 10 and not done["interrupted"]
    assert_same_checkpoint(reference["checkpoint"], done["checkpoint"])
    placement = next(e for e in events if e["event"] == "placement")
    where = {(p["role"], p["rank"]): p["host"] for p in placement["processes"]}
    assert where[("ps", 0)] != where[("ps", 1)]  # shards spread over the hosts first
    assert sorted(where) == [("ps", 0), ("ps", 1), ("trainer", 0), ("trainer", 1)]
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 11))
    # the shards started from state shipped to their hosts, and their slices were gathered
    # over the protocol (and removed there): nothing came through a shared directory
    shipped = [list((tmp_path / f"agent{i}").glob("jobs/*/data/init-*.safetensors"))
               for i in range(2)]
    assert all(len(files) == 1 for files in shipped), shipped
    assert not list(tmp_path.glob("agent*/jobs/*/.shards/*/*.safetensors"))


def test_launch_names_a_host_whose_agent_does_not_answer_within_seconds(make_config):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    began = time.monotonic()
    with pytest.raises(ConfigError, match=rf"host 127.0.0.1:{port}: its agent .* did not "
                                          r"answer within 5 s.*narun agent"):
        _launch(make_config("ps-sync", 2), [f"127.0.0.1:{port}"])
    assert time.monotonic() - began < 15


def test_launch_refuses_a_job_bigger_than_the_hosts_slots(make_config, tmp_path):
    agent = AgentProcess("tcp://127.0.0.1:0", tmp_path / "agent", slots=2)
    try:
        with pytest.raises(ConfigError, match=r"needs 4 processes but the hosts' free slots "
                                              r"are 127.0.0.1:\d+ 2"):
            _launch(make_config("ps-sync", 2), [agent.endpoint.removeprefix("tcp://")])
    finally:
        assert agent.stop() == 0


def test_an_unauthorised_peer_gets_no_message_processed(make_config, tmp_path):
    coordinator = make_keys(tmp_path / "keys", ["127.0.0.1"])
    generate_keypair(tmp_path / "stranger", "stranger")
    stranger = load_keypair(tmp_path / "stranger" / "stranger.key_secret")
    agent_key = load_public_key(tmp_path / "keys" / "127.0.0.1" / "127.0.0.1.key")
    hello = encode(message("hello", 1, role="coordinator", rank=0, software="x"))
    with agent_thread(tmp_path / "state", load_node_keys(tmp_path / "keys" / "127.0.0.1"),
                      slots=4) as agent:
        ctx = zmq.Context()
        try:
            peers = [ctx.socket(zmq.DEALER) for _ in range(2)]
            peers[0].curve_serverkey = agent_key  # CURVE, but a key the agent never admitted
            peers[0].curve_publickey, peers[0].curve_secretkey = stranger.public, stranger.secret
            for peer in peers:  # and one in plaintext
                peer.linger = 0
                peer.sndtimeo = 100
                peer.connect(agent.endpoint)
                for _ in range(1000):
                    try:
                        peer.send_multipart(hello)
                    except zmq.Again:  # nothing is ever admitted, so the queue stays full
                        break
            time.sleep(1.0)
            assert agent.processed == 0
            for peer in peers:
                assert peer.poll(200) == 0  # no reply either
        finally:
            ctx.destroy(linger=0)
        # the authorised coordinator's job runs through the same agent, unaffected
        port = agent.endpoint.rsplit(":", 1)[1]
        done, _ = _launch(make_config("ps-sync", 2, steps=3), [f"127.0.0.1:{port}"],
                          keys=str(coordinator))
        assert done["step"] == 3 and agent.processed > 0


def test_launch_without_keys_to_a_remote_host_says_how_to_make_them(make_config):
    with pytest.raises(ConfigError, match=r"--keys: .*narun keys generate DIR --name "
                                          r"coordinator"):
        _launch(make_config("ps-sync", 2), ["10.213.0.11"])


@pytest.mark.timeout(90)
def test_a_silent_coordinator_s_processes_are_killed_by_the_agent(make_config, tmp_path):
    cfg = make_config("ps-sync", 2, steps=100000, heartbeat_timeout=2.0)
    with agent_thread(tmp_path / "state", slots=4) as agent:
        config = tmp_path / "job.yaml"
        from narun.config import to_dict
        config.write_text(json.dumps(to_dict(cfg)))
        port = agent.endpoint.rsplit(":", 1)[1]
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "narun.cli", "launch", str(config), "--hosts",
             f"127.0.0.1:{port}", "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert coordinator.stdout is not None
            for line in coordinator.stdout:  # running: steps are reported
                if json.loads(line)["event"] == "step":
                    break
            pids = [pid for job in agent.jobs.values() for pid in job.children]
            assert len(pids) == 4
            for pid in pids:  # hung: they cannot notice the coordinator's death themselves
                os.kill(pid, signal.SIGSTOP)
            coordinator.kill()  # kill -9: no shutdown reaches anyone
            coordinator.wait(10)
            deadline = time.monotonic() + 2.0 + 8.0
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.1)
            assert not any(_alive(p) for p in pids), "orphaned workers"
        finally:
            coordinator.kill()
            coordinator.wait(10)


def test_agent_speaks_sd_notify_ready_watchdog_and_stopping(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    try:
        agent = AgentProcess("tcp://127.0.0.1:0", tmp_path / "agent",
                             env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        got = [sock.recv(4096).decode() for _ in range(4)]
        assert got[0].startswith("READY=1\nSTATUS=serving on tcp://127.0.0.1:")
        assert got[1:] == ["WATCHDOG=1"] * 3  # every 100 ms, from the agent's loop
        assert agent.stop() == 0
        messages = []
        while not any(m.startswith("STOPPING=1") for m in messages):
            messages.append(sock.recv(4096).decode())
    finally:
        sock.close()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("lost,role", [(2, "trainer"), (1, "ps")])
def test_a_lost_host_is_survived(make_config, tmp_path, lost, role):
    agents = [AgentProcess("tcp://127.0.0.1:0", tmp_path / f"agent{i}", slots=2)
              for i in range(3)]
    hosts = [a.endpoint.removeprefix("tcp://") for a in agents]
    try:
        clean, _ = _launch(make_config("ps-sync", 2, out="clean", steps=30), hosts)
        # shards go first, one per host, then trainers: host 1 runs ps 1 alone, host 2
        # trainer 0 alone (a lost shard rolls the job back to its last checkpoint)
        faults = LoseHost(agents[lost], at_step=8)
        done, _ = _launch(make_config("ps-sync", 2, out="faulty", steps=30,
                                      heartbeat_timeout=3.0, checkpoint_every=5),
                          hosts, reporter=faults)
    finally:
        for a in agents:
            a.stop()
    assert [e["host"] for e in faults.of("host_lost")] == [hosts[lost]]
    restarts = faults.of("restart")
    assert restarts and restarts[0]["role"] == role and "was lost with its host" in \
        restarts[0]["reason"]
    assert done["step"] == 30 and done["restarts"] >= 1
    assert done["val_loss"] == pytest.approx(clean["val_loss"], rel=0.05)
    final = load_checkpoint(done["checkpoint"]).model
    assert all(np.isfinite(v).all() for v in final.values())


class LoseHost(Faults):
    """Kills a host's agent, and with it the processes it started, at a given step."""

    def __init__(self, agent: AgentProcess, at_step: int) -> None:
        super().__init__({})
        self.agent, self.at_step = agent, at_step

    def emit(self, event: str, **fields) -> None:
        super().emit(event, **fields)
        if event == "step" and fields["step"] == self.at_step:
            os.kill(self.agent.proc.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(90)
def test_a_dead_worker_is_restarted_on_its_own_host_while_its_agent_lives(make_config,
                                                                          tmp_path):
    import uvloop

    from narun.runtime import Coordinator
    from narun.runtime.agents import AgentProcesses
    from narun.runtime.hosts import parse_hosts

    agents = [AgentProcess("tcp://127.0.0.1:0", tmp_path / f"agent{i}", slots=3)
              for i in range(2)]
    hosts = parse_hosts([a.endpoint.removeprefix("tcp://") for a in agents])
    faults = Faults({4: ("trainer", 1, signal.SIGKILL)})
    processes = AgentProcesses(hosts, None, "restart-test", faults.emit)
    coordinator = Coordinator(make_config("ps-sync", 2, steps=12), faults,
                              processes=processes, bucket_bytes=BUCKET, wait_timeout=30.0)
    faults.coordinator = coordinator
    try:
        done = uvloop.run(coordinator.run())
        before = next(p["host"] for p in faults.of("placement")[0]["processes"]
                      if (p["role"], p["rank"]) == ("trainer", 1))
    finally:
        for a in agents:
            a.stop()
    assert done["step"] == 12 and done["restarts"] == 1
    [restart] = faults.of("restart")
    assert (restart["role"], restart["rank"]) == ("trainer", 1)
    assert "killed by signal 9" in restart["reason"]
    assert not faults.of("host_lost")
    assert str(processes.placement[("trainer", 1)]) == before  # the same host again
    assert coordinator.supervisor.failures[0].host == before  # named where it died
    replacement = next(c for c in coordinator.children if c.name == "trainer 1")
    assert replacement.host == before and replacement.pid != faults.signalled[0][2]


@pytest.mark.timeout(90)
def test_one_agent_serves_two_jobs_at_once_within_its_slots(make_config, tmp_path):
    from narun.config import to_dict

    agent = AgentProcess("tcp://127.0.0.1:0", tmp_path / "agent", slots=8)
    host = agent.endpoint.removeprefix("tcp://")
    jobs = {}
    try:
        for name in ("a", "b"):  # two coordinators (processes: each seeds its own job)
            config = tmp_path / f"{name}.yaml"
            config.write_text(json.dumps(to_dict(make_config("ps-sync", 2, out=name,
                                                             steps=15))))
            jobs[name] = subprocess.Popen(
                [sys.executable, "-m", "narun.cli", "launch", str(config), "--hosts", host,
                 "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        outs = {name: job.communicate(timeout=80) for name, job in jobs.items()}
    finally:
        for job in jobs.values():
            job.kill()
        assert agent.stop() == 0
    done = {}
    for name, (stdout, stderr) in outs.items():
        assert jobs[name].returncode == 0, stderr
        done[name] = json.loads(stdout.splitlines()[-1])
    assert done["a"]["step"] == done["b"]["step"] == 15
    assert done["a"]["val_loss"] == pytest.approx(done["b"]["val_loss"], rel=1e-6)
    placements = [json.loads(out[0].splitlines()[0]) for out in outs.values()]
    assert all(p["event"] == "placement" and len(p["processes"]) == 4 for p in placements)


def test_launch_names_a_host_that_cannot_reach_the_coordinator(tmp_path):
    import uvloop
    import zmq.asyncio

    from narun.runtime.agents import AgentLink
    from narun.runtime.hosts import parse_hosts

    with socket.socket() as s:  # the coordinator's address, as the host would dial it
        s.bind(("127.0.0.1", 0))
        closed = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with agent_thread(tmp_path / "state") as agent:
        [host] = parse_hosts([agent.endpoint.removeprefix("tcp://")])

        async def hello() -> None:
            context = zmq.asyncio.Context()
            link = AgentLink(host, "probe-test", context, None, 0.5, 2.0, lambda *_: None)
            try:
                await link.hello(closed)
            finally:
                link.close()
                context.destroy(linger=0)

        with pytest.raises(ConfigError, match=rf"host {host}: cannot reach the coordinator "
                                              rf"at {closed} \(.*refused.*\)"):
            uvloop.run(hello())


@pytest.mark.timeout(120)
def test_an_agent_stopped_mid_run_hands_its_work_to_the_other_hosts(make_config, tmp_path):
    agents = [AgentProcess("tcp://127.0.0.1:0", tmp_path / f"agent{i}", slots=2, grace=5.0)
              for i in range(3)]
    hosts = [a.endpoint.removeprefix("tcp://") for a in agents]
    stopped: list[int] = []

    class StopHost(Faults):
        def emit(self, event: str, **fields) -> None:
            super().emit(event, **fields)
            if event == "step" and fields["step"] == 6 and not stopped:
                stopped.append(1)
                agents[2].proc.send_signal(signal.SIGTERM)  # drain trainer 0's host

    faults = StopHost({})
    try:
        done, _ = _launch(make_config("ps-sync", 2, steps=25, heartbeat_timeout=3.0), hosts,
                          reporter=faults)
        assert agents[2].proc.wait(30) == 0  # drained and exited
    finally:
        for a in agents:
            a.stop()
    assert done["step"] == 25 and not done["interrupted"]
    assert [e["host"] for e in faults.of("host_lost")] == [hosts[2]]
    # a planned leave: restarted once, on another host, and nothing drawn from the budget
    [restart] = faults.of("restart")
    assert (restart["role"], restart["rank"]) == ("trainer", 0)
    assert restart["host"] != hosts[2] and done["restarts"] == 0


async def _until_it_catches(pid: int, sig: int, timeout: float = 30.0) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        [caught] = [line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")]
        if int(caught, 16) >> (sig - 1) & 1:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"process {pid} did not install a handler for signal {sig} in {timeout} s")


def test_a_draining_agent_refuses_to_start_more(make_config, tmp_path):
    import asyncio

    import uvloop
    import zmq.asyncio

    from narun.config import to_dict
    from narun.errors import Refused
    from narun.runtime.agents import AgentLink
    from narun.runtime.hosts import parse_hosts
    from narun.runtime.spec import WorkerSpec

    spec = WorkerSpec(to_dict(make_config("ps-sync", 2)), "tcp://127.0.0.1:9", 512, 5.0)
    with agent_thread(tmp_path / "state") as agent:
        [host] = parse_hosts([agent.endpoint.removeprefix("tcp://")])

        async def scenario() -> None:
            context = zmq.asyncio.Context()
            link = AgentLink(host, "drain-test", context, None, 0.5, 5.0, lambda *_: None)
            try:
                await link.mailbox.call(message("hello", 1, role="coordinator", rank=0,
                                                software="x"), timeout=5, what="welcome")
                child = await link.spawn("trainer", 0, spec, 0, 1)
                # Stopped before its SIGTERM handler exists, the default action would kill
                # it at once (a fatal signal ends even a stopped process) and the drain would
                # not wait: stop it only once it catches SIGTERM.
                await _until_it_catches(child.pid, signal.SIGTERM)
                os.kill(child.pid, signal.SIGSTOP)  # it cannot leave: the drain waits
                agent.stop_threadsafe()  # SIGTERM, as systemd sends it
                await asyncio.sleep(0.3)
                with pytest.raises(Refused, match="draining"):
                    await link.spawn("trainer", 1, spec, 0, 1)
            finally:
                link.close()
                context.destroy(linger=0)

        uvloop.run(scenario())
