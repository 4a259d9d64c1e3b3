"""scripts/netns_cluster.py: hosts as network namespaces on one bridge reach each other and
the root namespace's gateway over TCP, agents start inside their own namespace with keys,
and teardown (normal, after an exception, on SIGINT/SIGTERM of the script, or by sweeping
a crashed run's leftovers) leaves no process, namespace or link behind."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from protocol.keys import generate_keypair, load_public_key
from scripts import netns_cluster as nc
from scripts.netns_cluster import AgentSpec, Cluster, ClusterError, Host, narun_agent_argv

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "netns-cluster"

# A TCP server answering each connection with what it read, upper-cased.
ECHO_SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    conn, _ = server.accept()
    with conn:
        conn.settimeout(5)
        conn.sendall(conn.recv(64).upper())
"""
CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
    conn.sendall(sys.argv[3].encode())
    print(conn.recv(64).decode())
"""


def ask(address: str, port: int, text: str, timeout: float = 10.0) -> str:
    """From this (the root) namespace: send text to an echo server, retrying until it
    listens; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=2) as conn:
                conn.sendall(text.encode())
                return conn.recv(64).decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie may wait for a pid 1
    that does not reap; it holds no namespace and runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10,
                         check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


def assert_gone(cluster: Cluster, pids: list[int] | None) -> None:
    if pids is not None:
        assert pids, "the test started no process"
        assert [pid for pid in pids if running(pid)] == []
    assert not {h.name for h in cluster.hosts} & namespaces()
    assert not {l for l in links() if l.startswith(f"nr-{cluster.tag}-")}
    assert cluster.bridge not in links()
    assert not (nc.STATE_DIR / cluster.tag).exists()


# --- no root needed ---------------------------------------------------------------------


def test_default_agent_command_is_narun_agent() -> None:
    host = Host(1, "narun-abcdef-h1", "h1", "10.213.0.11", None)  # type: ignore[arg-type]
    spec = AgentSpec(host, host.address, 7600, "tcp://10.213.0.11:7600", Path("/k/h1/keys"),
                     "h1", Path("/k/h1/state"), 4)
    assert narun_agent_argv(spec) == [
        sys.executable, "-m", "narun.cli", "agent", "--listen", "tcp://10.213.0.11:7600",
        "--keys", "/k/h1/keys", "--slots", "4", "--state-dir", "/k/h1/state"]


