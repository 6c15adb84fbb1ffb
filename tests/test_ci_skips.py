"""tests/ci_skips.py: under CI=true a skipped test fails the run; elsewhere a skip stays a skip."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SUITE = """
import pytest

def test_runs():
    pass

def test_skips_itself():
    pytest.skip("needs a tool that is absent")

@pytest.mark.skipif(True, reason="marked away")
def test_marked_to_skip():
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_expected_to_fail():
    assert False
"""


def run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None
) -> pytest.RunResult:
    """Run the files made in ``pytester`` with tests/ci_skips.py, with CI set so (None: unset)."""
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    return pytester.runpytest("-p", "tests.ci_skips", "-p", "no:cacheprovider", "-p", "no:asyncio")


def test_under_ci_true_every_skip_fails_saying_why(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_suite=SUITE)
    result = run(pytester, monkeypatch, "true")
    # a skip in the call fails it, a skipif mark fails its setup; an xfail stays expected
    result.assert_outcomes(passed=1, failed=1, errors=1, xfailed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_skips_itself*skipped under CI=true*needs a tool that is absent*",
            "*test_marked_to_skip*skipped under CI=true*marked away*",
        ]
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED


@pytest.mark.parametrize("ci", [None, "false", "1"])
def test_without_ci_true_skips_stay_skips(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None
) -> None:
    pytester.makepyfile(test_suite=SUITE)
    result = run(pytester, monkeypatch, ci)
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)
    assert result.ret == pytest.ExitCode.OK


def test_under_ci_true_a_module_skipped_at_import_fails_the_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_needs_module="""
        import pytest
        pytest.importorskip("no_module_of_this_name")

        def test_never_runs():
            pass
        """
    )
    result = run(pytester, monkeypatch, "true")
    result.stdout.fnmatch_lines(["*skipped under CI=true*no_module_of_this_name*"])
    assert result.ret != pytest.ExitCode.OK
