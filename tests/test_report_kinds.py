"""The report log's records of the deltas issues 12 and 15 added: lingering seats,
seats the triad took, borrows, idle sessions; and what ``zbroker report`` makes of them.

Each history is applied to a real ``Ledger`` (its ``apply`` refuses a delta whose fields
are wrong), with the records derived before and settled after each delta, as a node does.
"""

from __future__ import annotations

from typing import Any

import pytest

from zbroker.broker.ledger import Ledger
from zbroker.broker.model import Entitlement, Now, Request
from zbroker.broker.report_stats import Report
from zbroker.broker.reportlog import Record, derive, settle
from zbroker.broker.seats import entitlement_to_map

pytestmark = pytest.mark.unit

T0 = 1_795_000_000.0
LINES = [Entitlement("cad", "2.0", 2, None), Entitlement("solver", "1.5", 1, None)]
RELOAD = {"k": "reload", "entitlements": [entitlement_to_map(e) for e in LINES], "at": T0}


def _run(deltas: list[dict[str, Any]]) -> list[Record]:
    led = Ledger((), lease=30.0, heartbeat=10.0)
    out: list[Record] = []
    for index, delta in enumerate([RELOAD, *deltas], 1):
        records = derive(index, 1, delta, led)
        led.apply(delta)
        settle(records, led)
        out += records
    return out


def _open(sid: str, user: str, at: float = T0) -> dict[str, Any]:
    return {"k": "open", "sid": sid, "req": 1, "ack": 0, "user": user, "host": f"{user}-pc",
            "display": ":0", "client_version": "1.0", "at": at}  # fmt: skip


def _grant(sid: str, req: int, gid: int, at: float, feature: str = "cad", **kw: Any) -> dict:
    version = "2.0" if feature == "cad" else "1.5"
    return {"k": "grant", "sid": sid, "req": req, "ack": 0, "grant": gid, "feature": feature,
            "version": version, "count": 1, "at": at, **kw}  # fmt: skip


def _events(records: list[Record]) -> list[tuple[Any, ...]]:
    return [(r["ev"], r.get("reason"), r.get("grant"), r.get("in_use")) for r in records]


def _report(records: list[Record]) -> Report:
    rep = Report()
    for r in records:
        rep.add(r)
    rep.finish()
    return rep


def test_a_checkin_that_lingers_keeps_the_seat_in_use_until_its_linger_record() -> None:
    records = _run([
        _open("s1", "ann"),
        _grant("s1", 2, 1, T0),
        {"k": "release", "sid": "s1", "req": 3, "ack": 0, "grant": 1, "at": T0 + 10,
         "linger": T0 + 100},
        {"k": "lapse", "grant": 1, "at": T0 + 100},
    ])  # fmt: skip
    assert _events(records)[1:] == [
        ("out", None, 1, 1), ("in", "checkin", 1, 1), ("linger", "lapsed", 1, 0)
    ]  # fmt: skip
    checkin, ended = records[2], records[3]
    assert checkin["linger"] == T0 + 100 and checkin["since"] == T0
    # the hold copies its user; its time is the hold's, from the checkin
    assert (ended["user"], ended["sid"], ended["since"], ended["at"]) == (
        "ann", "hold:1", T0 + 10, T0 + 100
    )  # fmt: skip
    f = _report(records).features["cad"]
    assert f.linger_ends == {"lapsed": 1} and f.checkins == {"checkin": 1}
    assert f.linger_seconds == pytest.approx(90.0)
    assert f.hours == {"ann": pytest.approx(100.0)}  # held 10 s, lingered 90 s: hers
    assert f.seat_seconds == pytest.approx(100.0) and f.in_use == 0


