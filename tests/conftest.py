"""A test whose comparisons against PyTorch could not run (torch missing) is reported as
skipped, with the reason, instead of passed: a missing oracle shows in the summary (`-rs`)
rather than passing silently. Its other checks ran and passed (a failure stays a failure).

Tests marked `netns` get hosts as network namespaces from the `netns_cluster` fixture
(scripts/netns_cluster.py); they are skipped, with the reason, where that cannot work.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tests import opcheck


def pytest_runtest_setup(item: pytest.Item) -> None:
    opcheck.missed.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.when == "call" and report.passed and opcheck.missed:
        what = ", ".join(f"{name} x{n}" if n > 1 else name
                         for name, n in Counter(opcheck.missed).items())
        path, lineno, _ = item.reportinfo()
        report.outcome = "skipped"
        report.longrepr = (str(path), (lineno or 0) + 1,
                           f"Skipped: {opcheck.TORCH_MISSING}; not compared with torch: "
                           f"{what}; the test's other checks passed")
    return report


@pytest.fixture(scope="session")
def netns_available() -> None:
    """Skips, with the reason, unless network namespaces can be made here (root, iproute2, a
    throwaway `ip netns add` works); then removes what crashed earlier runs left behind."""
    from scripts.netns_cluster import sweep_stale, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    sweep_stale()


@pytest.fixture
def netns_cluster(netns_available: None):
    """Factory: `netns_cluster(n)` is an open scripts.netns_cluster.Cluster of n hosts
    (`.hosts[i].name/.address/.run(argv)`, `.gateway`, `.start_agents(...)`). Every cluster
    is torn down after the test, whatever the test did; a teardown that leaves a process,
    namespace or link behind fails the test."""
    from scripts.netns_cluster import Cluster, ClusterError

    clusters: list[Cluster] = []

    def make(n: int, **options: Any) -> Cluster:
        cluster = Cluster(n, **options)
        clusters.append(cluster)
        return cluster.open()

    yield make
    problems = []
    for cluster in clusters:
        try:
            cluster.close()
        except ClusterError as e:
            problems.append(str(e))
    if problems:
        pytest.fail("netns teardown: " + "; ".join(problems))