def test_script_refuses_to_run_without_root(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert nc.main(["up", "2"]) == 2
    assert "must run as root" in capsys.readouterr().err
    assert "need root" in (nc.unavailable_reason() or "")


def test_unavailable_without_iproute2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(nc.shutil, "which", lambda name: None)
    assert nc.unavailable_reason() == "`ip` (iproute2) is not installed"


def test_host_count_is_checked() -> None:
    with pytest.raises(ClusterError, match=r"hosts: expected 1\.\.200, got 0"):
        Cluster(0)


# --- network namespaces -----------------------------------------------------------------

netns = pytest.mark.netns


@netns
def test_each_host_has_its_address_and_only_the_bridge_subnet(netns_cluster) -> None:
    cluster = netns_cluster(3)
    subnet = str(cluster.subnet)
    assert cluster.gateway == subnet.replace("0/24", "1")
    gateway = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", cluster.bridge],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    assert f"inet {cluster.gateway}/24" in gateway
    for i, host in enumerate(cluster.hosts, 1):
        assert host.name == f"narun-{cluster.tag}-h{i}"
        assert host.address == subnet.replace("0/24", str(10 + i))
        addr = host.call(["ip", "-4", "-o", "addr", "show"]).stdout
        assert f"inet {host.address}/24" in addr and "inet 127.0.0.1/8" in addr
        # no default route: from inside, nothing but the bridge's subnet is reachable
        routes = host.call(["ip", "-4", "route", "show"]).stdout.strip().splitlines()
        assert len(routes) == 1 and routes[0].startswith(f"{subnet} dev eth0")


@netns
def test_hosts_and_root_namespace_reach_each_other_over_tcp(netns_cluster) -> None:
    cluster = netns_cluster(3)
    h1, h2, h3 = cluster.hosts
    for host in cluster.hosts:
        host.run([sys.executable, "-c", ECHO_SERVER, host.address, "7001"])
    for host in cluster.hosts:  # the root namespace reaches every host
        assert ask(host.address, 7001, f"hi {host.short}") == f"HI {host.short.upper()}"
    # host 2 reaches host 1's server; host 3 too (on the bridge, never via the root's routes)
    assert h2.call([sys.executable, "-c", CLIENT, h1.address, "7001", "from h2"]
                   ).stdout.strip() == "FROM H2"
    assert h3.call([sys.executable, "-c", CLIENT, h1.address, "7001", "from h3"]
                   ).stdout.strip() == "FROM H3"
    # a host reaches a server in the root namespace on the gateway (the coordinator's place)
    with socket.create_server((cluster.gateway, 0)) as server:
        server.settimeout(10)
        port = server.getsockname()[1]

        def answer() -> None:
            with server.accept()[0] as conn:
                conn.settimeout(5)
                conn.sendall(conn.recv(64).upper())

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        out = h3.call([sys.executable, "-c", CLIENT, cluster.gateway, str(port), "to root"])
        t.join(timeout=10)
    assert out.stdout.strip() == "TO ROOT"


@netns
def test_clusters_built_side_by_side_get_separate_subnets(netns_cluster) -> None:
    built: list[Cluster] = []
    threads = [threading.Thread(target=lambda: built.append(netns_cluster(1)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    a, b = built
    assert a.subnet != b.subnet and a.tag != b.tag
    for cluster in (a, b):
        host = cluster.hosts[0]
        host.run([sys.executable, "-c", ECHO_SERVER, host.address, "7002"])
        assert ask(host.address, 7002, cluster.tag) == cluster.tag.upper()
    # separate bridges, nothing forwarded: a host has no route beyond its own subnet
    out = a.hosts[0].call([sys.executable, "-c", CLIENT, b.hosts[0].address, "7002", "x"],
                          check=False)
    assert out.returncode != 0 and "Network is unreachable" in out.stderr


@netns
def test_a_build_that_fails_halfway_removes_what_it_made(netns_available,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    cluster = Cluster(3)
    real_ip = nc._ip

    def failing_ip(*args: str, **kwargs: float) -> str:
        if args[:3] == ("-n", f"narun-{cluster.tag}-h2", "addr"):
            raise ClusterError("injected: cannot add the address")
        return real_ip(*args, **kwargs)

    monkeypatch.setattr(nc, "_ip", failing_ip)
    with pytest.raises(ClusterError, match="injected"):
        cluster.open()
    assert [h.short for h in cluster.hosts] == ["h1", "h2"]  # made before the failure
    assert_gone(cluster, None)


@netns
def test_teardown_kills_every_process_and_removes_namespaces_and_links(netns_cluster) -> None:
    cluster = netns_cluster(3)
    for host in cluster.hosts:
        host.run(["sleep", "60"])
        # a grandchild the cluster never saw: found with `ip netns pids`
        host.run(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    deadline = time.monotonic() + 5
    while sum(len(h.pids()) for h in cluster.hosts) < 3 * 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = [pid for h in cluster.hosts for pid in h.pids()]
    assert len(pids) == 3 * 4
    for host in cluster.hosts:
        assert set(host.pids()).isdisjoint(p for h in cluster.hosts if h is not host
                                           for p in h.pids())
    cluster.close()
    assert_gone(cluster, pids)
    cluster.close()  # idempotent
    with pytest.raises(ClusterError, match="closed"):
        cluster.hosts[0].run(["sleep", "60"])


@netns
def test_teardown_runs_when_the_body_raises(netns_available) -> None:
    pids: list[int] = []
    cluster = Cluster(2)
    try:
        with pytest.raises(RuntimeError, match="the test body failed"), cluster:
            pids += [h.run(["sleep", "60"]).pid for h in cluster.hosts]
            raise RuntimeError("the test body failed")
    finally:
        cluster.close()
    assert_gone(cluster, pids)


@netns
def test_agents_start_in_their_namespace_with_keys_and_die_with_the_cluster(
        netns_cluster, tmp_path: Path) -> None:
    cluster = netns_cluster(2)
    coordinator_key, _ = generate_keypair(tmp_path / "coordinator", name="coordinator")
    seen: list[AgentSpec] = []

    def stand_in(spec: AgentSpec) -> list[str]:  # `narun agent` does not exist yet
        seen.append(spec)
        return [sys.executable, "-c", ECHO_SERVER, spec.address, str(spec.port)]

    agents = cluster.start_agents(tmp_path / "agents", port=7650, slots=3,
                                  authorize=[coordinator_key], command=stand_in)
    assert [a.spec.host for a in agents] == cluster.hosts == [s.host for s in seen]
    for agent, host in zip(agents, cluster.hosts):
        assert agent.endpoint == f"tcp://{host.address}:7650"
        assert agent.spec.slots == 3
        keys = tmp_path / "agents" / host.short / "keys"
        assert agent.public_key == keys / f"{host.short}.key"
        assert load_public_key(agent.public_key)
        assert (keys / f"{host.short}.key_secret").stat().st_mode & 0o077 == 0
        assert (load_public_key(keys / "authorized" / "coordinator.key")
                == load_public_key(coordinator_key))
        assert agent.spec.state_dir.is_dir()
        # the agent runs in its own namespace, and in no other
        assert agent.process.pid in host.pids()
        others = [p for h in cluster.hosts if h is not host for p in h.pids()]
        assert agent.process.pid not in others
        assert ask(host.address, 7650, "ready?") == "READY?"
    assert {h["endpoint"] for h in cluster.describe()["hosts"]} == {a.endpoint for a in agents}
    pids = [a.process.pid for a in agents]
    cluster.close()
    assert_gone(cluster, pids)
    assert all(a.process.returncode is not None for a in agents)


@netns
def test_an_agent_that_exits_early_is_reported_with_its_log(netns_cluster,
                                                             tmp_path: Path) -> None:
    cluster = netns_cluster(1)
    with pytest.raises(ClusterError, match=r"agent on h1 .* exited 3 .*no such key"):
        cluster.start_agents(tmp_path, command=lambda spec: [
            sys.executable, "-c", "import sys; print('no such key'); sys.exit(3)"])


@netns
def test_sweep_removes_a_crashed_runs_leftovers_and_nothing_else(netns_cluster) -> None:
    live = netns_cluster(1)
    tag = "0dead0"  # a tag no live process owns: what a SIGKILLed run leaves behind
    leaked, other = f"narun-{tag}-h1", f"othertest-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", leaked], check=True, timeout=10)
    subprocess.run(["ip", "link", "add", f"nr-{tag}-br", "type", "bridge"], check=True,
                   timeout=10)
    subprocess.run(["ip", "netns", "add", other], check=True, timeout=10)
    orphan = subprocess.Popen(["ip", "netns", "exec", leaked, "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while not nc._ns_pids(leaked) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert nc._ns_pids(leaked) == [orphan.pid]
        removed = nc.sweep_stale()
        assert set(removed) == {leaked, f"nr-{tag}-br"}
        orphan.wait(timeout=10)
        assert leaked not in namespaces() and f"nr-{tag}-br" not in links()
        assert other in namespaces()  # not ours: untouched
        assert {h.name for h in live.hosts} <= namespaces()  # owner alive: untouched
        assert live.bridge in links()
    finally:
        orphan.kill()
        orphan.wait(timeout=10)
        for ns in (leaked, other):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "delete", f"nr-{tag}-br"], capture_output=True,
                       timeout=10)


@netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_script_up_prints_hosts_then_tears_down_on_a_signal(netns_available,
                                                             sig: int) -> None:
    env = dict(os.environ, NARUN_PYTHON=sys.executable)
    proc = subprocess.Popen([str(SCRIPT), "up", "2", "--no-agents"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True)
    reader.start()
    try:
        info, seen = None, []
        deadline = time.monotonic() + 15
        while info is None and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=0.2))
                if seen[-1].startswith("{"):
                    info = json.loads(seen[-1])
        assert info is not None, f"no JSON line within 15 s; output: {''.join(seen)}"
        names = [h["namespace"] for h in info["hosts"]]
        assert [h["address"] for h in info["hosts"]] == [
            info["subnet"].replace("0/24", "11"), info["subnet"].replace("0/24", "12")]
        assert set(names) <= namespaces() and info["bridge"] in links()
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == (130 if sig == signal.SIGINT else 128 + sig)
        assert not set(names) & namespaces()
        assert not {l for l in links() if l.startswith(f"nr-{info['tag']}-")}
    finally:
        if proc.poll() is None:  # the test failed: still let the script tear down
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
                nc.sweep_stale()  # its owner is gone now
        reader.join(timeout=10)
        proc.stdout.close()  # type: ignore[union-attr]
