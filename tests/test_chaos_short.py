"""Short chaos runs against a real triad: each fault of SPEC section 6, and a clean verdict.

One run, shared by the module's tests: a fresh triad and two client processes, every
kind of fault once in a shuffled order, then the primary's kill a second time ("once
and repeatedly"): seed 0's schedule, whose first weighted draw is that kill. The
nemesis waits for the triad to be whole again (every node up and caught up, one
primary serving, with failback the first-ranked one) before the next fault, so each
fault meets the triad as a run of its own would. One run rather than one per kind: a
run's start, final status and check-ins cost about 6 s on a 2-core machine, a fault 2
to 4 s. Each kind's test checks the run's verdict and what its own faults did; a
failure prints the checker's report (it names the operations that break an invariant)
and the node logs.

Liveness is checked here against ``LIVENESS_LIMIT``, not SPEC's 1 s: a paused primary
is detected only after peer_timeout (0.5 s), and with the client's retry backoff a
failover after a pause takes 0.55-0.8 s, now and then 1.0 s, so one pause per run
would fail CI now and then for a few milliseconds. 2 s still catches a failover that
does not happen; ``scripts/chaos.py`` checks SPEC's 1 s over dozens of failovers.
"""

from __future__ import annotations

import itertools

import pytest

from zbroker.clients.testing.chaos.checked import CheckedRun, run_checked
from zbroker.clients.testing.chaos.nemesis import FaultKind
from zbroker.clients.testing.chaos.runner import RunOptions

pytestmark = pytest.mark.chaos

COUNTS = {kind: 1 for kind in FaultKind} | {FaultKind.KILL_PRIMARY: 2}
SEED = 0  # its schedule: each kind once, then kill-primary (asserted below)
LIVENESS_LIMIT = 2.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> CheckedRun:
    options = RunOptions(
        duration=120.0,  # an upper bound: a counted run ends when its faults are done
        faults=tuple(FaultKind),
        count=sum(COUNTS.values()),
        processes=2,
        sessions=3,
        seed=SEED,
        out=tmp_path_factory.mktemp("chaos"),
    )
    return run_checked(options, LIVENESS_LIMIT)


@pytest.mark.parametrize("kind", list(FaultKind), ids=lambda k: k.value)
def test_a_short_run_of_each_fault_keeps_every_invariant(kind: FaultKind, run: CheckedRun) -> None:
    count = COUNTS[kind]
    history, report, text = run.history, run.report, run.text
    assert report.ok, run.failure
    assert run.result.faults == sum(COUNTS.values()), text
    assert report.faults[kind.value] == count, text
    mine = [f for f in history.faults if f.kind == kind.value]
    assert len(mine) == count and all(f.healed for f in mine), text
    # The load flowed: through the run, and from each of these faults to the next one.
    assert report.counts["checkout"]["ok"] > 20 * len(FaultKind), text
    hold = history.phase_time("hold")
    ends = {f.id: later.start for f, later in itertools.pairwise(history.faults)}
    oks = [
        op.complete_t
        for op in history.ops.values()
        if op.op == "checkout" and op.status == "ok" and op.complete_t is not None
    ]
    for fault in mine:
        end = ends.get(fault.id, hold)
        assert end is not None and sum(fault.start <= t <= end for t in oks) > 20, text
    if kind in (FaultKind.KILL_PRIMARY, FaultKind.PAUSE_PRIMARY):
        assert len([f for f in report.failovers if f.kind == kind.value]) == count, text
    print(text)
