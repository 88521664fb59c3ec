"""Unit tests of the ledger: every rule of docs/design.md, driven with a fake clock."""

from __future__ import annotations

import datetime
import itertools
from typing import Any

import msgpack
import pytest

from zbroker.broker.ledger import Ledger, LedgerError, Outcome
from zbroker.broker.model import Entitlement, ErrorCode, Now, Reason, Reply, Request

pytestmark = pytest.mark.unit

LEASE, HEARTBEAT = 10.0, 2.0
DAY0 = datetime.datetime(2026, 6, 1, 12, tzinfo=datetime.UTC).timestamp()


def ent(
    version: str = "2.0",
    count: int = 10,
    feature: str = "cad",
    expires: datetime.date | None = None,
    users: set[str] | None = None,
    hosts: set[str] | None = None,
) -> Entitlement:
    return Entitlement(
        feature,
        version,
        count,
        expires,
        frozenset(users) if users is not None else None,
        frozenset(hosts) if hosts is not None else None,
        source="test.lic:1",
    )


class World:
    """A ledger on a 'primary' that applies what it decides, with a fake clock."""

    def __init__(self, entitlements: list[Entitlement], ledger: Ledger | None = None) -> None:
        self.ledger = ledger or Ledger(entitlements, lease=LEASE, heartbeat=HEARTBEAT)
        self.mono = 1000.0
        self.wall = DAY0
        self.reqs: dict[str, itertools.count[int]] = {}
        self.log: list[dict[str, Any]] = []
        self.ended: list[tuple[str, int]] = []  # set by tick()

    @property
    def now(self) -> Now:
        return Now(self.mono, self.wall)

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def outcome(self, op: str, sid: str, req: int | None = None, **kw: Any) -> Outcome:
        if req is None:
            req = next(self.reqs.setdefault(sid, itertools.count(1)))
        out = self.ledger.handle(Request(op, sid, req, **kw), self.now)
        for delta in deltas_of(out):
            self.ledger.apply(delta)
            self.log.append(delta)
        return out

    def send(self, op: str, sid: str, req: int | None = None, **kw: Any) -> Reply | None:
        """The reply the client gets (after commit), or None when the request waits."""
        out = self.outcome(op, sid, req, **kw)
        if out.reply is not None:
            return out.reply
        answered = [reply for delta, reply in out.decided if "req" in delta]
        return answered[-1] if answered else None

    def open(self, sid: str, user: str = "ann", host: str = "ws1") -> Reply | None:
        return self.send("open", sid, user=user, host=host, display=":0", client_version="1")

    def checkout(self, sid: str, count: int = 1, version: str | None = None, **kw: Any) -> Any:
        return self.send("checkout", sid, feature=kw.pop("feature", "cad"), count=count,
                         version=version, **kw)  # fmt: skip

    def tick(self) -> list[dict[str, Any]]:
        ticked = self.ledger.tick(self.now)
        self.ended = ticked.ended  # the waiters this tick dropped: their session ended
        deltas = [delta for delta, _ in ticked.decided]
        for delta in deltas:
            self.ledger.apply(delta)
            self.log.append(delta)
        return deltas


def deltas_of(out: Outcome) -> list[dict[str, Any]]:
    return [delta for delta, _ in out.decided]


def grant_of(reply: Any) -> dict[str, Any]:
    assert reply["status"] == "ok", reply
    return reply["grant"]


def denied(reply: Any, reason: str) -> str:
    assert reply["status"] == "denied" and reply["reason"] == reason, reply
    return reply["detail"]


# ---------------------------------------------------------------- sessions


def test_open_records_ok_with_lease_and_heartbeat() -> None:
    w = World([ent()])
    out = w.outcome("open", "s1", user="ann", host="ws1")
    assert [d["k"] for d in deltas_of(out)] == ["open"] and out.reply is None
    assert w.ledger.recorded("s1", 1) == {"status": "ok", "lease": LEASE, "heartbeat": HEARTBEAT}


def test_open_again_with_new_req_answers_without_a_second_session() -> None:
    w = World([ent()])
    w.open("s1")
    out = w.outcome("open", "s1", user="bob")
    assert [d["k"] for d in deltas_of(out)] == ["answer"]
    assert w.ledger.sessions() == ["s1"]
    assert w.ledger.session("s1").user == "ann"  # type: ignore[union-attr]


