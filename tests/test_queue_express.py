"""The wait queue's rule (RLM's EXPRESS): a checkout that can be served now is, waiting or
not; a waiter that cannot be served keeps its place and holds back no one behind it; a
checkout that no release could ever serve is refused at once (broker/ledger.py, the
``busy`` of broker/seats.py's ``Denial`` as broker/policy.py makes it exact)."""

from __future__ import annotations

import pytest

from tests.test_dup_group import lapse, line, out
from tests.test_dup_group import world as dup_world
from tests.test_flood import CountingLedger
from tests.test_ledger import HEARTBEAT, LEASE, World, denied, ent, grant_of
from zbroker.broker.ledger import Ledger
from zbroker.broker.model import Reason
from zbroker.broker.options import parse_options

pytestmark = pytest.mark.unit


def world(options: str = "", *lines: tuple[str, int]) -> World:
    opts = parse_options(options, path="site.opt") if options else None
    entitlements = [ent(version, count) for version, count in lines or [("2.0", 15)]]
    w = World([], Ledger(entitlements, lease=LEASE, heartbeat=HEARTBEAT, options=opts))
    for name in ("ann", "bob", "carol", "dave", "erin"):
        w.open(name, user=name, host=f"{name}-ws")
    return w


def test_a_reservation_s_own_principal_is_served_at_once_past_a_waiter_who_cannot_use_it() -> None:
    w = world("RESERVE 2 cad USER ann")
    grant_of(w.checkout("carol", 13))  # every seat that is not ann's
    assert w.checkout("bob", wait=12.0) is None
    assert grant_of(w.checkout("ann", wait=10.0))["count"] == 1  # not 10 s later
    assert w.ledger.queued("cad") == 1


def test_a_group_member_needing_no_seat_is_not_held_behind_a_waiter() -> None:
    w = dup_world(line(count=2))
    grant_of(out(w, "base", dup="UH"))  # ann on ws1 holds the group's seat
    grant_of(out(w, "user"))  # bob: the pool is full
    assert out(w, "host", wait=8.0) is None  # ann on ws2, in no group: waits
    member = grant_of(out(w, "display", dup="UH", wait=5.0))  # ann on ws1 :1: the same seat
    assert member["count"] == 1 and w.ledger.in_use("cad") == 2
    assert w.ledger.queued("cad") == 1


def test_a_checkout_another_pool_serves_is_not_held_behind_a_waiter_for_a_full_one() -> None:
    w = world("", ("2.0", 2), ("3.0", 1))
    grant_of(w.checkout("carol", version="3.0"))
    assert w.checkout("bob", version="3.0", wait=8.0) is None
    assert grant_of(w.checkout("dave", version="2.0", wait=5.0))["version"] == "2.0"
    assert w.ledger.queued("cad") == 1


def test_a_count_the_reservations_never_leave_is_refused_at_once_and_holds_no_one() -> None:
    w = world("RESERVE 13 cad USER ann")
    detail = denied(w.checkout("bob", 3, wait=6.0), Reason.RESERVED)  # only 2 not ann's
    assert detail.startswith("3 seats of cad asked for, but at most 2 of cad 2.0 can ever")
    assert "RESERVE 13 cad USER ann (site.opt:1)" in detail
    assert w.ledger.queued("cad") == 0
    grant_of(w.checkout("carol", wait=4.0))
    grant_of(w.checkout("ann", 13))  # ann's reservation is whole: it may take all of it


def test_a_count_above_a_max_is_refused_at_once_even_when_the_pool_is_full() -> None:
    w = world("MAX 2 cad USER bob")
    grant_of(w.checkout("carol", 15))
    detail = denied(w.checkout("bob", 3, wait=6.0), Reason.MAX_REACHED)
    assert "user bob may hold at most 2 of cad: MAX 2 cad USER bob (site.opt:1)" in detail
    assert w.ledger.queued("cad") == 0
    assert w.checkout("bob", 2, wait=6.0) is None  # within its MAX: seats may free
    assert w.ledger.queued("cad") == 1


