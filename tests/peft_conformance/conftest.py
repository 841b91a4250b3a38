"""Marks the expected failures of peft's generic tests on xpeft (`xpeft_cases.EXPECTED_FAILURES`).

Each is `xfail(strict=True)`: a test that starts passing fails the run, so the list cannot go stale. And an expected
failure counts only when the test fails with the expected error: any other failure of a listed test is reported as a
failure, so a listed test still catches new bugs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from xpeft_cases import EXPECTED_FAILURES

_EXPECTED = pytest.StashKey[re.Pattern]()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.parent != Path(__file__).parent:
            continue  # this hook sees the whole session's items
        callspec = getattr(item, "callspec", None)
        if callspec is None or "test_name" not in callspec.params:
            continue
        for expected in EXPECTED_FAILURES:
            if expected.applies_to(item.originalname, callspec.params):
                item.add_marker(pytest.mark.xfail(reason=expected.reason, strict=True))
                item.stash[_EXPECTED] = re.compile(expected.error, re.DOTALL)
                break


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    expected = item.stash.get(_EXPECTED, None)
    if expected is None or call.when != "call" or not hasattr(report, "wasxfail") or call.excinfo is None:
        return
    message = f"{call.excinfo.typename}: {call.excinfo.value}\n{call.excinfo.traceback[-1].statement}"
    if not expected.search(message):
        # Failed, but not the way the list expects: report it as the failure it is.
        del report.wasxfail
        report.outcome = "failed"
        where = call.excinfo.traceback[-1]
        report.longrepr = (
            f"{item.nodeid} is an expected failure ({expected.pattern!r}), but it failed otherwise, at "
            f"{where.path}:{where.lineno + 1}:\n{message}"
        )