@pytest.mark.parametrize("op", ["checkout", "checkin", "heartbeat"])
def test_unknown_session_is_an_error_without_delta(op: str) -> None:
    w = World([ent()])
    out = w.outcome(op, "ghost", feature="cad")
    assert deltas_of(out) == [] and out.reply is not None
    assert out.reply["code"] == ErrorCode.UNKNOWN_SESSION


def test_close_unknown_session_is_ok_without_delta() -> None:
    w = World([ent()])
    assert w.outcome("close", "ghost") == Outcome([], {"status": "ok"})


def test_close_releases_every_grant() -> None:
    w = World([ent(count=3)])
    w.open("s1")
    w.checkout("s1", 2)
    out = w.outcome("close", "s1")
    assert [d["k"] for d in deltas_of(out)] == ["close"]
    assert out.decided[0][1] == {"status": "ok"}
    assert w.ledger.sessions() == [] and w.ledger.in_use("cad") == 0


def test_status_op_is_the_nodes_business() -> None:
    w = World([ent()])
    out = w.outcome("status", "")
    assert deltas_of(out) == [] and out.reply is not None
    assert out.reply["code"] == ErrorCode.BAD_REQUEST


def test_handle_never_mutates_replicated_state() -> None:
    w = World([ent(count=1)])
    w.open("s1")
    before = w.ledger.snapshot()
    cases: list[tuple[str, dict[str, Any]]] = [
        ("checkout", {"feature": "cad"}),
        ("checkin", {"grant": 9}),
        ("close", {}),
    ]
    for op, kw in cases:
        w.ledger.handle(Request(op, "s1", 50, **kw), w.now)
        assert w.ledger.snapshot() == before


# ---------------------------------------------------------------- checkouts


def test_checkout_reply_and_consecutive_grant_ids() -> None:
    w = World([ent()])
    w.open("s1")
    g1, g2 = grant_of(w.checkout("s1", 3)), grant_of(w.checkout("s1", 2))
    assert g1 == {"id": 1, "feature": "cad", "version": "2.0", "count": 3}
    assert g2["id"] == 2 and w.ledger.next_grant == 3
    assert w.ledger.in_use("cad") == 5 and w.ledger.in_use("cad", "2") == 5


def test_no_such_feature() -> None:
    w = World([ent()])
    w.open("s1")
    assert "solver" in denied(w.checkout("s1", feature="solver"), Reason.NO_SUCH_FEATURE)


def test_version_too_high() -> None:
    w = World([ent("2.0"), ent("2.5")])
    w.open("s1")
    detail = denied(w.checkout("s1", version="3"), Reason.VERSION_TOO_HIGH)
    assert "2.5" in detail


def test_expired_only_when_every_candidate_line_expired() -> None:
    w = World([ent("1.0"), ent("2.0", expires=datetime.date(2026, 5, 31))])
    w.open("s1")
    assert "2026-05-31" in denied(w.checkout("s1", version="2.0"), Reason.EXPIRED)
    assert grant_of(w.checkout("s1", version="1.0"))["version"] == "1.0"


def test_line_grants_through_its_expiry_date_and_not_after() -> None:
    w = World([ent(count=1, expires=datetime.date(2026, 6, 1)), ent(count=1, expires=None)])
    w.open("s1")
    w.open("s2")
    grant_of(w.checkout("s1"))  # the pool holds both lines today: 2 seats
    w.advance(86400)  # 2026-06-02: the dated line is gone
    w.send("heartbeat", "s1")
    w.send("heartbeat", "s2")
    assert "1 of 1 seats in use" in denied(w.checkout("s2"), Reason.NO_SEATS)
    assert w.ledger.status(w.now)[0]["total"] == 1


def test_users_and_hosts_restrict_lines() -> None:
    w = World([ent("1.0", users={"ann"}), ent("2.0", hosts={"ws9"})])
    w.open("ann", user="ann", host="ws1")
    w.open("bob", user="bob", host="ws1")
    w.open("cid", user="cid", host="ws9")
    assert grant_of(w.checkout("ann"))["version"] == "1.0"
    assert "'bob'" in denied(w.checkout("bob"), Reason.NOT_ALLOWED)
    assert grant_of(w.checkout("cid"))["version"] == "2.0"  # 1.0 excludes cid: skipped


