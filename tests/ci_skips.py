"""A pytest plugin: under CI a skip is a failure, so a missing tool (espeak-ng, sox, Chromium) or data set (the real
call) fails the run instead of letting a broken setup pass. Elsewhere a skip stays a skip, saying why."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


def under_ci() -> bool:
    """True under CI (`CI` set to anything but empty, 0 or false), where every skip is a failure."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Under CI a skipped test (a skip marker, `pytest.skip` in the test or a fixture) is reported failed with its
    reason, so a missing tool or data set fails the run instead of passing it quietly."""
    outcome = yield
    report = outcome.get_result()
    if under_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: a test may not skip here, and this one would have: {reason}"
