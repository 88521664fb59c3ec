"""Expiry (issue 12 item 4): an expired line grants nothing new, what it granted runs
until checked in, status shows each line's days to expiry, and the node warns at 30, 14
and 7 days, once per threshold per line per start."""

from __future__ import annotations

import datetime
import logging

import pytest

from tests.test_core import NAMES, Net, config, request
from zbroker.broker.core import NodeCore
from zbroker.broker.expiry import ExpiryWarnings, days_left, due
from zbroker.broker.ledger import Ledger
from zbroker.broker.model import Entitlement, Now, Request
from zbroker.broker.storage import Loaded

pytestmark = pytest.mark.unit

DAY = datetime.date(2027, 6, 1)


def at(day: datetime.date, mono: float = 1.0) -> Now:
    midday = datetime.datetime(day.year, day.month, day.day, 12, tzinfo=datetime.UTC)
    return Now(mono, midday.timestamp())


def line(expires: datetime.date | None, count: int = 10, source: str = "site.lic:3") -> Entitlement:
    return Entitlement("cad", "2.0", count, expires, source=source)


@pytest.mark.parametrize(
    ("left", "warned"),
    [(45, None), (31, None), (30, 30), (20, 30), (14, 14), (8, 14), (7, 7), (1, 7), (0, 7)],
)
def test_the_smallest_threshold_reached_is_due(left: int, warned: int | None) -> None:
    found = due([line(DAY + datetime.timedelta(days=left))], DAY, set())
    assert [key[-1] for key, _ in found] == ([] if warned is None else [warned])


def test_a_permanent_line_never_warns_and_an_expired_one_says_so_once() -> None:
    assert due([line(None)], DAY, set()) == []
    (_, message), = due([line(DAY - datetime.timedelta(days=1))], DAY, set())  # fmt: skip
    assert message.startswith("license line cad 2.0 (10 seats, site.lic:3) expired on 2027-05-31")
    assert "the seats already out run until checked in" in message


def test_each_threshold_warns_once_per_line_as_the_days_go_by() -> None:
    expires = DAY + datetime.timedelta(days=40)
    lines = (line(expires), line(expires, 5, "site.lic:4"))
    warnings = ExpiryWarnings()
    logged = []
    for days in range(60):
        day = DAY + datetime.timedelta(days=days)
        logged += [(days, m) for m in warnings.check(lines, day)]
        logged += [(days, m) for m in warnings.check(lines, day)]  # asked twice a day
    assert [d for d, _ in logged] == [10, 10, 26, 26, 33, 33, 41, 41]
    assert "expires in 30 days (2027-07-11)" in logged[0][1]
    assert "expires in 7 days" in logged[4][1]


def test_a_node_started_late_warns_only_the_threshold_it_is_in() -> None:
    warnings = ExpiryWarnings()
    lines = (line(DAY + datetime.timedelta(days=40)),)
    day = DAY + datetime.timedelta(days=35)  # 5 days before the expiry
    (message,) = warnings.check(lines, day)
    assert "expires in 5 days" in message
    assert warnings.check(lines, day + datetime.timedelta(days=1)) == []


def test_days_left_counts_the_last_day_as_zero() -> None:
    assert days_left(line(DAY), DAY) == 0
    assert days_left(line(DAY), DAY + datetime.timedelta(days=1)) == -1
    assert days_left(line(None), DAY) is None


def test_an_expired_line_grants_nothing_new_and_its_grants_run_on() -> None:
    last = DAY
    ledger = Ledger([line(last, 2), line(None, 1, "site.lic:4")], lease=30.0, heartbeat=10.0)
    before = at(last)
    opened = ledger.handle(Request("open", "s1", 1, user="ann", host="ws1"), before)
    for delta, _ in opened.decided:
        ledger.apply(delta)
    for req in (2, 3):
        got = ledger.handle(Request("checkout", "s1", req, feature="cad", count=1), before)
        for delta, _ in got.decided:
            ledger.apply(delta)
    assert ledger.in_use("cad") == 2
    after = at(last + datetime.timedelta(days=1), mono=2.0)
    # 2 held, 1 seat live: nothing more, and the two grants stay
    denied = ledger.handle(Request("checkout", "s1", 4, feature="cad"), after)
    ((delta, reply),) = denied.decided
    assert reply is not None and reply["reason"] == "no_seats"
    ledger.apply(delta)
    assert ledger.in_use("cad") == 2
    (cad,) = ledger.status(after)
    assert cad["total"] == 1
    assert [(ln["source"], ln["days"]) for ln in cad["versions"][0]["lines"]] == [
        ("site.lic:3", -1),
        ("site.lic:4", None),
    ]


def test_the_node_logs_the_warnings_of_the_triads_lines(caplog: pytest.LogCaptureFixture) -> None:
    soon = (Entitlement("cad", "2.0", 2, datetime.date(2026, 6, 10), source="x.lic:2"),)
    now = Now(100.0, 1_780_000_000.0)  # 2026-05-28 UTC: 13 days before
    cores = {n: NodeCore(config(), n, soon, Loaded(fresh=False), now, mode="plain") for n in NAMES}
    net = Net(cores)
    with caplog.at_level(logging.WARNING, logger="zbroker.node"):
        net.serving()
        net.run(1.0)
        net.cycle(net.serving(), request(b"c", op="status", req=1))
    warned = [r.getMessage() for r in caplog.records if "expires in" in r.getMessage()]
    assert len(warned) == 3  # once on each node
    assert all("cad 2.0 (2 seats, x.lic:2) expires in 13 days (2026-06-10)" in w for w in warned)
