"""A short partition chaos run: hosts as network namespaces, each kind of cut, a clean verdict.

Every node runs in a network namespace of its own and the client processes in the
clients' (``zbroker.clients.testing.hosts``); the nemesis cuts links with blackhole routes: the
primary off from both backups (clients still reach it), a backup off from everyone, one
link between two nodes, a flapping link, the clients off from the primary. The checker
judges it as it judges kills, and asks in addition that the cut-off primary, probed
once ``peer_timeout`` had passed, granted nothing. Needs root (CI runs as root).

Liveness is checked against 2 s, as in test_chaos_short.py and for the same reason: a
cut primary, like a paused one, is noticed only after peer_timeout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zbroker.clients.testing.chaos.checked import run_checked
from zbroker.clients.testing.chaos.nemesis import PARTITION_KINDS, CutKind
from zbroker.clients.testing.chaos.runner import RunOptions
from zbroker.clients.testing.hosts import PREFIX, namespaces

pytestmark = pytest.mark.chaos

LIVENESS_LIMIT = 2.0
COUNT = 2 * len(PARTITION_KINDS)  # two rounds: every kind twice, in shuffled orders


def test_a_short_partition_run_keeps_every_invariant(tmp_path: Path) -> None:
    options = RunOptions(
        duration=90.0,  # an upper bound: a counted run ends when its faults are done
        faults=PARTITION_KINDS,
        count=COUNT,
        processes=2,
        sessions=3,
        seed=5,
        out=tmp_path,
        hosts=True,
    )
    run = run_checked(options, LIVENESS_LIMIT)
    result, history, report, text = run.result, run.history, run.report, run.text
    assert report.ok, run.failure
    assert result.faults == COUNT, text
    assert all(report.faults[k.value] == 2 for k in PARTITION_KINDS), text
    assert all(f.healed for f in history.faults), text
    assert report.counts["checkout"]["ok"] > 20, text  # the load flowed
    cut_primary = [f for f in history.faults if f.kind == CutKind.CUT_PRIMARY.value]
    isolations = [f for f in report.failovers if f.action == "isolate"]
    assert len(isolations) == len(cut_primary), text  # each cut primary was replaced
    probes = [a for f in cut_primary for a in f.actions if a.action == "probe"]
    assert len(probes) == 2 * len(cut_primary), text  # the check had something to judge
    assert not any(p.role == "ok" for p in probes), text
    mine = f"{PREFIX}{os.getpid()}-"
    assert not [n for n in namespaces() if n.startswith(mine)], "namespaces left behind"
    print(text)
