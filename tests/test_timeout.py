"""TIMEOUT and TIMEOUTALL in the ledger (docs/admin.md, "TIMEOUT"): a grant whose session
the application marked idle longer than its feature's timeout is taken (``take``, reason
``timeout``) by the primary's tick; the floor ``min_timeout`` raises shorter lines."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from tests.test_ledger import World, ent, grant_of
from zbroker.broker.ledger import Ledger
from zbroker.broker.options import parse_options

pytestmark = pytest.mark.unit

LEASE = 10_000.0  # sessions heartbeat-free for the whole test: only idleness matters here


def world(options: str | None, min_timeout: float = 0.0, count: int = 4) -> World:
    opts = None if options is None else parse_options(options, path="site.opt")
    ledger = Ledger(
        [ent(count=count), ent(feature="solver", count=count)],
        lease=LEASE,
        heartbeat=LEASE / 3,
        options=opts,
        min_timeout=min_timeout,
    )
    return World([], ledger)


def idle(w: World, sid: str, flag: bool = True) -> Any:
    return w.send("idle", sid, idle=flag)


def takes(deltas: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(d["grant"], d["reason"]) for d in deltas if d["k"] == "take"]


def test_an_idle_session_loses_its_grant_once_idle_longer_than_the_timeout() -> None:
    w = world("TIMEOUT cad 100")
    w.open("s1")
    g = grant_of(w.checkout("s1"))
    assert idle(w, "s1") == {"status": "ok"}
    assert w.log[-1] == {"k": "idle", "sid": "s1", "req": 3, "ack": 0, "idle": True, "at": w.wall}
    w.advance(99)
    assert w.tick() == []
    w.advance(1)
    ticked = w.tick()
    assert takes(ticked) == [(g["id"], "timeout")] and ticked[0]["at"] == w.wall
    assert w.ledger.in_use("cad") == 0
    session = w.ledger.session("s1")
    assert session is not None and session.taken == {g["id"]: "timeout"}
    beat = w.send("heartbeat", "s1")
    assert beat is not None and beat["taken"] == [{"grant": g["id"], "reason": "timeout"}]
    w.advance(1000)
    assert w.tick() == []  # taken once


def test_busy_again_stops_the_clock_and_idle_starts_it_afresh() -> None:
    w = world("TIMEOUT cad 100")
    w.open("s1")
    grant_of(w.checkout("s1"))
    idle(w, "s1")
    w.advance(90)
    idle(w, "s1", False)
    w.advance(50)
    assert w.tick() == []
    idle(w, "s1")
    w.advance(99)
    assert w.tick() == []
    w.advance(1)
    assert len(takes(w.tick())) == 1


def test_idle_again_while_idle_keeps_the_first_mark() -> None:
    w = world("TIMEOUT cad 100")
    w.open("s1")
    grant_of(w.checkout("s1"))
    idle(w, "s1")
    w.advance(60)
    idle(w, "s1")
    w.advance(40)
    assert len(takes(w.tick())) == 1


def test_heartbeats_are_not_activity() -> None:
    w = world("TIMEOUT cad 100")
    w.open("s1")
    grant_of(w.checkout("s1"))
    idle(w, "s1")
    for _ in range(10):
        w.advance(10)
        w.send("heartbeat", "s1")
    assert len(takes(w.tick())) == 1


def test_without_a_timeout_line_nothing_times_out() -> None:
    for options in (None, "LINGER cad 5", "TIMEOUT solver 100"):
        w = world(options)
        w.open("s1")
        grant_of(w.checkout("s1"))
        idle(w, "s1")
        w.advance(100_000)
        assert takes(w.tick()) == [], options


def test_a_session_never_marked_idle_keeps_its_grants() -> None:
    w = world("TIMEOUTALL 100")
    w.open("s1")
    grant_of(w.checkout("s1"))
    w.advance(100_000)
    w.send("heartbeat", "s1")
    assert takes(w.tick()) == []


def test_each_feature_times_out_on_its_own_line_timeoutall_for_the_rest() -> None:
    w = world("TIMEOUT cad 300\nTIMEOUTALL 100")
    w.open("s1")
    cad = grant_of(w.checkout("s1"))
    solver = grant_of(w.checkout("s1", feature="solver"))
    idle(w, "s1")
    w.advance(100)
    assert takes(w.tick()) == [(solver["id"], "timeout")]
    w.advance(199)
    assert takes(w.tick()) == []
    w.advance(1)
    assert takes(w.tick()) == [(cad["id"], "timeout")]


@pytest.mark.parametrize(
    ("floor", "line", "after"), [(900, 100, 900), (900, 1200, 1200), (0, 5, 5)]
)
def test_min_timeout_raises_shorter_lines(floor: float, line: int, after: float) -> None:
    w = world(f"TIMEOUT cad {line}", min_timeout=floor)
    w.open("s1")
    grant_of(w.checkout("s1"))
    idle(w, "s1")
    w.advance(after - 1)
    assert takes(w.tick()) == []
    w.advance(1)
    assert len(takes(w.tick())) == 1


def test_a_taken_seat_goes_to_a_waiter_in_the_same_tick_and_never_lingers() -> None:
    w = world("TIMEOUT cad 100\nLINGER cad 500", count=1)
    w.open("s1")
    w.open("s2", user="bob")
    grant_of(w.checkout("s1"))
    idle(w, "s1")
    assert w.checkout("s2", wait=1000.0) is None
    w.advance(100)
    assert [d["k"] for d in w.tick()] == ["take", "grant"]
    assert w.ledger.status()[0]["lingering"] == 0


def test_a_grant_checked_out_while_idle_is_watched_too() -> None:
    w = world("TIMEOUT cad 100\nTIMEOUT solver 1000")
    w.open("s1")
    grant_of(w.checkout("s1", feature="solver"))
    idle(w, "s1")
    w.advance(150)
    assert takes(w.tick()) == []  # solver's 1000 s are not up
    cad = grant_of(w.checkout("s1"))  # idle since 150 s ago: cad's 100 s are up
    assert takes(w.tick()) == [(cad["id"], "timeout")]


def test_a_reread_that_adds_a_timeout_applies_to_sessions_already_idle() -> None:
    w = world(None)
    w.open("s1")
    grant_of(w.checkout("s1"))
    idle(w, "s1")
    w.advance(500)
    assert w.tick() == []
    opts = parse_options("TIMEOUT cad 100", path="site.opt")
    reload = w.ledger.reload_delta(w.ledger.entitlements, opts)
    w.ledger.apply(reload)
    w.log.append(reload)
    assert len(takes(w.tick())) == 1


def test_idleness_survives_a_snapshot_and_a_failover() -> None:
    w = world("TIMEOUT cad 100")
    w.open("s1")
    g = grant_of(w.checkout("s1"))
    idle(w, "s1")
    w.advance(50)
    snap = msgpack.unpackb(msgpack.packb(w.ledger.snapshot()), strict_map_key=True)
    restored = Ledger.from_snapshot(snap, lease=LEASE, heartbeat=LEASE / 3, min_timeout=0.0)
    assert restored.snapshot() == w.ledger.snapshot()
    session = restored.session("s1")
    assert session is not None and session.idle_since == w.wall - 50
    w.ledger = restored
    w.ledger.forget_volatile()  # a new primary
    w.advance(49)
    assert takes(w.tick()) == []
    w.advance(1)
    assert takes(w.tick()) == [(g["id"], "timeout")]


def test_a_backup_applies_the_same_state() -> None:
    w = world("TIMEOUT cad 100\nLINGER solver 50")
    w.open("s1")
    w.open("s2", user="bob")
    grant_of(w.checkout("s1"))
    s = grant_of(w.checkout("s2", feature="solver"))
    idle(w, "s1")
    w.send("checkin", "s2", grant=s["id"])
    w.advance(100)
    w.tick()
    backup = Ledger([], lease=LEASE, heartbeat=LEASE / 3, min_timeout=12345.0)
    backup.apply(w.ledger.reload_delta(w.ledger.entitlements, w.ledger.options))
    for delta in w.log:
        backup.apply(msgpack.unpackb(msgpack.packb(delta), strict_map_key=True))
    assert backup.snapshot() == w.ledger.snapshot()


def test_the_tick_reads_only_what_is_due() -> None:
    # 2,000 idle sessions whose timeouts are far off: a tick looks at none of them.
    w = world("TIMEOUT cad 1000", count=5000)
    for i in range(2000):
        w.open(f"s{i}")
        grant_of(w.checkout(f"s{i}"))
        idle(w, f"s{i}")
    calls = 0
    policy = w.ledger._policy
    assert policy is not None
    real = policy.timeout

    def counted(*args: Any) -> float | None:
        nonlocal calls
        calls += 1
        return real(*args)

    policy.timeout = counted  # type: ignore[method-assign,assignment]
    for _ in range(100):
        w.advance(1)
        w.tick()
    assert calls == 0
    w.advance(900)
    assert len(takes(w.tick())) == 2000 and calls == 2000
