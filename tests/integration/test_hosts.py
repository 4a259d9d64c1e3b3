"""Across hosts: three network namespaces, each with `narun agent` (CURVE keys), and the
coordinator in the root namespace reaching them over a bridge. A ps-sync job over them
equals one process; a host killed mid-run is survived; a stranger gets nothing through."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from narun.events import JsonLinesReporter
from narun.runtime.launch import launch
from narun.train import train as local_train
from protocol.keys import authorize, generate_keypair
from tests.integration.conftest import Faults, assert_same_checkpoint

pytestmark = pytest.mark.netns

BUCKET = 512


@pytest.fixture
def hosts(netns_cluster, tmp_path):
    """3 hosts with agents; returns (cluster, agents, coordinator key dir)."""
    cluster = netns_cluster(3)
    coordinator = tmp_path / "keys"
    generate_keypair(coordinator, "coordinator")
    agents = cluster.start_agents(tmp_path / "hosts", slots=2,
                                  authorize=[coordinator / "coordinator.key"])
    for agent in agents:  # the coordinator finds each agent's key under its address
        authorize(coordinator, agent.public_key, name=agent.spec.address)
    return cluster, agents, coordinator


def _launch(cfg, agents, keys, reporter):
    cfg.runtime.hosts = [a.spec.address for a in agents]
    return launch(cfg, str(keys), reporter, bucket_bytes=BUCKET, wait_timeout=30.0)


@pytest.mark.timeout(180)
def test_ps_sync_over_three_hosts_equals_one_process(hosts, make_config):
    cluster, agents, keys = hosts
    reference = local_train(make_config("local", 0, out="local"),
                            JsonLinesReporter(io.StringIO()))
    events = Faults({})
    done = _launch(make_config("ps-sync", 2, out="dist", eval_every=5), agents, keys, events)
    assert done["step"] == 10 and not done["interrupted"]
    assert_same_checkpoint(reference["checkpoint"], done["checkpoint"])
    [placement] = events.of("placement")
    where = {(p["role"], p["rank"]): p["host"] for p in placement["processes"]}
    addresses = [a.spec.address for a in agents]
    assert where == {("ps", 0): addresses[0], ("ps", 1): addresses[1],
                     ("trainer", 0): addresses[2], ("trainer", 1): addresses[0]}
    # every process ran in its host's namespace and is gone
    for agent in agents:
        assert agent.spec.host.pids() == [agent.process.pid]


@pytest.mark.timeout(240)
def test_a_host_killed_mid_run_is_survived(hosts, make_config):
    cluster, agents, keys = hosts
    clean = _launch(make_config("ps-sync", 2, out="clean", steps=30), agents, keys,
                    Faults({}))
    lost = agents[2].spec.host  # trainer 0's host
    faults = KillHost(lost, at_step=8)
    done = _launch(make_config("ps-sync", 2, out="faulty", steps=30, heartbeat_timeout=3.0),
                   agents, keys, faults)
    assert [e["host"] for e in faults.of("host_lost")] == [lost.address]
    [restart] = faults.of("restart")
    assert restart["role"] == "trainer" and restart["rank"] == 0
    assert f"was lost with its host {lost.address}" in restart["reason"]
    assert done["step"] == 30 and done["restarts"] == 1
    assert done["val_loss"] == pytest.approx(clean["val_loss"], rel=0.05)
    assert lost.pids() == []


@pytest.mark.timeout(120)
def test_a_stranger_gets_nothing_through_and_the_job_is_unaffected(hosts, make_config,
                                                                  tmp_path):
    cluster, agents, keys = hosts
    generate_keypair(tmp_path / "stranger", "stranger")
    flood = [sys.executable, "-c", _FLOOD, agents[0].endpoint, agents[2].endpoint,
             str(agents[0].public_key), str(tmp_path / "stranger" / "stranger.key_secret")]
    stranger = cluster.hosts[1].run(flood, stdout=subprocess.PIPE, text=True)
    done = _launch(make_config("ps-sync", 2, steps=10), agents[:2], keys, Faults({}))
    out, _ = stranger.communicate(timeout=60)
    assert stranger.returncode == 0, out
    assert json.loads(out) == {"replies": 0, "sent": 4000}
    assert done["step"] == 10
    for agent in agents:
        agent.process.send_signal(signal.SIGTERM)
        assert agent.process.wait(30) == 0
    stopped = {a.spec.host.short: _stopped_line(a.log) for a in agents}
    assert stopped["h3"]["processed"] == 0  # flooded, and served nothing
    # h1 refused the stranger's key by its allow-list (h3's handshakes, with h1's server
    # key, failed before it; plaintext never gets that far anywhere)
    assert stopped["h1"]["denied"] > 0
    assert stopped["h1"]["processed"] > 0  # the job's own messages


# From another host: 1000 hellos in plaintext and 1000 with an unauthorised CURVE key to
# each of two agents; prints how many replies came back.
_FLOOD = r"""
import json, sys, time, zmq
from protocol.codec import encode
from protocol.messages import message
from protocol.keys import load_keypair, load_public_key
a, b, server_key, secret = sys.argv[1:]
me = load_keypair(secret)
hello = encode(message("hello", 1, role="coordinator", rank=0, software="x"))
ctx = zmq.Context()
socks, sent = [], 0
for endpoint in (a, b):
    for curve in (False, True):
        s = ctx.socket(zmq.DEALER)
        s.linger, s.sndtimeo = 0, 100
        if curve:
            s.curve_serverkey = load_public_key(server_key)
            s.curve_publickey, s.curve_secretkey = me.public, me.secret
        s.connect(endpoint)
        for _ in range(1000):
            try:
                s.send_multipart(hello)
            except zmq.Again:
                s.close(0)
                s = ctx.socket(zmq.DEALER)  # a fresh connection: a fresh handshake to refuse
                s.linger, s.sndtimeo = 0, 100
                if curve:
                    s.curve_serverkey = load_public_key(server_key)
                    s.curve_publickey, s.curve_secretkey = me.public, me.secret
                s.connect(endpoint)
            sent += 1
        socks.append(s)
time.sleep(2.0)
replies = sum(1 for s in socks if s.poll(100))
print(json.dumps({"replies": replies, "sent": sent}))
ctx.destroy(linger=0)
"""


class KillHost(Faults):
    """At a step, SIGKILL everything in a host's namespace: its agent and its workers."""

    def __init__(self, host, at_step: int) -> None:
        super().__init__({})
        self.host, self.at_step = host, at_step

    def emit(self, event: str, **fields) -> None:
        super().emit(event, **fields)
        if event == "step" and fields["step"] == self.at_step:
            for pid in self.host.pids():
                os.kill(pid, signal.SIGKILL)


def _stopped_line(log) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if '"agent.stopped"' in line:
                return json.loads(line)
        time.sleep(0.1)
    raise AssertionError(f"no agent.stopped line in {log}")