def test_lowest_version_pool_with_free_seats_serves() -> None:
    w = World([ent("3.0", 5), ent("1.0", 2), ent("2.0", 1)])
    w.open("s1")
    assert grant_of(w.checkout("s1"))["version"] == "1.0"
    assert grant_of(w.checkout("s1", version="1.5"))["version"] == "2.0"
    assert grant_of(w.checkout("s1", version="2"))["version"] == "3.0"  # 2.0 is full
    assert grant_of(w.checkout("s1", 2, version="1"))["version"] == "3.0"  # 1.0 has only 1 free


def test_increment_lines_pool_by_parsed_version() -> None:
    w = World([ent("2.0", 10), ent("2", 5), ent("2.10", 1)])
    w.open("s1")
    assert grant_of(w.checkout("s1", 15))["version"] == "2.0"
    status = w.ledger.status(w.now)[0]
    assert [(v["version"], v["total"], v["in_use"]) for v in status["versions"]] == [
        ("2.0", 15, 15),
        ("2.10", 1, 0),
    ]


def test_count_above_every_pool_is_denied_even_with_wait() -> None:
    w = World([ent("1.0", 4), ent("2.0", 6)])
    w.open("s1")
    detail = denied(w.checkout("s1", 7, wait=30.0), Reason.NO_SEATS)
    assert "7 seats" in detail and "has 6" in detail
    assert w.ledger.queued("cad") == 0


@pytest.mark.parametrize("wait", [None, 0.0])
def test_no_free_seats_without_wait_is_denied(wait: float | None) -> None:
    w = World([ent(count=10)])
    w.open("s1")
    w.open("s2")
    w.checkout("s1", 10)
    detail = denied(w.checkout("s2", wait=wait), Reason.NO_SEATS)
    assert detail == "cad 2.0: 10 of 10 seats in use"


def test_checkout_with_bad_version_is_a_bad_request() -> None:
    w = World([ent()])
    w.open("s1")
    out = w.outcome("checkout", "s1", feature="cad", version="two")
    assert deltas_of(out) == [] and out.reply is not None
    assert out.reply["code"] == ErrorCode.BAD_REQUEST


# ---------------------------------------------------------------- checkin


def test_checkin_of_held_grant_releases_it() -> None:
    w = World([ent(count=1)])
    w.open("s1")
    gid = grant_of(w.checkout("s1"))["id"]
    out = w.outcome("checkin", "s1", grant=gid)
    assert [d["k"] for d in deltas_of(out)] == ["release"]
    assert w.ledger.in_use("cad") == 0


def test_checkin_of_foreign_or_unknown_grant_is_not_held() -> None:
    w = World([ent()])
    w.open("s1")
    w.open("s2")
    gid = grant_of(w.checkout("s1"))["id"]
    out = w.outcome("checkin", "s2", grant=gid)
    assert [d["k"] for d in deltas_of(out)] == ["answer"]
    denied(out.decided[0][1], Reason.NOT_HELD)
    denied(w.send("checkin", "s2", grant=99), Reason.NOT_HELD)
    assert w.ledger.in_use("cad") == 1


# ---------------------------------------------------------------- exactly once


def test_retry_returns_the_recorded_reply_without_delta() -> None:
    w = World([ent(count=1)])
    w.open("s1")
    first = w.checkout("s1", req=5)
    retry = w.outcome("checkout", "s1", 5, feature="cad")
    assert retry == Outcome([], first)
    assert w.ledger.in_use("cad") == 1 and w.ledger.next_grant == 2


def test_retry_of_a_denial_is_the_same_denial_even_when_seats_freed() -> None:
    w = World([ent(count=1)])
    w.open("s1")
    w.open("s2")
    gid = grant_of(w.checkout("s1"))["id"]
    first = w.checkout("s2", req=7)
    w.send("checkin", "s1", grant=gid)
    assert w.outcome("checkout", "s2", 7, feature="cad") == Outcome([], first)


def test_retry_after_failover_gets_the_same_reply() -> None:
    w = World([ent()])
    w.open("s1")
    first = w.checkout("s1", req=3)
    new = Ledger.from_snapshot(w.ledger.snapshot(), lease=LEASE, heartbeat=HEARTBEAT)
    assert new.handle(Request("checkout", "s1", 3, feature="cad"), w.now) == Outcome([], first)


