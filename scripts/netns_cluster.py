#!/usr/bin/env python3
"""Test hosts as network namespaces on one bridge (root only): the multi-host test bed.

    scripts/netns-cluster up 3                  # 3 hosts with agents; Ctrl-C tears down
    scripts/netns-cluster up 2 --no-agents      # namespaces and addresses only
    scripts/netns-cluster sweep                 # remove what crashed runs left behind

From Python (what tests use; `tests/conftest.py` wraps it as the `netns_cluster` fixture):

    with Cluster(3) as cluster:
        server = cluster.hosts[0].run([sys.executable, "-m", "http.server", "8000"])
        cluster.hosts[1].call(["curl", f"http://{cluster.hosts[0].address}:8000/"])

What a cluster is. A bridge `nr-TAG-br` in the root namespace holds the gateway address
10.213.X.1/24, where a coordinator running in the root namespace is reachable. Host i
(1..N) is the namespace `narun-TAG-hi`: its `eth0` is one end of a veth pair whose other
end (`nr-TAG-hi`) is a port of the bridge, with address 10.213.X.(10+i)/24, and `lo` up.
X is the first /24 of 10.213.0.0/16 that no address or route of the root namespace
overlaps (0 when nothing else runs), chosen under a lock so that clusters built at the
same time get different subnets. TAG is 6 random hex digits.

Safety. Hosts get no default route, only the connected /24, so they reach the bridge's
subnet and nothing else; nothing is routed, forwarded or NATed, and no existing interface
or sysctl is touched. The only targets are the gateway and the hosts' addresses.

Teardown guarantees. `close()` (run by the context manager even when its body raised, and
on SIGINT/SIGTERM by the script) sends SIGTERM to every process inside the cluster's
namespaces (those started with `Host.run` and anything they spawned, found with
`ip netns pids`), SIGKILL after a grace period, waits (bounded) until the namespaces hold
no process, then deletes namespaces, veths and the bridge. It does every step even when
one fails and raises ClusterError naming what is left. Only SIGKILL of the owning
process can leave anything behind; the owner's pid is recorded in /run/narun-netns/TAG,
and `sweep_stale()` removes the namespaces and links of every tag whose owner is gone
(only names of exactly our pattern; another live cluster is never touched).

The implementation is this file (importable: `from scripts.netns_cluster import Cluster`,
with the repository root on sys.path, as under pytest); `scripts/netns-cluster` is a thin
executable that runs `main()`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Agent", "AgentSpec", "Cluster", "ClusterError", "Host", "NARUN", "SUPERNET",
    "cluster_names", "main", "narun_agent_argv", "sweep_stale", "unavailable_reason",
]

SUPERNET = ipaddress.ip_network("10.213.0.0/16")
"""Every cluster takes one /24 of this; nothing outside it is ever a target."""
NARUN = [sys.executable, "-m", "narun.cli"]
"""How the `narun` CLI is invoked, on the host and inside namespaces (same interpreter)."""
STATE_DIR = Path("/run/narun-netns")
"""One file per live cluster, TAG, holding its owner's pid and start time; plus `lock`."""

_NS = re.compile(r"narun-([0-9a-f]{6})-(?:h\d+|probe)")
_LINK = re.compile(r"nr-([0-9a-f]{6})-(?:br|h\d+)")
_MAX_HOSTS = 200  # addresses .11 .. .210 of the /24
_CMD_TIMEOUT = 10.0  # seconds for one `ip` command


class ClusterError(RuntimeError):
    """Building, using or tearing down a cluster failed; the message names what and where."""


# ---------------------------------------------------------------------------------------
# `ip`, ownership records, sweeping


def _ip(*args: str, timeout: float = _CMD_TIMEOUT, check: bool = True) -> str:
    argv = ["ip", *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from None
    if check and done.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed (exit {done.returncode}): "
                           f"{done.stderr.strip()}")
    return done.stdout


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _links() -> list[str]:
    return [link["ifname"] for link in json.loads(_ip("-j", "link", "show") or "[]")]


