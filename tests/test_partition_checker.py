"""The checker's partition rules on hand-written histories: the cut-off primary's probes,
and the failover an isolated primary owes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from zbroker.clients.testing.chaos.checker import check
from zbroker.clients.testing.chaos.history import read_history
from zbroker.clients.testing.chaos.nemesis import PARTITION_KINDS, CutKind, parse_kinds, schedule
from zbroker.clients.testing.chaos.verdict import Report

pytestmark = pytest.mark.unit

PEER_TIMEOUT = 0.5


def _checked(tmp_path: Path, actions: list[dict[str, Any]]) -> Report:
    records: list[dict[str, Any]] = [
        {
            "type": "meta",
            "t": 0.0,
            "seed": 1,
            "features": {"viewer": 50},
            "nodes": ["alpha", "beta", "gamma"],
            "peer_timeout": PEER_TIMEOUT,
            "lease": 10.0,
            "failback": True,
        },
        {"type": "fault", "t": 1.0, "fault": 1, "kind": "cut-primary", "phase": "start"},
        *({"type": "action", "fault": 1, **a} for a in actions),
        {"type": "fault", "t": 5.0, "fault": 1, "phase": "end", "healed": True, "nodes": []},
    ]
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return check(read_history(path))


def _isolate(t: float) -> dict[str, Any]:
    return {"t": t, "action": "isolate", "node": "alpha", "role": "primary"}


def _probe(t: float, outcome: str) -> dict[str, Any]:
    return {"t": t, "action": "probe", "node": "alpha", "role": outcome}


def _cut_off(report: Report) -> list[str]:
    return [v.message for v in report.violations if v.invariant == "cut-off-primary"]


def test_a_seat_granted_by_a_cut_off_primary_after_peer_timeout_is_a_violation(
    tmp_path: Path,
) -> None:
    report = _checked(tmp_path, [_isolate(1.0), _probe(1.6, "ok")])
    (message,) = _cut_off(report)
    assert "alpha" in message and "granted" in message


def test_a_refusal_after_peer_timeout_and_a_grant_before_it_are_not(tmp_path: Path) -> None:
    early_grant = [_isolate(1.0), _probe(1.4, "ok"), _probe(1.6, "open:unavailable")]
    assert _cut_off(_checked(tmp_path, early_grant)) == []


def test_a_grant_after_the_cut_healed_is_not(tmp_path: Path) -> None:
    heal = {"t": 2.0, "action": "heal", "node": "alpha", "role": "primary", "to": "beta"}
    assert _cut_off(_checked(tmp_path, [_isolate(1.0), heal, _probe(2.5, "ok")])) == []


def test_an_isolated_primary_owes_a_failover_and_a_backup_does_not(tmp_path: Path) -> None:
    report = _checked(tmp_path, [_isolate(1.0)])
    assert [(f.action, f.node) for f in report.failovers] == [("isolate", "alpha")]
    backup = {"t": 1.0, "action": "isolate", "node": "beta", "role": "backup"}
    assert _checked(tmp_path, [backup]).failovers == []


def test_partitions_are_named_kinds_and_scheduled_like_the_others() -> None:
    assert parse_kinds("partitions") == PARTITION_KINDS
    assert parse_kinds("cut-link,kill-primary")[0] is CutKind.CUT_LINK
    with pytest.raises(ValueError, match="cut-client"):
        parse_kinds("cut-everything")
    steps = list(schedule(3, PARTITION_KINDS, count=20 * len(PARTITION_KINDS)))
    for i in range(0, len(steps), len(PARTITION_KINDS)):  # rounds: each kind once a round
        assert {s.kind for s in steps[i : i + len(PARTITION_KINDS)]} == set(PARTITION_KINDS)
