"""No silent skips in CI: under CI=true (.ci/run sets it) a skipped test fails the run.

A test that cannot run where CI runs is a test CI does not run; a skip would pass in silence.
Expected failures (xfail) are not skips. Loaded by tests/conftest.py.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest


def skips_fail() -> bool:
    """Whether skips fail: CI=true, as .ci/run and most CI services set it."""
    return os.environ.get("CI") == "true"


def _fail_the_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Turn a skip (not an expected failure) into a failure that says why it was skipped."""
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which allows no skips: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A test skipped by a mark or by pytest.skip fails, in whichever phase it skipped."""
    report = yield
    if skips_fail():
        _fail_the_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """A module skipped as a whole (pytest.importorskip at import) fails too."""
    report = yield
    if skips_fail():
        _fail_the_skip(report)
    return report
