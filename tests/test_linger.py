"""LINGER and holds in the ledger (docs/admin.md, "LINGER"): a seat let go stays in use
in a linger hold until its ``until``, the same user and host take it back, and the
primary's tick lets it lapse; all of it replicated and in snapshots."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from tests.test_ledger import World, denied, ent, grant_of
from zbroker.broker.ledger import Ledger, LedgerError
from zbroker.broker.model import Reason
from zbroker.broker.options import parse_options

pytestmark = pytest.mark.unit

LINGER = 60.0
LEASE = 1000.0  # longer than LINGER: sessions outlive their seats' holds


def world(options: str = f"LINGER cad {LINGER:g}", count: int = 2, lease: float = LEASE) -> World:
    opts = parse_options(options, path="site.opt")
    return World([], Ledger([ent(count=count)], lease=lease, heartbeat=lease / 3, options=opts))


def replica(w: World) -> Ledger:
    """A backup's ledger: every delta the primary decided, applied from a msgpack round trip."""
    backup = Ledger([], lease=w.ledger.lease, heartbeat=w.ledger.heartbeat)
    backup.apply(w.ledger.reload_delta(w.ledger.entitlements, w.ledger.options))
    for delta in w.log:
        backup.apply(msgpack.unpackb(msgpack.packb(delta), strict_map_key=True))
    return backup


def figures(ledger: Ledger) -> dict[str, Any]:
    (cad,) = ledger.status()
    return {"in_use": cad["in_use"], "lingering": cad["lingering"]}


def test_a_checkin_lingers_until_its_end_then_the_tick_lapses_it() -> None:
    w = world()
    w.open("s1")
    g = grant_of(w.checkout("s1"))
    assert w.send("checkin", "s1", grant=g["id"]) == {"status": "ok"}
    release = w.log[-1]
    assert release["k"] == "release" and release["linger"] == w.wall + LINGER
    assert figures(w.ledger) == {"in_use": 1, "lingering": 1}
    (hold,) = w.ledger.holds()
    assert (hold.sid, hold.hold, hold.user, hold.host) == (
        f"hold:{g['id']}",
        "linger",
        "ann",
        "ws1",
    )
    assert w.ledger.sessions() == ["s1"] and w.ledger.session_count == 1
    w.advance(LINGER - 1)
    assert w.tick() == []
    w.advance(1)
    (lapse,) = w.tick()
    assert lapse == {"k": "lapse", "grant": g["id"], "at": w.wall}
    assert figures(w.ledger) == {"in_use": 0, "lingering": 0} and w.ledger.holds() == []
    assert replica(w).snapshot() == w.ledger.snapshot()


def test_a_lingering_seat_is_in_use_for_everyone_else() -> None:
    w = world(count=1)
    w.open("s1", user="ann")
    w.open("s2", user="bob")
    g = grant_of(w.checkout("s1"))
    w.send("checkin", "s1", grant=g["id"])
    denied(w.checkout("s2"), Reason.NO_SEATS)
    w.open("s3", user="ann", host="ws2")  # the same user on another host: not the seat's
    denied(w.checkout("s3"), Reason.NO_SEATS)


def test_the_same_user_and_host_reclaim_the_lingering_seat() -> None:
    w = world(count=1)
    w.open("s1")
    g = grant_of(w.checkout("s1"))
    w.send("checkin", "s1", grant=g["id"])
    w.open("s2")  # another session (process) of ann on ws1
    again = grant_of(w.checkout("s2"))
    assert w.log[-1]["k"] == "grant" and w.log[-1]["reclaims"] == g["id"]
    assert figures(w.ledger) == {"in_use": 1, "lingering": 0} and w.ledger.holds() == []
    w.advance(LINGER + 1)
    assert w.tick() == []  # the hold is gone: nothing lapses
    assert w.ledger.session("s2").grants == {again["id"]}  # type: ignore[union-attr]
    assert replica(w).snapshot() == w.ledger.snapshot()


