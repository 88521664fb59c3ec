"""The options file in the ledger: its decisions on the checkout path, its replication in
the reload delta and the snapshot, and its denials (broker/ledger.py, broker/policy.py)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from tests.test_ledger import HEARTBEAT, LEASE, World, denied, ent, grant_of
from zbroker.broker.ledger import Ledger, LedgerError
from zbroker.broker.model import Reason
from zbroker.broker.options import parse_options

pytestmark = pytest.mark.unit


def world(options: str, count: int = 4) -> World:
    opts = parse_options(options, path="site.opt")
    return World([], Ledger([ent(count=count)], lease=LEASE, heartbeat=HEARTBEAT, options=opts))


def test_an_excluded_user_is_denied_with_the_line() -> None:
    w = world("EXCLUDE cad USER hank")
    w.open("s1", user="hank")
    detail = denied(w.checkout("s1"), Reason.EXCLUDED)
    assert detail == "user 'hank' may not use cad: EXCLUDE cad USER hank (site.opt:1)"
    w.open("s2", user="ann")
    grant_of(w.checkout("s2"))


def test_an_exclusion_is_not_queued_even_with_wait() -> None:
    w = world("INCLUDE cad USER bob")
    w.open("s1", user="ann")
    denied(w.checkout("s1", wait=5.0), Reason.NOT_INCLUDED)
    assert w.ledger.queued("cad") == 0


def test_reserved_seats_wait_and_are_served_when_free() -> None:
    w = world("RESERVE 2 cad USER mel")
    w.open("s1", user="ann")
    w.open("s2", user="mel")
    first = grant_of(w.checkout("s1", count=2))
    denied(w.checkout("s1"), Reason.RESERVED)
    assert w.checkout("s1", wait=5.0) is None  # reserved: it may free, so it waits
    assert w.ledger.queued("cad") == 1
    grant_of(w.checkout("s2", count=2))  # mel's own seats are there for mel
    w.send("checkin", "s1", grant=first["id"])
    ticked = w.tick()
    assert [d["k"] for d in ticked] == ["grant"]


def test_a_waiter_every_seat_is_reserved_against_hears_reserved_at_once() -> None:
    # All 4 seats are mel's: no release can ever serve ann, so she is not queued.
    w = world("RESERVE 4 cad USER mel")
    w.open("s1", user="ann")
    denied(w.checkout("s1", wait=1.0), Reason.RESERVED)
    assert w.ledger.queued("cad") == 0


def test_a_full_pool_is_no_seats_before_max() -> None:
    # One seat frees: the first waiter takes it, the second waits for seats (no_seats is
    # the license's, and it comes first), whatever its MAX says.
    w = world("MAX 1 cad USER ann", count=1)
    w.open("s0", user="bob")
    w.open("s1", user="ann")
    w.open("s2", user="ann")
    held = grant_of(w.checkout("s0"))
    assert w.checkout("s1", wait=5.0) is None
    assert w.checkout("s2", wait=5.0) is None
    w.send("checkin", "s0", grant=held["id"])
    assert [d["k"] for d in w.tick()] == ["grant"]
    assert w.ledger.queued("cad") == 1


def test_max_counts_a_tick_s_own_grants() -> None:
    w = world("MAX 1 cad USER ann", count=4)
    w.open("s0", user="bob")
    w.open("s1", user="ann")
    w.open("s2", user="ann")
    held = grant_of(w.checkout("s0", count=4))
    assert w.checkout("s1", wait=5.0) is None
    assert w.checkout("s2", wait=5.0) is None
    w.send("checkin", "s0", grant=held["id"])
    ticked = w.tick()
    assert [d["k"] for d in ticked] == ["grant", "answer"]  # not two grants to ann
    assert ticked[1]["reply"]["reason"] == Reason.MAX_REACHED


def test_the_reload_delta_carries_the_options_to_a_backup() -> None:
    w = world("EXCLUDE cad USER hank")
    backup = Ledger([], lease=LEASE, heartbeat=HEARTBEAT)
    opts = parse_options("EXCLUDE cad USER hank\nNOLOG QUEUED", path="site.opt")
    delta = w.ledger.reload_delta([ent()], opts)
    backup.apply(msgpack.unpackb(msgpack.packb(delta, use_bin_type=True), raw=False))
    assert backup.options == opts
    assert backup.entitlements == (ent(),)
    # and it decides as the primary did
    b = World([], backup)
    b.open("s1", user="hank")
    denied(b.checkout("s1"), Reason.EXCLUDED)


def test_a_reload_without_options_drops_them() -> None:
    w = world("EXCLUDE cad USER hank")
    w.ledger.apply(w.ledger.reload_delta([ent()]))
    assert w.ledger.options is None
    w.open("s1", user="hank")
    grant_of(w.checkout("s1"))


def test_the_snapshot_keeps_the_options() -> None:
    w = world("RESERVE 3 cad USER mel")
    w.open("s1", user="ann")
    grant_of(w.checkout("s1"))
    snap: dict[str, Any] = msgpack.unpackb(
        msgpack.packb(w.ledger.snapshot(), use_bin_type=True), raw=False
    )
    after = Ledger.from_snapshot(snap, lease=LEASE, heartbeat=HEARTBEAT)
    assert after.options == w.ledger.options
    a = World([], after)  # the next primary enforces the same RESERVE
    denied(a.send("checkout", "s1", req=9, feature="cad"), Reason.RESERVED)


def test_a_snapshot_from_before_options_loads_without_them() -> None:
    w = World([ent()])
    snap = w.ledger.snapshot()
    snap.pop("options", None)
    assert Ledger.from_snapshot(snap, lease=LEASE, heartbeat=HEARTBEAT).options is None


def test_a_bad_options_map_in_a_reload_changes_nothing() -> None:
    w = world("EXCLUDE cad USER hank")
    before = w.ledger.snapshot()
    with pytest.raises(LedgerError, match="reload delta: options"):
        w.ledger.apply({"k": "reload", "entitlements": [], "options": {"path": 3}})
    assert w.ledger.snapshot() == before


def test_internet_and_project_lines_match_what_the_session_opened_with() -> None:
    w = world("INCLUDE cad INTERNET 10.1.*.*\nEXCLUDE cad PROJECT apollo")
    opens = {"s1": ("10.1.2.3", ""), "s2": ("192.168.0.1", ""), "s3": ("10.1.9.9", "apollo")}
    for sid, (address, project) in opens.items():
        w.send("open", sid, user="ann", host="ws1", display=":0", client_version="1",
               address=address, project=project)  # fmt: skip
    grant_of(w.checkout("s1"))
    denied(w.checkout("s2"), Reason.NOT_INCLUDED)
    denied(w.checkout("s3"), Reason.EXCLUDED)