def _ns_pids(namespace: str) -> list[int]:
    out = _ip("netns", "pids", namespace, check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def cluster_names(tag: str) -> tuple[list[str], list[str]]:
    """(namespaces, links) that exist now and belong to the cluster with this tag."""
    return ([n for n in _namespaces() if (m := _NS.fullmatch(n)) and m[1] == tag],
            [n for n in _links() if (m := _LINK.fullmatch(n)) and m[1] == tag])


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, after "pid (comm)"


def _owner_alive(tag: str) -> bool:
    try:
        pid, start = (STATE_DIR / tag).read_text().splitlines()[0].split()
    except (OSError, ValueError, IndexError):
        return False
    return _start_time(int(pid)) == start


def _claim(tag: str, subnet: str) -> None:
    STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    (STATE_DIR / tag).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n{subnet}\n")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as lock:
        deadline = time.monotonic() + 30.0
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"{STATE_DIR / 'lock'}: another cluster build held "
                                       f"the lock for 30 s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _kill_all(pids_of: Callable[[], list[int]], tracked: Sequence[subprocess.Popen[Any]],
              grace: float, timeout: float) -> list[int]:
    """SIGTERM what pids_of() lists and the tracked processes, SIGKILL after `grace` s;
    reap the tracked ones. Returns the pids still there after `timeout` s (none, normally)."""
    def signal_all(sig: int) -> None:
        pids = set(pids_of()) | {p.pid for p in tracked if p.poll() is None}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def settled() -> bool:
        return all(p.poll() is not None for p in tracked) and not pids_of()

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.02)
    deadline = time.monotonic() + timeout
    while not settled() and time.monotonic() < deadline:
        signal_all(signal.SIGKILL)
        time.sleep(0.02)
    for p in tracked:  # reap: no zombie outlives the cluster
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    return sorted(set(pids_of()) | {p.pid for p in tracked if p.poll() is None})


def _remove(tag: str, namespaces: Iterable[str], links: Iterable[str],
            tracked: Sequence[subprocess.Popen[Any]] = (), grace: float = 2.0,
            timeout: float = 5.0) -> list[str]:
    """Kill every process in the namespaces, delete them and the links; every step runs
    even when an earlier one failed. Returns what went wrong (empty when all is gone)."""
    namespaces, problems = list(namespaces), []

    def pids_of() -> list[int]:
        return [pid for ns in namespaces for pid in _ns_pids(ns)]

    left = _kill_all(pids_of, tracked, grace, timeout)
    if left:
        problems.append(f"processes {left} still alive {grace + timeout:g} s after SIGTERM")
    # Links first, each end in the root namespace: deleting a veth there removes its peer at
    # once, whereas a namespace's devices go asynchronously after `ip netns delete`.
    for link in sorted(links, key=lambda name: name.endswith("-br")):  # the bridge last
        try:
            _ip("link", "delete", link)
        except ClusterError as e:
            if link in _links():  # not merely gone already
                problems.append(str(e))
    for ns in namespaces:
        try:
            _ip("netns", "delete", ns)
        except ClusterError as e:
            if ns in _namespaces():
                problems.append(str(e))
    ns_left, links_left = cluster_names(tag)
    if ns_left or links_left:
        problems.append(f"still present: namespaces {ns_left}, links {links_left}")
    else:
        with contextlib.suppress(FileNotFoundError):
            (STATE_DIR / tag).unlink()
    return problems


def sweep_stale() -> list[str]:
    """Remove namespaces `narun-TAG-...` and links `nr-TAG-...` whose owner process is gone
    (crashed or killed runs), killing the processes inside them. Clusters whose owner still
    runs, and every name not of exactly that pattern, are left alone. Returns the names
    removed; raises ClusterError when something could not be removed."""
    tags: dict[str, tuple[list[str], list[str]]] = {}
    for ns in _namespaces():
        if m := _NS.fullmatch(ns):
            tags.setdefault(m[1], ([], []))[0].append(ns)
    for link in _links():
        if m := _LINK.fullmatch(link):
            tags.setdefault(m[1], ([], []))[1].append(link)
    if STATE_DIR.is_dir():
        for record in STATE_DIR.iterdir():
            if re.fullmatch(r"[0-9a-f]{6}", record.name):
                tags.setdefault(record.name, ([], []))
    removed, problems = [], []
    for tag, (namespaces, links) in sorted(tags.items()):
        if _owner_alive(tag):
            continue
        problems += _remove(tag, namespaces, links, grace=0.5)
        removed += namespaces + links
    if problems:
        raise ClusterError("sweep: " + "; ".join(problems))
    return removed


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here (not root, no `ip`, `ip netns add` fails),
    or None when they can: creates and deletes one throwaway namespace."""
    if os.geteuid() != 0:
        return "network namespaces need root (tests marked netns run as root in CI)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    tag = secrets.token_hex(3)
    name = f"narun-{tag}-probe"
    try:
        _claim(tag, "probe")
        _ip("netns", "add", name)
        _ip("netns", "delete", name)
    except (ClusterError, OSError) as e:
        return f"`ip netns` is not usable here: {e}"
    finally:
        with contextlib.suppress(OSError):
            (STATE_DIR / tag).unlink()
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of SUPERNET that no address or route of the root namespace overlaps."""
    used = []
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        if route.get("dst") not in (None, "default"):
            used.append(ipaddress.ip_network(route["dst"], strict=False))
    for link in json.loads(_ip("-j", "-4", "addr", "show") or "[]"):
        for a in link.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for net in SUPERNET.subnets(new_prefix=24):
        if not any(net.overlaps(u) for u in used):
            return net
    raise ClusterError(f"no free /24 left in {SUPERNET}: every one overlaps an address or "
                       f"route of this machine (leftovers? try `scripts/netns-cluster sweep`)")