def test_ack_prunes_recorded_replies_and_makes_older_requests_stale() -> None:
    w = World([ent()])
    w.open("s1")  # req 1
    w.checkout("s1", req=2)
    w.checkout("s1", req=3)
    w.send("checkin", "s1", req=4, ack=3, grant=99)
    assert w.ledger.recorded("s1", 2) is None and w.ledger.recorded("s1", 3) is not None
    assert w.ledger.session("s1").ack == 3  # type: ignore[union-attr]
    out = w.outcome("checkout", "s1", 2, feature="cad")
    assert deltas_of(out) == [] and out.reply is not None
    assert out.reply["code"] == ErrorCode.STALE_REQUEST
    # A lower ack later does not lower the session's.
    w.send("heartbeat", "s1", req=5, ack=1)
    w.checkout("s1", req=6, ack=1)
    assert w.ledger.session("s1").ack == 3  # type: ignore[union-attr]


def test_request_below_its_own_ack_is_stale() -> None:
    w = World([ent()])
    out = w.outcome("open", "s1", 2, ack=3)
    assert out.reply is not None and out.reply["code"] == ErrorCode.STALE_REQUEST


# ---------------------------------------------------------------- leases


def test_lease_expiry_returns_seats() -> None:
    w = World([ent(count=2)])
    w.open("s1")
    w.checkout("s1", 2)
    w.advance(LEASE)
    assert w.tick() == []  # exactly at the deadline: not yet
    w.advance(0.01)
    assert w.tick() == [{"k": "expire", "sid": "s1", "at": w.wall}]
    assert w.ledger.sessions() == [] and w.ledger.in_use("cad") == 0


def test_any_request_renews_the_lease_and_heartbeat_has_no_delta() -> None:
    w = World([ent()])
    w.open("s1")
    w.advance(LEASE - 1)
    assert w.outcome("heartbeat", "s1") == Outcome([], {"status": "ok", "lease": LEASE})
    w.advance(LEASE - 1)
    w.checkout("s1")
    w.advance(LEASE - 1)
    assert w.tick() == [] and w.ledger.lease_of("s1") == pytest.approx(w.mono + 1)


def test_fresh_lease_after_failover_even_if_time_jumped() -> None:
    w = World([ent()])
    w.open("s1")
    w.checkout("s1")
    snap = w.ledger.snapshot()
    w.ledger = Ledger.from_snapshot(snap, lease=LEASE, heartbeat=HEARTBEAT)
    w.advance(10 * LEASE)
    assert w.tick() == []
    assert w.ledger.lease_of("s1") == w.mono + LEASE
    w.advance(LEASE + 0.1)
    assert w.tick() == [{"k": "expire", "sid": "s1", "at": w.wall}]


def test_forget_volatile_drops_leases_and_queue() -> None:
    w = World([ent(count=1)])
    w.open("s1")
    w.open("s2")
    w.checkout("s1")
    w.checkout("s2", wait=5.0)
    w.ledger.forget_volatile()
    assert w.ledger.lease_of("s1") is None and w.ledger.queued("cad") == 0


# ---------------------------------------------------------------- wait queue


def queued_world(count: int = 2) -> World:
    w = World([ent(count=count)])
    for sid in ("a", "b", "c", "d"):
        w.open(sid)
    w.checkout("a", count)
    return w


def test_waiter_is_granted_in_fifo_order_as_seats_free() -> None:
    w = queued_world(2)
    assert w.checkout("b", wait=30.0) is None
    assert w.checkout("c", wait=30.0) is None
    assert w.ledger.queued("cad") == 2 and w.ledger.status(w.now)[0]["queued"] == 2
    assert w.tick() == []
    w.send("checkin", "a", grant=1)
    deltas = w.tick()
    assert [(d["k"], d["sid"], d["grant"]) for d in deltas] == [
        ("grant", "b", 2),
        ("grant", "c", 3),
    ]
    assert grant_of(w.ledger.recorded("b", 2))["id"] == 2
    assert w.ledger.queued("cad") == 0


def test_a_waiter_that_does_not_fit_holds_back_no_one_behind_it() -> None:
    w = queued_world(2)
    w.checkout("b", 2, wait=30.0)
    w.checkout("c", 1, wait=30.0)
    w.outcome("checkin", "a", grant=1)
    w.checkout("a", 1)  # a takes one seat back right away: it does not wait
    deltas = w.tick()  # b needs 2, only 1 free: c, behind it, takes that one
    assert [(d["k"], d["sid"], d["count"]) for d in deltas] == [("grant", "c", 1)]
    assert w.ledger.queued("cad") == 1  # b keeps its place