def test_a_reclaim_goes_ahead_of_the_queue() -> None:
    w = world(count=1)
    w.open("s1")
    w.open("s2", user="bob")
    g = grant_of(w.checkout("s1"))
    w.send("checkin", "s1", grant=g["id"])
    assert w.checkout("s2", wait=30.0) is None  # bob waits for the lingering seat
    grant_of(w.checkout("s1", wait=30.0))  # ann's own seat: she does not wait behind bob
    assert w.ledger.queued("cad") == 1


def test_close_and_expire_linger_every_grant_of_the_feature() -> None:
    w = world("LINGER cad 60", count=4, lease=10.0)
    w.open("s1")
    w.open("s2", user="bob")
    a = grant_of(w.checkout("s1"))
    b = grant_of(w.checkout("s1", count=2))
    c = grant_of(w.checkout("s2"))
    w.send("close", "s1")
    close = w.log[-1]
    assert close["linger"] == [[a["id"], w.wall + 60], [b["id"], w.wall + 60]]
    assert figures(w.ledger) == {"in_use": 4, "lingering": 3}
    w.advance(11)  # s2 stops heartbeating
    (expire,) = [d for d in w.tick() if d["k"] == "expire"]
    assert expire["sid"] == "s2" and expire["linger"] == [[c["id"], w.wall + 60]]
    assert figures(w.ledger) == {"in_use": 4, "lingering": 4}
    assert w.ledger.session_count == 0
    assert replica(w).snapshot() == w.ledger.snapshot()
    w.advance(49)
    assert sorted(d["grant"] for d in w.tick()) == [a["id"], b["id"]]
    w.advance(11)
    assert [d["grant"] for d in w.tick()] == [c["id"]]
    assert figures(w.ledger) == {"in_use": 0, "lingering": 0}


def test_an_expiring_session_s_lingering_seats_are_not_given_to_waiters() -> None:
    w = world(count=1)
    w.open("s1")
    w.open("s2", user="bob")
    grant_of(w.checkout("s1"))
    w.advance(LEASE / 2)
    assert w.checkout("s2", wait=LEASE * 3) is None
    w.advance(LEASE / 2 + 1)  # s1's lease ends, s2's does not
    assert [d["k"] for d in w.tick()] == ["expire"]
    w.advance(LINGER)
    w.send("heartbeat", "s2")
    assert [d["k"] for d in w.tick()] == ["lapse", "grant"]  # the seat, once it is back


def test_without_linger_nothing_lingers() -> None:
    w = world("LINGER other 60")
    w.open("s1")
    g = grant_of(w.checkout("s1"))
    w.send("checkin", "s1", grant=g["id"])
    assert "linger" not in w.log[-1] and figures(w.ledger) == {"in_use": 0, "lingering": 0}


def test_a_snapshot_keeps_holds_and_a_restored_primary_lapses_them() -> None:
    w = world()
    w.open("s1")
    g = grant_of(w.checkout("s1"))
    w.send("checkin", "s1", grant=g["id"])
    snap = msgpack.unpackb(msgpack.packb(w.ledger.snapshot()), strict_map_key=True)
    restored = Ledger.from_snapshot(snap, lease=LEASE, heartbeat=w.ledger.heartbeat)
    assert restored.snapshot() == w.ledger.snapshot()
    assert figures(restored) == {"in_use": 1, "lingering": 1} and restored.session_count == 1
    w.ledger = restored
    w.ledger.forget_volatile()
    w.advance(LINGER)
    assert [d["k"] for d in w.tick()] == ["lapse"]
    assert figures(w.ledger) == {"in_use": 0, "lingering": 0}


def test_holders_show_the_hold_and_its_end() -> None:
    w = world()
    w.open("s1")
    g = grant_of(w.checkout("s1"))
    w.send("checkin", "s1", grant=g["id"])
    (holder,), _ = w.ledger.holders("cad", 0, 10)
    assert holder["hold"] == "linger" and holder["until"] == w.wall + LINGER
    assert holder["user"] == "ann" and holder["grant"] == g["id"]