def test_a_reclaim_ends_the_linger_and_checks_out_in_one_entry() -> None:
    records = _run([
        _open("s1", "ann"),
        _grant("s1", 2, 1, T0),
        {"k": "release", "sid": "s1", "req": 3, "ack": 0, "grant": 1, "at": T0 + 10,
         "linger": T0 + 100},
        _grant("s1", 4, 2, T0 + 30, reclaims=1),
    ])  # fmt: skip
    assert _events(records)[3:] == [("linger", "reclaimed", 1, 1), ("out", None, 2, 1)]
    assert records[3]["ix"] == records[4]["ix"] and [records[3]["n"], records[4]["n"]] == [0, 1]
    f = _report(records).features["cad"]
    assert f.linger_ends == {"reclaimed": 1} and f.linger_seconds == pytest.approx(20.0)
    assert f.peak == 1  # one seat throughout


def test_a_session_end_lingers_the_grants_its_delta_names() -> None:
    for kind, reason in (("close", "closed"), ("expire", "expired")):
        end: dict[str, Any] = {"k": kind, "sid": "s1", "at": T0 + 5, "linger": [[1, T0 + 60]]}
        if kind == "close":
            end |= {"req": 4, "ack": 0}
        records = _run([
            _open("s1", "ann"),
            _grant("s1", 2, 1, T0),
            _grant("s1", 3, 2, T0, feature="solver"),
            end,
        ])  # fmt: skip
        ins = [r for r in records if r["ev"] == "in"]
        assert [(r["grant"], r["reason"], r.get("linger"), r["in_use"]) for r in ins] == [
            (1, reason, T0 + 60, 1), (2, reason, None, 0)
        ]  # fmt: skip


def test_a_seat_the_triad_takes_is_an_in_with_its_reason() -> None:
    records = _run([
        _open("s1", "ann"),
        _grant("s1", 2, 1, T0),
        _grant("s1", 3, 2, T0 + 1),
        {"k": "take", "grant": 1, "reason": "timeout", "at": T0 + 900},
        {"k": "take", "grant": 2, "reason": "removed", "at": T0 + 901},
    ])  # fmt: skip
    assert _events(records)[-2:] == [("in", "timeout", 1, 1), ("in", "removed", 2, 0)]
    assert records[-1]["user"] == "ann" and records[-1]["since"] == T0 + 1
    f = _report(records).features["cad"]
    assert f.checkins == {"timeout": 1, "removed": 1} and f.timeouts == 1


def _token(gid: int, start: float, end: float) -> dict[str, Any]:
    """A borrow's token: its grant's facts (apply checks them), signature not checked."""
    facts = {"feature": "cad", "version": "2.0", "count": 1, "user": "ann", "host": "ann-pc"}
    return {"v": 1, **facts, "start": start, "end": end, "grant": gid, "sig": "unchecked"}


def test_a_borrow_is_in_use_from_its_borrow_record_to_its_return() -> None:
    records = _run([
        _open("s1", "ann"),
        _grant("s1", 2, 1, T0, borrow=T0 + 3600, token=_token(1, T0, T0 + 3600)),
        {"k": "return", "sid": "s1", "req": 3, "ack": 0, "grant": 1, "at": T0 + 600},
        _grant("s1", 4, 2, T0 + 700, borrow=T0 + 800, token=_token(2, T0 + 700, T0 + 800)),
        {"k": "lapse", "grant": 2, "at": T0 + 800},
    ])  # fmt: skip
    assert _events(records)[1:] == [
        ("borrow", None, 1, 1), ("return", "returned", 1, 0),
        ("borrow", None, 2, 1), ("return", "lapsed", 2, 0),
    ]  # fmt: skip
    assert records[1]["until"] == T0 + 3600 and "token" not in records[1]
    assert records[2]["user"] == "ann" and records[2]["since"] == T0
    f = _report(records).features["cad"]
    assert f.borrows == 2 and f.checkouts == 0 and f.returns == {"returned": 1, "lapsed": 1}
    assert f.hours == {"ann": pytest.approx(700.0)}