def test_a_new_waiter_that_fits_is_served_at_once_whoever_waits() -> None:
    w = queued_world(2)
    w.checkout("b", 2, wait=30.0)
    w.send("checkin", "a", grant=1)
    w.checkout("a", 1)  # no wait: served now
    assert grant_of(w.checkout("c", 1, wait=30.0))["count"] == 1  # b cannot use the seat yet
    assert w.ledger.queued("cad") == 1


def test_waiter_past_its_deadline_is_denied_saying_it_waited() -> None:
    w = queued_world(2)
    w.checkout("b", wait=5.0)
    w.advance(4.9)
    w.send("heartbeat", "a")
    assert w.tick() == []
    w.advance(0.2)
    (delta,) = w.tick()
    detail = denied(delta["reply"], Reason.NO_SEATS)
    assert "2 of 2 seats in use" in detail and "waiting 5 s" in detail
    assert w.ledger.queued("cad") == 0


def test_duplicate_of_a_waiter_does_not_queue_twice() -> None:
    w = queued_world(2)
    w.checkout("b", wait=30.0, req=9)
    assert w.outcome("checkout", "b", 9, feature="cad", wait=30.0) == Outcome([], None)
    assert w.ledger.queued("cad") == 1


def test_waiter_whose_session_ended_is_dropped() -> None:
    w = queued_world(2)
    w.checkout("b", wait=30.0)
    w.checkout("c", wait=30.0)
    w.send("close", "b")
    w.send("checkin", "a", grant=1)
    deltas = w.tick()
    assert [(d["k"], d["sid"]) for d in deltas] == [("grant", "c")]
    assert w.ledger.queued("cad") == 0
    # the node's front forgets where b's request came from: no answer will leave for it
    assert [sid for sid, _ in w.ended] == ["b"]
    w.tick()
    assert w.ended == []  # told once


def test_last_seat_goes_to_one_waiter_only() -> None:
    w = queued_world(2)
    w.checkout("b", wait=30.0)
    w.checkout("c", wait=30.0)
    w.checkout("d", wait=30.0)
    w.send("close", "a")  # two seats free for three waiters
    deltas = w.tick()
    assert [d["k"] for d in deltas] == ["grant", "grant"]
    assert w.ledger.in_use("cad") == 2 and w.ledger.queued("cad") == 1


def test_expired_session_seats_go_to_waiters_in_the_same_tick() -> None:
    w = queued_world(2)
    w.checkout("b", 2, wait=3 * LEASE)
    w.advance(LEASE + 1)
    for sid in ("b", "c", "d"):
        w.send("heartbeat", sid)
    deltas = w.tick()
    assert [(d["k"], d["sid"]) for d in deltas] == [("expire", "a"), ("grant", "b")]
    assert deltas[1]["grant"] == 2


def test_waiter_is_denied_when_a_reload_removes_its_feature() -> None:
    w = queued_world(2)
    w.checkout("b", wait=30.0)
    w.ledger.apply(w.ledger.reload_delta([ent(feature="solver")]))
    (delta,) = w.tick()
    denied(delta["reply"], Reason.NO_SUCH_FEATURE)


# ---------------------------------------------------------------- reload


def test_reload_keeps_grants_over_a_shrunk_pool_and_new_checkouts_see_new_counts() -> None:
    w = World([ent(count=5)])
    w.open("s1")
    w.checkout("s1", 4)
    w.ledger.apply(w.ledger.reload_delta([ent(count=2)]))
    assert w.ledger.in_use("cad") == 4
    assert "4 of 2 seats in use" in denied(w.checkout("s1"), Reason.NO_SEATS)
    w.ledger.apply(w.ledger.reload_delta([ent(count=2), ent("2", 3)]))
    grant_of(w.checkout("s1"))
    assert w.ledger.status(w.now)[0]["total"] == 5


