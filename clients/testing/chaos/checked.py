"""A chaos run and its verdict in one call, for the short runs of the test suite.

A failing short run needs, beside the checker's report, the tail of each node's log:
both go into ``CheckedRun.failure`` so that an assertion message shows them together.
"""

from __future__ import annotations

from dataclasses import dataclass

from zbroker.clients.testing.chaos.checker import check
from zbroker.clients.testing.chaos.history import History, read_history
from zbroker.clients.testing.chaos.runner import Runner, RunOptions, RunResult
from zbroker.clients.testing.chaos.verdict import CheckOptions, Report, render

LOG_TAIL = 4000  # characters of each node's log shown with a failed verdict


@dataclass(frozen=True)
class CheckedRun:
    result: RunResult
    history: History
    report: Report
    text: str  # the rendered verdict

    @property
    def failure(self) -> str:
        """The verdict, then the tail of every node's log."""
        logs = sorted((self.result.out / "triad" / "logs").glob("*.log"))
        tails = (f"===== {p.name}\n{p.read_text(errors='replace')[-LOG_TAIL:]}" for p in logs)
        return "\n".join([self.text, *tails])


def run_checked(options: RunOptions, liveness_limit: float) -> CheckedRun:
    result = Runner(options, log=print).run()
    history = read_history(result.history)
    report = check(history, CheckOptions(liveness_limit=liveness_limit))
    return CheckedRun(result, history, report, render(report, history, str(result.history)))