# ---------------------------------------------------------------------------------------
# Cluster and hosts


@dataclass
class Host:
    """One test host: a network namespace with one address on the cluster's bridge."""

    index: int  # 1..N
    name: str  # the namespace, narun-TAG-hI
    short: str  # hI, used as the agent's key name
    address: str
    _cluster: Cluster = field(repr=False, compare=False)

    def run(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv inside this namespace (`ip netns exec`, which execs: the Popen's pid is
        the process itself). The cluster kills it, and all it spawned, at teardown."""
        return self._cluster._track(
            subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **popen_kwargs))

    def call(self, argv: Sequence[str], timeout: float = 10.0, check: bool = True,
             **run_kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run argv inside this namespace to completion (killed after `timeout` s, which
        raises subprocess.TimeoutExpired); output captured as text."""
        done = subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              text=True, timeout=timeout, **run_kwargs)
        if check and done.returncode != 0:
            raise ClusterError(f"{self.short} ({self.name}): {list(argv)} exited "
                               f"{done.returncode}: {done.stderr.strip()[-2000:]}")
        return done

    def pids(self) -> list[int]:
        """Every process now inside this namespace."""
        return _ns_pids(self.name)


@dataclass(frozen=True)
class AgentSpec:
    """What an agent command needs; `command` factories given to start_agents receive it."""

    host: Host
    address: str
    port: int
    endpoint: str  # tcp://ADDRESS:PORT
    keys_dir: Path  # holds SHORT.key, SHORT.key_secret, authorized/
    key_name: str
    state_dir: Path
    slots: int


@dataclass
class Agent:
    spec: AgentSpec
    public_key: Path
    log: Path
    process: subprocess.Popen[Any]

    @property
    def endpoint(self) -> str:
        return self.spec.endpoint


def narun_agent_argv(spec: AgentSpec) -> list[str]:
    """The default agent command: `narun agent --listen ... --keys ... --slots ...`."""
    return [*NARUN, "agent", "--listen", spec.endpoint, "--keys", str(spec.keys_dir),
            "--slots", str(spec.slots), "--state-dir", str(spec.state_dir)]


def _authorize(keys_dir: Path, public_key: Path) -> None:
    """Let the node with keys_dir admit the holder of public_key."""
    subprocess.run([*NARUN, "keys", "authorize", str(keys_dir), str(public_key)],
                   check=True, timeout=30, stdout=subprocess.DEVNULL)


def _wait_listening(agents: Sequence[Agent], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(agents)
    while waiting:
        agent = waiting[0]
        if agent.process.poll() is not None:
            raise ClusterError(f"agent on {agent.spec.host.short} ({agent.spec.endpoint}) "
                               f"exited {agent.process.returncode} before listening; "
                               f"{agent.log}: {_tail(agent.log)}")
        try:
            with socket.create_connection((agent.spec.address, agent.spec.port), timeout=0.5):
                waiting.pop(0)
                continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"agent on {agent.spec.host.short} did not listen on "
                               f"{agent.spec.endpoint} within {timeout:g} s; "
                               f"{agent.log}: {_tail(agent.log)}")
        time.sleep(0.05)


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip() or "(empty)"
    except OSError as e:
        return f"(unreadable: {e})"