def test_no_client_speaks_for_a_hold() -> None:
    w = world()
    w.open("s1")
    g = grant_of(w.checkout("s1"))
    w.send("checkin", "s1", grant=g["id"])
    for op, kw in [("open", {}), ("heartbeat", {}), ("checkin", {"grant": g["id"]})]:
        reply = w.send(op, f"hold:{g['id']}", **kw)
        assert reply is not None and reply["code"] == "bad_request", reply
    assert figures(w.ledger)["lingering"] == 1


@pytest.mark.parametrize(
    "delta",
    [
        {"k": "lapse", "grant": 2, "at": 0.0},  # a client's grant, not a hold's
        {"k": "lapse", "grant": 99, "at": 0.0},
        {"k": "release", "sid": "s1", "req": 9, "ack": 0, "grant": 2, "linger": "x", "at": 0.0},
        {"k": "release", "sid": "s1", "req": 9, "ack": 0, "grant": 1, "at": 0.0},  # the hold's
        {"k": "close", "sid": "s1", "req": 9, "ack": 0, "linger": [[1, 100.0]], "at": 0.0},
        {"k": "close", "sid": "s1", "req": 9, "ack": 0, "linger": [[2, 1.0], [2, 1.0]], "at": 0.0},
        {"k": "close", "sid": "s1", "req": 9, "ack": 0, "linger": {2: 100.0}, "at": 0.0},
        {"k": "close", "sid": "hold:1", "req": 9, "ack": 0, "at": 0.0},  # a hold is no client's
        {"k": "expire", "sid": "hold:1", "at": 0.0},
        {"k": "idle", "sid": "hold:1", "req": 9, "ack": 0, "idle": True, "at": 0.0},
        {"k": "idle", "sid": "s1", "req": 9, "ack": 0, "idle": "yes", "at": 0.0},
        {
            "k": "grant",
            "sid": "s1",
            "req": 9,
            "ack": 0,
            "grant": 3,
            "feature": "cad",
            "version": "2.0",
            "count": 1,
            "at": 0.0,
            "reclaims": 2,  # a client's grant: no lingering seat
        },
    ],
)
def test_apply_refuses_hold_deltas_that_do_not_fit(delta: dict[str, Any]) -> None:
    w = world()
    w.open("s1")
    first = grant_of(w.checkout("s1"))
    grant_of(w.checkout("s1"))  # grant 2: the other seat, s1's
    w.send("checkin", "s1", grant=first["id"])  # grant 1 lingers
    assert [h.sid for h in w.ledger.holds()] == ["hold:1"]
    before = w.ledger.snapshot()
    with pytest.raises(LedgerError):
        w.ledger.apply(delta)
    assert w.ledger.snapshot() == before


def test_in_use_never_exceeds_the_count_through_linger_and_reclaim() -> None:
    w = world(count=2)
    for i, (user, host) in enumerate([("ann", "ws1"), ("ann", "ws1"), ("bob", "ws2")] * 3):
        sid = f"s{i}"
        w.open(sid, user=user, host=host)
        reply = w.checkout(sid)
        if reply["status"] == "ok":
            w.send("checkin", sid, grant=reply["grant"]["id"])
        assert w.ledger.in_use("cad") <= 2
        w.advance(LINGER / 4)
        w.tick()
    assert replica(w).snapshot() == w.ledger.snapshot()


def test_a_backup_that_never_ticks_keeps_its_deadline_indexes_bounded() -> None:
    w = world("LINGER cad 60\nTIMEOUT cad 100", count=2)
    w.open("s1")
    for _ in range(500):  # linger, reclaim, idle, busy: every hold and mark ends at once
        g = grant_of(w.checkout("s1"))
        w.send("idle", "s1", idle=True)
        w.send("idle", "s1", idle=False)
        w.send("checkin", "s1", grant=g["id"])
    backup = replica(w)
    assert len(backup._holds._due) <= 2 * len(backup.holds()) + 64
    assert len(backup._idle._due) <= 2 * len(backup._idle.idle) + 64
