"""Print the deployment test's phase times at the end of the run."""

from __future__ import annotations

import pytest

from tests.deploy.stack import PHASES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not PHASES.phases:
        return
    terminalreporter.section("deployment test phases")
    for line in PHASES.table():
        terminalreporter.write_line(line)