class Cluster:
    """N hosts as network namespaces on one bridge; see the module docstring.

    Use as a context manager (or call open() and close()); close() is idempotent.
    """

    def __init__(self, n: int, grace: float = 2.0, kill_timeout: float = 5.0) -> None:
        if not 1 <= n <= _MAX_HOSTS:
            raise ClusterError(f"hosts: expected 1..{_MAX_HOSTS}, got {n}")
        self.n, self.grace, self.kill_timeout = n, grace, kill_timeout
        self.tag = secrets.token_hex(3)
        self.bridge = f"nr-{self.tag}-br"
        self.hosts: list[Host] = []
        self.agents: list[Agent] = []
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway = ""
        self._procs: list[subprocess.Popen[Any]] = []
        self._opened = self._closed = False

    def __enter__(self) -> Cluster:
        return self.open()

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        try:
            self.close()
        except ClusterError as e:
            if error is None:
                raise
            error.add_note(f"and tearing the cluster down failed: {e}")

    def open(self) -> Cluster:
        if self._opened:
            raise ClusterError(f"cluster {self.tag} was already opened; make a new Cluster")
        self._opened = True
        try:
            with _locked():
                self.subnet = _free_subnet()
                _claim(self.tag, str(self.subnet))
                addresses = list(self.subnet.hosts())
                self.gateway = str(addresses[0])
                _ip("link", "add", self.bridge, "type", "bridge", "forward_delay", "0")
                _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            for i in range(1, self.n + 1):
                host = Host(i, f"narun-{self.tag}-h{i}", f"h{i}", str(addresses[9 + i]), self)
                veth = f"nr-{self.tag}-h{i}"
                _ip("netns", "add", host.name)
                self.hosts.append(host)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0",
                    "netns", host.name)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.name, "link", "set", "eth0", "up")
                _ip("-n", host.name, "link", "set", "lo", "up")
        except BaseException:
            with contextlib.suppress(ClusterError):
                self.close()
            raise
        return self

    def _track(self, proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        if self._closed:
            proc.kill()
            proc.wait(timeout=5)
            raise ClusterError(f"cluster {self.tag} is closed; nothing may start in it")
        self._procs.append(proc)
        return proc

    def start_agents(self, root: str | os.PathLike[str], port: int = 7600, slots: int = 2,
                     authorize: Iterable[str | os.PathLike[str]] = (),
                     command: Callable[[AgentSpec], Sequence[str]] = narun_agent_argv,
                     ready_timeout: float | None = 15.0) -> list[Agent]:
        """One agent per host, listening on tcp://ADDRESS:PORT.

        For host hI: `narun keys generate ROOT/hI/keys --name hI`, each key in `authorize`
        (a coordinator's NAME.key) copied into ROOT/hI/keys/authorized/, then
        `command(spec)` (default narun_agent_argv) started in the namespace with stdout and
        stderr to ROOT/hI/agent.log and state in ROOT/hI/state/. Waits until every agent
        accepts TCP connections from the root namespace (unless ready_timeout is None);
        an agent that exits first, or does not listen in time, raises ClusterError with
        its log's tail. The agents die with the cluster.
        """
        root, keys = Path(root), [Path(k) for k in authorize]
        specs = [AgentSpec(h, h.address, port, f"tcp://{h.address}:{port}",
                           root / h.short / "keys", h.short, root / h.short / "state", slots)
                 for h in self.hosts]
        generating = []
        for spec in specs:
            spec.state_dir.mkdir(parents=True, exist_ok=True)
            generating.append(subprocess.Popen(
                [*NARUN, "keys", "generate", str(spec.keys_dir), "--name", spec.key_name],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        for spec, proc in zip(specs, generating):
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise ClusterError(f"`narun keys generate` for {spec.key_name} took over "
                                   f"60 s") from None
            if proc.returncode != 0:
                raise ClusterError(f"`narun keys generate {spec.keys_dir} --name "
                                   f"{spec.key_name}` failed: {err.strip()[-2000:]}")
        started = []
        for spec in specs:
            for key in keys:
                _authorize(spec.keys_dir, key)
            log = spec.state_dir.parent / "agent.log"
            with open(log, "wb") as out:
                proc = spec.host.run(list(command(spec)), stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
            started.append(Agent(spec, spec.keys_dir / f"{spec.key_name}.key", log, proc))
        self.agents += started
        if ready_timeout is not None:
            _wait_listening(started, ready_timeout)
        return started

    def describe(self) -> dict[str, Any]:
        """The cluster as JSON-ready data: tag, bridge, gateway, subnet, hosts (and agents)."""
        agents = {a.spec.host.name: a for a in self.agents}
        hosts = []
        for h in self.hosts:
            row: dict[str, Any] = {"host": h.short, "namespace": h.name, "address": h.address}
            if h.name in agents:
                a = agents[h.name]
                row.update(endpoint=a.endpoint, public_key=str(a.public_key),
                           keys=str(a.spec.keys_dir), log=str(a.log), pid=a.process.pid)
            hosts.append(row)
        return {"tag": self.tag, "bridge": self.bridge, "gateway": self.gateway,
                "subnet": str(self.subnet), "hosts": hosts}

    def close(self) -> None:
        """Kill every process in the namespaces, delete namespaces, veths and bridge.
        Idempotent; raises ClusterError naming what could not be removed."""
        if self._closed or not self._opened:
            return
        self._closed = True
        namespaces = [f"narun-{self.tag}-h{i}" for i in range(1, self.n + 1)]
        present_ns, present_links = set(_namespaces()), set(_links())
        links = [*(f"nr-{self.tag}-h{i}" for i in range(1, self.n + 1)), self.bridge]
        problems = _remove(self.tag, [ns for ns in namespaces if ns in present_ns],
                           [link for link in links if link in present_links],
                           self._procs, self.grace, self.kill_timeout)
        if problems:
            raise ClusterError(f"cluster {self.tag}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------
# The command line


def _print_table(info: dict[str, Any]) -> None:
    rows = [("host", "namespace", "address", "agent")]
    rows += [(h["host"], h["namespace"], h["address"], h.get("endpoint", "-"))
             for h in info["hosts"]]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    print(f"gateway {info['gateway']} (root namespace, bridge {info['bridge']}, "
          f"subnet {info['subnet']})")


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _up(args: argparse.Namespace) -> int:
    cluster = Cluster(args.hosts)
    keys_root, made_root = args.keys, False
    atexit.register(cluster.close)  # a backstop; the finally below normally runs first
    try:
        cluster.open()
        if not args.no_agents:
            if keys_root is None:
                keys_root, made_root = tempfile.mkdtemp(prefix="narun-netns-"), True
            cluster.start_agents(keys_root, port=args.port, slots=args.slots,
                                 authorize=args.authorize)
        info = cluster.describe()
        _print_table(info)
        print(json.dumps(info), flush=True)
        print("running; Ctrl-C or SIGTERM tears everything down", file=sys.stderr, flush=True)
        reported: set[str] = set()
        while True:
            time.sleep(0.5)
            for a in cluster.agents:
                if a.process.poll() is not None and a.endpoint not in reported:
                    reported.add(a.endpoint)
                    print(f"agent on {a.spec.host.short} exited {a.process.returncode}; "
                          f"{a.log}: {_tail(a.log, 500)}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        return 130
    except ClusterError:
        if made_root:  # keep the logs the error message points at
            print(f"keys, state and logs kept in {keys_root}", file=sys.stderr)
            made_root = False
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut teardown short
        cluster.close()
        if made_root:
            shutil.rmtree(keys_root, ignore_errors=True)
        print(f"torn down cluster {cluster.tag}", file=sys.stderr, flush=True)


def _sweep(args: argparse.Namespace) -> int:
    removed = sweep_stale()
    print("removed: " + (", ".join(removed) if removed else "nothing"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netns-cluster", description="Test hosts as network "
                                "namespaces on one bridge, with an agent in each (root only).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="build N hosts, print them, wait for Ctrl-C, tear down")
    up.add_argument("hosts", type=int, metavar="N")
    up.add_argument("--keys", metavar="DIR", help="per-host keys, state and logs go to "
                    "DIR/hI/ (default: a temporary directory, removed at exit)")
    up.add_argument("--no-agents", action="store_true", help="namespaces and addresses only")
    up.add_argument("--port", type=int, default=7600, help="agent port (default: %(default)s)")
    up.add_argument("--slots", type=int, default=2, help="agent slots (default: %(default)s)")
    up.add_argument("--authorize", action="append", default=[], metavar="KEYFILE",
                    help="a coordinator's public key every agent admits (repeatable)")
    up.set_defaults(fn=_up)
    sw = sub.add_parser("sweep", help="remove namespaces and links left by crashed runs")
    sw.set_defaults(fn=_sweep)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("netns-cluster: must run as root: it creates network namespaces, veths and a "
              f"bridge (try: sudo {sys.argv[0]} ...)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    try:
        return args.fn(args)
    except ClusterError as e:
        print(f"netns-cluster: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
