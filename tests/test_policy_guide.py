"""FlexNet's own examples of the keywords whose decision is not an admission: TIMEOUT,
TIMEOUTALL, LINGER, DUP_GROUP, BORROW_LOWWATER, MAX_BORROW_HOURS, INCLUDE_BORROW /
EXCLUDE_BORROW and lmremove, each a table of the guide's lines and what zbroker decides.

``tests/test_policy.py`` holds the guide's admission examples (INCLUDE, EXCLUDE, GROUP,
HOST_GROUP, RESERVE, MAX, ...); this file the rest. Sources: FlexNet Publisher License
Administration Guide (docs.revenera.com/fnp/<release>/LicAdmin_Guide: the TIMEOUT,
TIMEOUTALL, LINGER, BORROW_LOWWATER, MAX_BORROW_HOURS, EXCLUDE_BORROW and "lmremove (in
License File-Based Licensing)" pages) and the FLEXnet Licensing End User Guide (chapter 5
"The Options File"; appendix B, DUP_GROUP).
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass

import pytest

from tests.test_ledger import HEARTBEAT, LEASE, World, denied, ent, grant_of
from zbroker.broker import borrow
from zbroker.broker.borrow import BorrowReason, Lent
from zbroker.broker.ledger import Ledger
from zbroker.broker.model import Entitlement, Reason
from zbroker.broker.options import parse_options
from zbroker.broker.policy import DEFAULT_MIN_TIMEOUT, Policy, Principal
from zbroker.broker.removal import Removal, decide_removal
from zbroker.broker.seats import Catalog, Denial

pytestmark = pytest.mark.unit

HOUR = 3600.0


def world(options: str, *lines: Entitlement) -> World:
    ledger = Ledger(
        list(lines) or [ent(feature="f1", count=1), ent(feature="f2", count=1)],
        lease=10 * 86_400.0,  # sessions outlive every idle time here: only idleness counts
        heartbeat=HEARTBEAT,
        options=parse_options(options, path="site.opt"),
        min_timeout=DEFAULT_MIN_TIMEOUT,  # FlexNet's usual vendor floor, 900 s
    )
    return World([], ledger)


# --------------------------------------------------------------------------- TIMEOUT


@dataclass(frozen=True)
class Idle:
    page: str
    options: str
    feature: str
    idle_for: float  # seconds the session has been idle at the tick
    taken: bool


IDLE = [
    # TIMEOUT page: "the following option syntax sets the timeout for feature f1 to one
    # hour (3600 seconds): TIMEOUT f1 3600"
    Idle("TIMEOUT", "TIMEOUT f1 3600", "f1", 3599, taken=False),
    Idle("TIMEOUT", "TIMEOUT f1 3600", "f1", 3600, taken=True),
    Idle("TIMEOUT", "TIMEOUT f1 3600", "f2", 86_400, taken=False),  # another feature
    # "A TIMEOUT line must be present in the options file": without one, nothing goes
    Idle("TIMEOUT", "", "f1", 86_400, taken=False),
    # "If you specify a value for seconds that is smaller than the minimum ..., the
    # minimum is used"
    Idle("TIMEOUT, minimum", "TIMEOUT f1 60", "f1", 60, taken=False),
    Idle("TIMEOUT, minimum", "TIMEOUT f1 60", "f1", DEFAULT_MIN_TIMEOUT, taken=True),
    # TIMEOUTALL page: "Same as TIMEOUT, but applies to all features"
    Idle("TIMEOUTALL", "TIMEOUTALL 3600", "f2", 3599, taken=False),
    Idle("TIMEOUTALL", "TIMEOUTALL 3600", "f2", 3600, taken=True),
    # zbroker's reading of both (docs/admin.md): a feature's own TIMEOUT wins
    Idle("TIMEOUT beside TIMEOUTALL", "TIMEOUTALL 3600\nTIMEOUT f1 7200", "f1", 3600, taken=False),
    Idle("TIMEOUT beside TIMEOUTALL", "TIMEOUTALL 3600\nTIMEOUT f1 7200", "f1", 7200, taken=True),
]


@pytest.mark.parametrize("case", IDLE, ids=lambda c: f"{c.options!r}:{c.feature}@{c.idle_for:g}")
def test_an_idle_license_is_taken_after_its_timeout_as_the_guide_says(case: Idle) -> None:
    w = world(case.options)
    w.open("s1")
    g = grant_of(w.checkout("s1", feature=case.feature))
    assert w.send("idle", "s1", idle=True) == {"status": "ok"}
    w.advance(case.idle_for)
    taken = [d for d in w.tick() if d["k"] == "take"]
    assert [(d["grant"], d["reason"]) for d in taken] == ([(g["id"], "timeout")] * case.taken)
    assert w.ledger.in_use(case.feature) == (0 if case.taken else 1)


def test_a_busy_license_is_never_taken() -> None:
    # "an active FlexEnabled application sends heartbeats": here the application says
    # whether it is idle, and one that never says so keeps its seat
    w = world("TIMEOUT f1 3600")
    w.open("s1")
    grant_of(w.checkout("s1", feature="f1"))
    w.advance(10 * 3600)
    w.send("heartbeat", "s1")
    assert [d for d in w.tick() if d["k"] == "take"] == []


# --------------------------------------------------------------------------- LINGER


@dataclass(frozen=True)
class Linger:
    who: tuple[str, str]  # (user, host) asking for f1 after ann's checkin on ws1
    after: float  # seconds after the checkin
    reason: str | None  # None: granted


LINGERS = [
    # LINGER page: "To set the linger value for feature f1 to one hour (3600 seconds):
    # LINGER f1 3600"; "A lingering license stays checked out for a specified period of
    # time beyond its checkin"
    Linger(("bob", "ws2"), 1, Reason.NO_SEATS),
    Linger(("bob", "ws2"), 3599, Reason.NO_SEATS),
    Linger(("bob", "ws2"), 3600, None),  # its end: the tick lets it go
    # zbroker's addition (docs/admin.md, LINGER): its user on the same host takes it back
    Linger(("ann", "ws1"), 1, None),
    Linger(("ann", "ws2"), 1, Reason.NO_SEATS),
]


@pytest.mark.parametrize("case", LINGERS, ids=lambda c: f"{c.who[0]}@{c.who[1]}+{c.after:g}")
def test_a_lingering_license_stays_checked_out_as_the_guide_says(case: Linger) -> None:
    w = world("LINGER f1 3600")
    w.open("ann1", user="ann", host="ws1")
    g = grant_of(w.checkout("ann1", feature="f1"))
    assert w.send("checkin", "ann1", grant=g["id"]) == {"status": "ok"}
    assert w.ledger.in_use("f1") == 1
    w.advance(case.after)
    w.tick()
    user, host = case.who
    w.open("asks", user=user, host=host)
    reply = w.checkout("asks", feature="f1")
    if case.reason is None:
        grant_of(reply)
    else:
        denied(reply, case.reason)
    assert w.ledger.in_use("f1") == 1  # one seat either way: never a second


# --------------------------------------------------------------------------- DUP_GROUP


@pytest.mark.parametrize(
    ("second", "reason", "in_use"),
    [
        (("ann", "ws1", ":0"), None, 1),  # the same user, host and display: no new seat
        (("ann", "ws1", ":1"), Reason.NO_SEATS, 1),  # another display
        (("ann", "ws2", ":0"), Reason.NO_SEATS, 1),  # another host
        (("bob", "ws1", ":0"), Reason.NO_SEATS, 1),  # another user
    ],
)
def test_dup_group_uhd_as_the_guide_defines_it(
    second: tuple[str, str, str], reason: str | None, in_use: int
) -> None:
    # Appendix B, DUP_GROUP: "DUP_GROUP=UHD means the duplicate grouping is
    # (DUP_USER|DUP_HOST|DUP_DISPLAY), so for a user on the same host and display,
    # additional uses of a feature do not consume additional licenses" (one seat here)
    line = dataclasses.replace(ent(feature="f1", count=1), dup_group="UHD")
    w = world("", line)
    for sid, (user, host, display) in (("first", ("ann", "ws1", ":0")), ("second", second)):
        w.send("open", sid, user=user, host=host, display=display, client_version="1")
    grant_of(w.checkout("first", feature="f1"))
    reply = w.checkout("second", feature="f1")
    if reason is None:
        grant_of(reply)
    else:
        denied(reply, reason)
    assert w.ledger.in_use("f1") == in_use


# --------------------------------------------------------------------------- borrowing

WALL = 1_764_500_000.0
DAY = datetime.date(2025, 11, 30)


@dataclass(frozen=True)
class Borrow:
    page: str
    options: str
    reason: str | None  # None: lent
    user: str = "ann"
    lent: int = 0  # seats of the pool lent now
    end: float | None = None  # the end granted, when lent


# BORROW_LOWWATER page: "a feature f1 has a count of 10 and borrowing is enabled ... on
# the FEATURE line: FEATURE f1 ... 10 ... BORROW SIGN=... The following line in the
# options file allows only 7 licenses for this feature to be borrowed: BORROW_LOWWATER f1 3"
F1 = [Entitlement("f1", "1.0", 10, None, borrow=168.0)]  # BORROW: 168 hours, a week
BORROWS = [
    Borrow("BORROW_LOWWATER", "BORROW_LOWWATER f1 3", None, lent=6),
    Borrow("BORROW_LOWWATER", "BORROW_LOWWATER f1 3", BorrowReason.LOWWATER, lent=7),
    Borrow("BORROW_LOWWATER", "", None, lent=9),  # without it all 10 may go
    # MAX_BORROW_HOURS page: "Changes the maximum period a license can be borrowed from
    # that specified in the license certificate ... The new period must be less than
    # that in the license certificate"; the line's BORROW alone is a week
    Borrow("BORROW", "", None, end=WALL + 168 * HOUR),
    Borrow("MAX_BORROW_HOURS", "MAX_BORROW_HOURS f1 24", None, end=WALL + 24 * HOUR),
    Borrow("MAX_BORROW_HOURS", "MAX_BORROW_HOURS f1 200", None, end=WALL + 168 * HOUR),
    # EXCLUDE_BORROW page: "EXCLUDE_BORROW supersedes INCLUDE_BORROW"
    Borrow("EXCLUDE_BORROW", "EXCLUDE_BORROW f1 USER hank", Reason.EXCLUDED, user="hank"),
    Borrow("INCLUDE_BORROW", "INCLUDE_BORROW f1 USER bob", Reason.NOT_INCLUDED),
    Borrow("INCLUDE_BORROW", "INCLUDE_BORROW f1 USER bob", None, user="bob"),
    Borrow(
        "EXCLUDE_BORROW",
        "INCLUDE_BORROW f1 USER bob\nEXCLUDE_BORROW f1 USER bob",
        Reason.EXCLUDED,
        user="bob",
    ),
]


@pytest.mark.parametrize("case", BORROWS, ids=lambda c: f"{c.page}:{c.options!r}:{c.lent}")
def test_borrowing_as_the_guide_says(case: Borrow) -> None:
    policy = Policy(parse_options(case.options, path="site.opt")) if case.options else None
    got = borrow.decide(
        Catalog(F1), policy, feature="f1", version=None, count=1, until=None, hours=None,
        who=Principal(case.user, "laptop"), now=WALL, day=DAY, used=lambda key: case.lent,
        lent=lambda key: case.lent, holdings=lambda: [], already=False,
    )  # fmt: skip
    if case.reason is None:
        assert isinstance(got, Lent), got
        if case.end is not None:
            assert got.until == case.end
    else:
        assert isinstance(got, Denial) and got.reason == case.reason, got


# --------------------------------------------------------------------------- lmremove


@pytest.mark.parametrize(
    ("removal", "gone"),
    [
        # "lmremove [-c license_file_list] feature user user_host display ... removes all
        # instances of user on user_host and display from usage of feature", with the
        # guide's lmstat -a line "joe nirvana /dev/ttyp5 (v1.000) (cloud9/7654 102)"
        (Removal("joe", "nirvana", "/dev/ttyp5", "f1"), {"joe-a", "joe-b"}),
        # "lmremove -h feature server_host port handle": the grant by its id
        (Removal(grant=1), {"joe-a"}),
    ],
)
def test_lmremove_as_the_guide_says(removal: Removal, gone: set[str]) -> None:
    w = world("", ent(feature="f1", count=10), ent(feature="f2", count=10))
    sessions = {
        "joe-a": ("joe", "nirvana", "/dev/ttyp5", "f1"),
        "joe-b": ("joe", "nirvana", "/dev/ttyp5", "f1"),
        "joe-tty6": ("joe", "nirvana", "/dev/ttyp6", "f1"),  # another display
        "joe-f2": ("joe", "nirvana", "/dev/ttyp5", "f2"),  # another feature
        "jim": ("jim", "nirvana", "/dev/ttyp5", "f1"),  # another user
    }
    for sid, (user, host, display, feature) in sessions.items():
        w.send("open", sid, user=user, host=host, display=display, client_version="1")
        grant_of(w.checkout(sid, feature=feature))
    w.advance(LEASE / 2)  # older than min_remove below
    deltas, reply = decide_removal(w.ledger, removal, w.now, min_remove=1.0)
    for delta in deltas:
        w.ledger.apply(delta)
    assert reply["status"] == "ok"
    left = {sid for sid in sessions if (s := w.ledger.session(sid)) is not None and s.grants}
    assert left == set(sessions) - gone
    assert all(d["k"] == "take" and d["reason"] == "removed" for d in deltas)
