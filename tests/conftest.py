"""A test whose comparisons against PyTorch could not run (torch missing) is reported as
skipped, with the reason, instead of passed: a missing oracle shows in the summary (`-rs`)
rather than passing silently. Its other checks ran and passed (a failure stays a failure).
"""

from __future__ import annotations

from collections import Counter

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