def test_a_denied_borrow_or_return_is_recorded_under_its_own_op() -> None:
    """The ledger's denial of a borrow or a return names its op in the answer delta (a
    checkout's does not: its delta stays as small as it was); the deny record says it."""
    led = Ledger(LINES, lease=30.0, heartbeat=10.0)  # no BORROW line: nothing lends
    deltas: list[dict[str, Any]] = []
    records: list[Record] = []
    for request in [
        Request("open", sid="s1", req=1, user="ann", host="ann-pc"),
        Request("borrow", sid="s1", req=2, feature="cad"),
        Request("return", sid="s1", req=3, feature="cad"),
        Request("checkout", sid="s1", req=4, feature="cad", count=3),
        Request("checkin", sid="s1", req=5, grant=9),
    ]:
        for delta, _ in led.handle(request, Now(1.0, T0)).decided:
            got = derive(len(deltas) + 1, 1, delta, led)
            led.apply(delta)
            settle(got, led)
            deltas.append(delta)
            records += got
    assert [d.get("op") for d in deltas[1:]] == ["borrow", "return", None, None]
    denied = [(r["op"], r["reason"], r.get("feature")) for r in records if r["ev"] == "deny"]
    assert denied == [
        ("borrow", "not_borrowable", "cad"),
        ("return", "not_borrowed", "cad"),
        ("checkout", "no_seats", "cad"),
        ("checkin", "not_held", None),
    ]


def test_seats_held_while_idle_are_counted_by_feature_and_user() -> None:
    def idle(req: int, flag: bool, at: float) -> dict[str, Any]:
        return {"k": "idle", "sid": "s1", "req": req, "ack": 0, "idle": flag, "at": at}

    records = _run([
        _open("s1", "ann"),
        _open("s2", "bob"),
        _grant("s1", 2, 1, T0),
        _grant("s2", 2, 2, T0),
        idle(3, True, T0 + 10),
        idle(4, False, T0 + 40),  # 30 s idle holding grant 1
        idle(5, True, T0 + 50),
        {"k": "release", "sid": "s1", "req": 6, "ack": 0, "grant": 1, "at": T0 + 70},  # 20 s
        _grant("s1", 7, 3, T0 + 80, feature="solver"),  # taken while still idle: 20 s more
        {"k": "close", "sid": "s1", "req": 8, "ack": 0, "at": T0 + 100},
    ])  # fmt: skip
    marks = [(r["ev"], r["user"], r["at"]) for r in records if r["ev"] in ("idle", "busy")]
    assert marks == [("idle", "ann", T0 + 10), ("busy", "ann", T0 + 40), ("idle", "ann", T0 + 50)]
    rep = _report(records)
    assert rep.features["cad"].idle == {"ann": pytest.approx(50.0)}  # bob never idle
    assert rep.features["solver"].idle == {"ann": pytest.approx(20.0)}


def test_a_grant_sharing_a_seat_says_the_seats_in_use_as_the_ledger_counts_them() -> None:
    """``in_use`` is read from the ledger after the entry: what a duplicate group, a
    linger or a reclaim does to the count is the ledger's, never worked out apart."""
    records = _run([
        _open("s1", "ann"),
        _open("s2", "ann"),
        _grant("s1", 2, 1, T0, dup="ann|ann-pc"),
        _grant("s2", 2, 2, T0, dup="ann|ann-pc"),  # shares grant 1's seat
        {"k": "release", "sid": "s1", "req": 3, "ack": 0, "grant": 1, "at": T0 + 10},
        {"k": "release", "sid": "s2", "req": 3, "ack": 0, "grant": 2, "at": T0 + 20},
    ])  # fmt: skip
    assert _events(records)[1:] == [
        ("out", None, 1, 1), ("out", None, 2, 1), ("in", "checkin", 1, 1), ("in", "checkin", 2, 0)
    ]  # fmt: skip
    assert records[2]["dup"] == "ann|ann-pc"
    assert _report(records).features["cad"].peak == 1
