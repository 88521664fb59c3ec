"""The per-feature counts behind the metrics' counters (broker/tallies.py): checkouts,
checkins by how and denials by reason, counted once committed, on the deciding primary."""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_ledger import World, ent, grant_of
from zbroker.broker.ledger import Ledger
from zbroker.broker.model import Request
from zbroker.broker.tallies import CHECKINS, Tallies
from zbroker.peers.types import Entry

pytestmark = pytest.mark.unit


class Primary(World):
    """A World whose decisions go through Tallies as the core's do: each batch is
    decided (features read before apply), proposed at the next log indexes, and
    committed at once unless ``hold`` keeps it proposed."""

    def __init__(self) -> None:
        two = [ent(count=10), ent(feature="solver", version="1.0", count=2)]
        super().__init__(two, Ledger(two, lease=30.0, heartbeat=10.0))
        self.tallies = Tallies()
        self.index = 0
        self.proposed: list[Entry] = []

    def _batch(self, deltas: list[dict[str, Any]], hold: bool) -> None:
        for position, delta in enumerate(deltas):
            if delta["k"] in CHECKINS:  # as the core: no call for any other kind
                self.tallies.decided(position, delta, self.ledger)
            self.ledger.apply(delta)
        indexes = [self.index + 1 + k for k in range(len(deltas))]
        self.index += len(deltas)
        self.tallies.proposed(indexes)
        self.proposed += [Entry(1, i, d) for i, d in zip(indexes, deltas, strict=True)]
        if not hold:
            self.commit()

    def commit(self) -> None:
        self.tallies.committed(self.proposed, 1)
        self.proposed = []

    def ask(self, op: str, sid: str, req: int, hold: bool = False, **kw: Any) -> Any:
        out = self.ledger.handle(Request(op, sid, req, **kw), self.now)
        self._batch([d for d, _ in out.decided], hold)
        replies = [r for _, r in out.decided if r is not None]
        return out.reply if out.reply is not None else (replies[-1] if replies else None)

    def opened(self, sid: str, user: str = "ann") -> None:
        self.ask("open", sid, 1, user=user, host="ws1", display=":0", client_version="1")

    def expire_all(self) -> None:
        self.advance(100.0)
        ticked = self.ledger.tick(self.now)
        self._batch([d for d, _ in ticked.decided], hold=False)


def test_checkouts_checkins_and_denials_are_counted_per_feature() -> None:
    p = Primary()
    p.opened("s1")
    p.opened("s2", user="bob")
    cad = grant_of(p.ask("checkout", "s1", 2, feature="cad", count=3))
    grant_of(p.ask("checkout", "s1", 3, feature="solver", count=1))
    grant_of(p.ask("checkout", "s2", 2, feature="cad", count=1))
    grant_of(p.ask("checkout", "s2", 3, feature="cad", count=1))
    assert p.ask("checkout", "s1", 4, feature="solver", count=2)["reason"] == "no_seats"
    assert p.ask("checkout", "s1", 5, feature="nope", count=1)["reason"] == "no_such_feature"
    assert p.ask("checkin", "s1", 6, grant=999)["reason"] == "not_held"
    p.ask("checkin", "s1", 7, grant=cad["id"])
    p.ask("close", "s2", 4)  # two grants of cad come back with the session
    p.expire_all()  # s1's solver seat comes back with its lease
    assert dict(p.tallies.counts) == {
        ("checkout", "cad"): 3,
        ("checkout", "solver"): 1,
        ("denied", "no_seats", "solver"): 1,
        ("denied", "no_such_feature", "(unknown)"): 1,
        ("denied", "not_held", ""): 1,
        ("checkin", "release", "cad"): 1,
        ("checkin", "close", "cad"): 2,
        ("checkin", "expire", "solver"): 1,
    }


def test_names_the_license_lacks_share_one_label() -> None:
    # A client chooses the feature name: 1,000 typos must not make 1,000 counters.
    p = Primary()
    p.opened("s1")
    for n in range(1000):
        reply = p.ask("checkout", "s1", 2 + n, feature=f"typo{n}", count=1)
        assert reply["reason"] == "no_such_feature"
    assert dict(p.tallies.counts) == {("denied", "no_such_feature", "(unknown)"): 1000}


def test_nothing_counts_before_it_commits_and_a_change_of_role_forgets_it() -> None:
    p = Primary()
    p.opened("s1")
    held = grant_of(p.ask("checkout", "s1", 2, feature="cad", hold=True))
    p.ask("checkin", "s1", 3, hold=True, grant=held["id"])
    assert dict(p.tallies.counts) == {}
    p.commit()
    assert dict(p.tallies.counts) == {("checkout", "cad"): 1, ("checkin", "release", "cad"): 1}
    again = grant_of(p.ask("checkout", "s1", 4, feature="cad"))
    p.ask("checkin", "s1", 5, hold=True, grant=again["id"])
    p.ask("close", "s1", 6, hold=True)  # nothing left to check in: counts nothing anyway
    p.tallies.forget()  # the node stepped down before they committed, and won a new term
    p.tallies.committed(p.proposed, 2)
    assert p.tallies.counts["checkin", "release", "cad"] == 1


def test_a_session_end_counts_the_grants_it_held_once_committed_and_not_after_forget() -> None:
    p = Primary()
    p.opened("s1")
    grant_of(p.ask("checkout", "s1", 2, feature="cad"))
    p.ask("close", "s1", 3, hold=True)
    p.tallies.forget()  # read from the ledger before it applied; the role changed since
    p.commit()
    assert p.tallies.counts["checkin", "close", "cad"] == 0


def test_a_session_that_ends_holding_nothing_counts_no_checkin() -> None:
    p = Primary()
    p.opened("s1")
    p.ask("close", "s1", 2)
    assert dict(p.tallies.counts) == {}


def test_a_take_counts_as_a_checkin_by_its_reason() -> None:
    p = Primary()
    p.opened("s1")
    held = grant_of(p.ask("checkout", "s1", 2, feature="solver"))
    tallies = Tallies()
    take = {"k": "take", "grant": held["id"], "reason": "removed", "at": p.wall}
    tallies.decided(0, take, p.ledger)
    tallies.proposed([41])
    tallies.committed([Entry(1, 41, take)], 1)
    assert dict(tallies.counts) == {("checkin", "removed", "solver"): 1}


def test_entries_of_another_term_count_nothing() -> None:
    """A primary counts only what it decided: a grant committed under it but decided by
    the primary of an earlier term was counted (or dropped) by that one."""
    p = Primary()
    p.opened("s1")
    held = grant_of(p.ask("checkout", "s1", 2, feature="cad", hold=True))
    p.ask("checkin", "s1", 3, hold=True, grant=held["id"])
    p.tallies.committed(p.proposed, 2)
    assert dict(p.tallies.counts) == {}


def test_a_lingering_seats_end_is_no_checkin() -> None:
    p = Primary()
    p.opened("s1")
    held = grant_of(p.ask("checkout", "s1", 2, feature="cad"))
    lapse = {"k": "lapse", "grant": held["id"], "at": p.wall}
    assert lapse["k"] not in CHECKINS  # the core never asks ``decided`` about it
    p.tallies.committed([Entry(1, 99, lapse)], 1)
    assert dict(p.tallies.counts) == {("checkout", "cad"): 1}
