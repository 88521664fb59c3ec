"""What a backup does after its acknowledgement, timed by the core (issue 17, item 4).

A backup applies its committed deltas once the oldest has waited ``APPLY_WAIT``, never in
the cycle that acknowledged them; a status query or a role change applies them at once.
"""

from __future__ import annotations

import pytest

from tests.test_core import NAMES, WALL, opened, request, triad
from zbroker.broker.core import APPLY_WAIT, NodeCore
from zbroker.broker.model import Now

pytestmark = pytest.mark.unit


def _behind(core: NodeCore) -> int:
    """Committed deltas the core's ledger does not hold yet."""
    return core.replica.commit - core.applied.index


def test_a_backup_applies_its_committed_deltas_once_the_oldest_waited_apply_wait() -> None:
    net = triad()
    primary = net.serving()
    opened(net, primary)
    net.run(0.5)  # every node level: nothing waits
    backups = [n for n in NAMES if n != primary]
    assert all(_behind(net.cores[n]) == 0 for n in NAMES)
    for req in (2, 3):  # the second checkout's append carries the first one's commit
        checkout = request(b"c-s1", op="checkout", sid="s1", req=req, ack=req, feature="cad")
        net.cycle(primary, checkout)
        for backup in backups:
            net.cycle(backup)  # persists and acknowledges
        net.cycle(primary)  # commits: the answer leaves
    for backup in backups:
        core = net.cores[backup]
        assert _behind(core) == 1, "applied in the cycle that acknowledged it"
        net.mono += APPLY_WAIT / 2
        net.cycle(backup)
        assert _behind(core) == 1, "applied before the oldest waited APPLY_WAIT"
    net.mono += APPLY_WAIT / 2
    for backup in backups:
        net.cycle(backup)
        assert _behind(net.cores[backup]) == 0


def test_a_status_query_on_a_backup_applies_what_waits_at_once() -> None:
    net = triad()
    primary = net.serving()
    opened(net, primary)
    net.run(0.5)
    backup = next(n for n in NAMES if n != primary)
    for req in (2, 3):
        checkout = request(b"c-s1", op="checkout", sid="s1", req=req, ack=req, feature="cad")
        net.cycle(primary, checkout)
        net.cycle(backup)
        net.cycle(primary)
    core = net.cores[backup]
    assert _behind(core) == 1
    report = core.report(Now(net.mono, WALL + net.mono))
    assert _behind(core) == 0
    (cad,) = [f for f in report["features"] if f["name"] == "cad"]
    assert cad["in_use"] == 1  # the grant that waited (the second is not committed here)
