"""The primary applies its own plain grants and releases without checking them again
(``Ledger.apply_decided``); a backup, applying the same deltas from the log, still checks
everything (``Ledger.apply``)."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest

from zbroker.broker.ledger import Ledger, LedgerError
from zbroker.broker.model import Entitlement, Now, Request

pytestmark = pytest.mark.unit

WALL = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC).timestamp()


def ledger() -> Ledger:
    cad = Entitlement("cad", "2.0", 3, None, source="t.lic:1")
    return Ledger([cad], lease=30.0, heartbeat=10.0)


def decide(primary: Ledger, request: Request, log: list[dict[str, Any]]) -> None:
    for delta, _ in primary.handle(request, Now(100.0, WALL)).decided:
        log.append(copy.deepcopy(delta))
        primary.apply_decided(delta)


def test_a_backup_applying_the_log_ends_where_the_primary_that_decided_it_is() -> None:
    primary, log = ledger(), list[dict[str, Any]]()
    decide(primary, Request("open", "s1", 1, user="ann", host="ws1"), log)
    decide(primary, Request("open", "s2", 1, user="bob", host="ws2"), log)
    decide(primary, Request("checkout", "s1", 2, 1, feature="cad", count=2), log)
    decide(primary, Request("checkout", "s2", 2, 1, feature="cad"), log)
    decide(primary, Request("checkout", "s2", 3, 2, feature="cad"), log)  # denied: an answer
    decide(primary, Request("checkin", "s1", 3, 2, grant=1), log)
    decide(primary, Request("checkout", "s2", 4, 3, feature="cad", count=2), log)
    decide(primary, Request("close", "s2", 5, 4), log)
    assert [d["k"] for d in log] == [
        "open", "open", "grant", "grant", "answer", "release", "grant", "close"
    ]  # fmt: skip
    backup = ledger()
    for delta in log:
        backup.apply(delta)
    assert backup.snapshot() == primary.snapshot()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"count": 4}, "over-allocate"),
        ({"grant": 7}, "is not next_grant"),
        ({"feature": "nope"}, "the license has no pool"),
        ({"sid": "s9"}, "is not open"),
        ({"at": "noon"}, "must be a finite number"),
    ],
)
def test_a_backup_still_refuses_a_grant_delta_that_does_not_fit(
    change: dict[str, Any], why: str
) -> None:
    primary, log = ledger(), list[dict[str, Any]]()
    decide(primary, Request("open", "s1", 1, user="ann", host="ws1"), log)
    decide(primary, Request("checkout", "s1", 2, 1, feature="cad"), log)
    backup = ledger()
    backup.apply(log[0])
    before = backup.snapshot()
    with pytest.raises(LedgerError, match=why):
        backup.apply({**log[1], **change})
    assert backup.snapshot() == before


def test_a_release_of_a_grant_not_held_is_refused_by_a_backup() -> None:
    primary, log = ledger(), list[dict[str, Any]]()
    decide(primary, Request("open", "s1", 1, user="ann", host="ws1"), log)
    decide(primary, Request("checkout", "s1", 2, 1, feature="cad"), log)
    decide(primary, Request("checkin", "s1", 3, 2, grant=1), log)
    backup = ledger()
    backup.apply(log[0])
    backup.apply(log[1])
    with pytest.raises(LedgerError, match="holds no grant 5"):
        backup.apply({**log[2], "grant": 5})