def test_a_grant_whose_pool_a_reload_removes_counts_in_the_pool_serving_its_version() -> None:
    # The vendor's upgrade: the 2.0 line replaced by a 3.0 line of the same 10 seats. The 8
    # seats out under 2.0 must count against the 3.0 pool, or it lends them again (probe:
    # 18 of 10).
    w = World([ent("2.0", 10)])
    w.open("s1")
    w.open("s2", user="bob")
    held = grant_of(w.checkout("s1", 8))
    w.ledger.apply(w.ledger.reload_delta([ent("3.0", 10)]))
    assert "8 of 10 seats in use" in denied(w.checkout("s2", 10), Reason.NO_SEATS)
    grant_of(w.checkout("s2", 2))
    assert w.ledger.status(w.now)[0]["in_use"] == 10
    assert w.ledger.grant(held["id"]).version == "3.0"  # type: ignore[union-attr]
    # A backup that starts from a snapshot after it counts the same.
    again = Ledger.from_snapshot(w.ledger.snapshot(), lease=LEASE, heartbeat=HEARTBEAT)
    assert again.status(w.now) == w.ledger.status(w.now)


@pytest.mark.parametrize(
    ("lines", "home"),
    [
        ([ent("1.0", 5), ent("3.0", 5)], "3.0"),  # the lowest at or above 2.0
        ([ent("1.0", 5)], "1.0"),  # none above: the feature's highest
    ],
)
def test_a_grant_left_without_its_pool_goes_to_one_that_serves_the_feature(
    lines: list[Entitlement], home: str
) -> None:
    w = World([ent("2.0", 10)])
    w.open("s1")
    held = grant_of(w.checkout("s1", 4))
    w.ledger.apply(w.ledger.reload_delta(lines))
    assert w.ledger.grant(held["id"]).version == home  # type: ignore[union-attr]
    assert w.ledger.in_use("cad", home) == 4


def test_an_older_primarys_reload_moves_no_grant() -> None:
    # An older primary's reload (no "rehome"): its own ledger leaves the grants where they
    # were, so its backups must too, or they refuse its next grant as an over-allocation.
    w = World([ent("2.0", 10)])
    w.open("s1")
    held = grant_of(w.checkout("s1", 8))
    older = {k: v for k, v in w.ledger.reload_delta([ent("3.0", 10)]).items() if k != "rehome"}
    w.ledger.apply(older)
    assert w.ledger.grant(held["id"]).version == "2.0"  # type: ignore[union-attr]


def test_a_feature_a_reload_removes_keeps_its_grants_counting_nowhere() -> None:
    w = World([ent("2.0", 10), ent("1.0", 2, feature="solver")])
    w.open("s1")
    held = grant_of(w.checkout("s1", 4))
    w.ledger.apply(w.ledger.reload_delta([ent("1.0", 2, feature="solver")]))
    assert w.ledger.grant(held["id"]).version == "2.0"  # type: ignore[union-attr]
    assert w.ledger.in_use("cad") == 4  # held until checked in, as a count lowered to 0


# ---------------------------------------------------------------- apply and snapshot


def test_grant_delta_must_carry_next_grant() -> None:
    w = World([ent()])
    w.open("s1")
    delta = deltas_of(w.ledger.handle(Request("checkout", "s1", 2, feature="cad"), w.now))[0]
    with pytest.raises(LedgerError, match="next_grant"):
        w.ledger.apply({**delta, "grant": 2})
    w.ledger.apply(delta)
    assert w.ledger.next_grant == 2


def _base() -> tuple[World, dict[str, Any]]:
    w = World([ent(count=2)])
    w.open("s1")
    w.checkout("s1", 2, req=2)
    good = {"k": "grant", "sid": "s1", "req": 3, "ack": 0, "grant": 2, "feature": "cad",
            "version": "2.0", "count": 1, "at": DAY0}  # fmt: skip
    return w, good


BAD_DELTAS: list[tuple[str, Any]] = [
    ("not a map", ["grant"]),
    ("unknown kind", {"k": "steal"}),
    ("missing field", {"k": "expire"}),
    ("wrong type", {"k": "expire", "sid": 7}),
    ("open twice", {"k": "open", "sid": "s1", "req": 9, "ack": 0, "user": "", "host": "",
                    "display": "", "client_version": "", "at": DAY0}),
    ("grant for unknown session", {"sid": "ghost"}),
    ("over-allocation", {"grant": 2}),
    ("wrong grant id", {"grant": 5}),
    ("unknown pool", {"version": "9.0", "count": 0}),
    ("bool count", {"count": True}),
    ("nan at", {"at": float("nan")}),
    ("answered twice", {"req": 2}),
    ("below ack", {"req": 3, "ack": 4}),
    ("release of unknown grant", {"k": "release", "sid": "s1", "req": 3, "ack": 0, "grant": 9}),
    ("close unknown", {"k": "close", "sid": "ghost", "req": 1, "ack": 0}),
    ("answer not a reply", {"k": "answer", "sid": "s1", "req": 3, "ack": 0, "reply": "ok"}),
    ("reload of bad line", {"k": "reload", "entitlements": [{"feature": "x", "version": "x"}]}),
    ("reload not a list", {"k": "reload", "entitlements": None}),
]  # fmt: skip