def test_a_reload_that_makes_a_waiter_impossible_denies_it_at_the_next_tick() -> None:
    w = world()
    grant_of(w.checkout("carol", 15))
    assert w.checkout("bob", 3, wait=60.0) is None
    opts = parse_options("RESERVE 14 cad USER ann", path="site.opt")
    w.ledger.apply(w.ledger.reload_delta([ent("2.0", 15)], opts))
    (delta,) = w.tick()
    assert delta["sid"] == "bob" and delta["reply"]["reason"] == Reason.RESERVED
    assert w.ledger.queued("cad") == 0


def test_equal_waiters_are_served_first_come_first_served() -> None:
    w = world("", ("2.0", 1))
    held = grant_of(w.checkout("carol"))
    assert w.checkout("bob", wait=30.0) is None
    assert w.checkout("dave", wait=30.0) is None
    w.send("checkin", "carol", grant=held["id"])
    assert [(d["k"], d["sid"]) for d in w.tick()] == [("grant", "bob")]
    assert w.ledger.queued("cad") == 1 and w.tick() == []


def test_waiters_served_in_one_tick_count_the_seats_granted_before_them() -> None:
    w = world("", ("2.0", 3))
    held = grant_of(w.checkout("carol", 3))
    assert w.checkout("bob", 3, wait=30.0) is None
    assert w.checkout("dave", 2, wait=30.0) is None
    assert w.checkout("erin", 1, wait=30.0) is None
    w.send("checkin", "carol", grant=held["id"])
    # bob first (all three seats); dave and erin, behind, find none left
    assert [(d["sid"], d["count"]) for d in w.tick()] == [("bob", 3)]
    assert w.ledger.queued("cad") == 2 and w.ledger.in_use("cad") == 3


def test_a_waiter_behind_one_that_does_not_fit_takes_what_is_left() -> None:
    w = world("", ("2.0", 3))
    held = grant_of(w.checkout("carol", 2))
    grant_of(w.checkout("ann", 1))
    assert w.checkout("bob", 3, wait=30.0) is None
    assert w.checkout("dave", 1, wait=30.0) is None
    assert w.checkout("erin", 1, wait=30.0) is None
    w.send("checkin", "carol", grant=held["id"])  # 2 free: bob needs 3
    assert [(d["sid"], d["count"]) for d in w.tick()] == [("dave", 1), ("erin", 1)]
    assert w.ledger.queued("cad") == 1  # bob keeps its place, bounded by its wait


def test_a_group_member_judged_after_an_expiry_holds_back_no_one_behind_it() -> None:
    w = dup_world(line(count=2))
    grant_of(out(w, "base", dup="U"))  # ann's group holds 1
    grant_of(out(w, "user"))  # bob: the pool is full
    assert out(w, "host", 2, dup="U", wait=600) is None  # ann's group would need 1 more
    assert out(w, "display", wait=600) is None  # in no group, behind it
    lapse(w, "user")  # bob's seat frees as his session expires
    # The member is judged at the next tick, on the groups as applied; the one behind it
    # needs no group and takes the freed seat now.
    assert [(d["k"], d.get("sid")) for d in w.tick()] == [("expire", "user"), ("grant", "display")]
    assert w.ledger.queued("cad") == 1 and w.ledger.in_use("cad") == 2


def test_a_tick_asks_no_waiter_again_that_nothing_could_have_served() -> None:
    opts = parse_options("RESERVE 1 cad USER ann", path="site.opt")
    ledger = CountingLedger([ent("2.0", 3)], lease=LEASE, heartbeat=HEARTBEAT, options=opts)
    w = World([], ledger)
    for name in ("ann", "bob", "carol"):
        w.open(name, user=name, host=f"{name}-ws")
    held = grant_of(w.checkout("carol", 2))  # the free seat is ann's
    for _ in range(200):
        assert w.checkout("bob", 2, wait=60.0) is None
    ledger.asked.clear()  # the queue's own decisions: only the ticks' count
    w.tick()
    w.tick()
    assert ledger.asked == []  # nothing freed since each was found waiting
    w.send("checkin", "carol", grant=held["id"])
    assert [d["count"] for d in w.tick()] == [2]  # the first; then no pool has 2 free
    assert len(ledger.asked) == 1 and ledger.queued("cad") == 199