@pytest.mark.parametrize(("why", "patch"), BAD_DELTAS, ids=[b[0] for b in BAD_DELTAS])
def test_malformed_delta_raises_and_changes_nothing(why: str, patch: Any) -> None:
    w, good = _base()
    if isinstance(patch, dict) and "k" not in patch:
        patch = {**good, **patch}
    before = w.ledger.snapshot()
    with pytest.raises(LedgerError):
        w.ledger.apply(patch)
    assert w.ledger.snapshot() == before


def test_snapshot_round_trips_through_msgpack() -> None:
    w = World([ent(count=3, users={"ann", "bob"}, expires=datetime.date(2030, 1, 1)), ent("3")])
    w.open("s1")
    w.open("s2", user="bob")
    w.checkout("s1", 2)
    w.checkout("s2", 5, version="3")
    w.send("checkin", "s2", grant=77)
    snap = w.ledger.snapshot()
    wire = msgpack.unpackb(msgpack.packb(snap, use_bin_type=True), raw=False)
    assert wire == snap
    again = Ledger.from_snapshot(wire, lease=LEASE, heartbeat=HEARTBEAT)
    assert again.snapshot() == snap
    assert again.status(w.now) == w.ledger.status(w.now)


def test_deltas_round_trip_through_msgpack_and_replay() -> None:
    w = World([ent(count=2)])
    start = w.ledger.snapshot()
    w.open("s1")
    w.checkout("s1", 2)
    w.open("s2")
    w.checkout("s2", wait=5.0)
    w.send("close", "s1")
    w.tick()
    w.ledger.apply(w.ledger.reload_delta([ent(count=4)]))
    w.log.append(w.ledger.reload_delta([ent(count=4)]))
    replica = Ledger.from_snapshot(start, lease=LEASE, heartbeat=HEARTBEAT)
    for delta in w.log:
        replica.apply(msgpack.unpackb(msgpack.packb(delta, use_bin_type=True), raw=False))
    assert replica.snapshot() == w.ledger.snapshot()


@pytest.mark.parametrize(
    "patch",
    [{"v": 2}, {"sessions": None}, {"grants": [{"grant": 1}]}, {"next_grant": 0}],
)
def test_malformed_snapshot_raises(patch: dict[str, Any]) -> None:
    w = World([ent()])
    w.open("s1")
    with pytest.raises(LedgerError):
        Ledger.from_snapshot({**w.ledger.snapshot(), **patch}, lease=LEASE, heartbeat=HEARTBEAT)


def test_status_lists_features_pools_and_holders() -> None:
    lines = [
        ent(count=10, expires=datetime.date(2027, 12, 31)),
        ent(count=5),
        ent("1.5", 2, "solver"),
    ]
    w = World(lines)
    w.open("s1", user="ann", host="ws1")
    w.checkout("s1", 3)
    w.checkout("s1", feature="solver")
    cad, solver = w.ledger.status(w.now)
    assert cad == {
        "name": "cad",
        "total": 15,
        "in_use": 3,
        "queued": 0,
        "lingering": 0,
        "borrowed": 0,
        "versions": [{"version": "2.0", "total": 15, "in_use": 3, "expires": "2027-12-31",
                      "lines": [{"count": 10, "expires": "2027-12-31", "source": "test.lic:1",
                                 "days": (datetime.date(2027, 12, 31) - w.now.date).days},
                                {"count": 5, "expires": None, "days": None,
                                 "source": "test.lic:1"}]}],
    }  # fmt: skip
    assert w.ledger.holders("cad", 0, 10) == (
        [{"grant": 1, "feature": "cad", "user": "ann", "host": "ws1", "display": ":0",
          "count": 3, "version": "2.0", "since": DAY0}],
        None,
    )  # fmt: skip
    assert solver["name"] == "solver" and solver["versions"][0]["expires"] is None
