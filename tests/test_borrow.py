"""BORROW (issue 15) in pure code: the line keyword, the options keywords (table tests of
LOWWATER, MAX_BORROW_HOURS, INCLUDE/EXCLUDE_BORROW), the primary's decision, the ledger's
borrow holds, and the token: signed, verified, refused when forged, altered, ended or
another host's; the library's token store."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from zbroker import LicenseClient, LicenseDenied, LicenseUnavailable
from zbroker.broker import borrow
from zbroker.broker.borrow import BorrowReason, Lent, sign, sign_facts
from zbroker.broker.ledger import Ledger
from zbroker.broker.license import LicenseSyntaxError, parse_license
from zbroker.broker.model import Entitlement, Now, Reason, Request
from zbroker.broker.options import OptionsSyntaxError, parse_options
from zbroker.broker.policy import Policy, Principal
from zbroker.broker.seats import Catalog, Denial, LedgerError, entitlement_from_map
from zbroker.broker.wire import RemoteProtocolError, decode_request, pack
from zbroker.clients.borrow import (
    CLOCK_SLACK,
    ENDED_KEPT,
    Refused,
    Token,
    TokenError,
    refusal,
    signature_ok,
)
from zbroker.clients.tokens import StoreError, TokenNotKept, TokenStore

pytestmark = pytest.mark.unit

WALL = 1_764_500_000.0  # 2025-11-30, the primary's clock in these tests
DAY = datetime.date(2025, 11, 30)
HOUR = 3600.0
KEY = Ed25519PrivateKey.generate()
HEX = borrow.borrow_key_hex(KEY)


# --------------------------------------------------------------- the license line


@pytest.mark.parametrize(
    ("words", "hours", "early"),
    [
        ("", None, True),
        ("BORROW", 168.0, True),  # FlexNet's default: a week
        ("borrow", 168.0, True),
        ("BORROW=24", 24.0, True),
        ("borrow=1", 1.0, True),
        ("BORROW=87600 NO_EARLY_RETURN", 87600.0, False),
    ],
)
def test_the_borrow_keyword_of_a_line(words: str, hours: float | None, early: bool) -> None:
    text = f"FEATURE cad acme 2.0 permanent 5 {words}"
    (line,) = parse_license(text, path="l", public_key=None, servers_required=False).entitlements
    assert (line.borrow, line.early_return) == (hours, early)


@pytest.mark.parametrize(
    "words", ["BORROW=0", "BORROW=87601", "BORROW=2.5", "BORROW=x", "BORROW=3 BORROW"]
)
def test_a_bad_borrow_keyword_names_the_line_and_column(words: str) -> None:
    with pytest.raises(LicenseSyntaxError, match=r"^l:1:34: expected BORROW"):
        parse_license(f"FEATURE cad acme 2.0 permanent 5 {words}", path="l", public_key=None,
                      servers_required=False)  # fmt: skip


def test_borrow_hours_are_replicated_with_the_line() -> None:
    from zbroker.broker.seats import entitlement_to_map

    line = Entitlement("cad", "2.0", 5, None, borrow=24.0, early_return=False)
    assert entitlement_from_map(entitlement_to_map(line)) == line
    plain = Entitlement("cad", "2.0", 5, None)
    assert "borrow" not in entitlement_to_map(plain)  # older maps stay as they were
    with pytest.raises(LedgerError, match="borrow"):
        entitlement_from_map({**entitlement_to_map(plain), "borrow": -1})


# --------------------------------------------------------------- the options keywords


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("MAX_BORROW_HOURS cad 24", None),
        ("MAX_BORROW_HOURS cad:VERSION=2.0 0", None),
        ("BORROW_LOWWATER cad 3", None),
        ("INCLUDE_BORROW cad USER ann", None),
        ("EXCLUDE_BORROW cad HOST_GROUP lab", None),
        ("MAX_BORROW_HOURS cad", "a number of hours"),
        ("MAX_BORROW_HOURS cad 87601", "a number of hours"),
        ("BORROW_LOWWATER cad -1", "a count of seats"),
        ("MAX_BORROW_HOURS cad 24 USER ann", "the end of the line"),
        ("INCLUDE_BORROW cad", "a principal type"),
        ("EXCLUDE_BORROW cad GROUP nobody", "a GROUP defined"),
    ],
)
def test_the_borrow_keywords_of_an_options_file(text: str, error: str | None) -> None:
    head = "HOST_GROUP lab h1 h2\n"
    if error is None:
        (line,) = parse_options(head + text, path="o").lines
        assert line.keyword == text.split()[0]
    else:
        with pytest.raises(OptionsSyntaxError, match=error):
            parse_options(head + text, path="o")


# --------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Case:
    why: str
    options: str
    reason: str | None  # None: lent
    user: str = "ann"
    host: str = "lap"
    count: int = 1
    hours: float | None = None
    until: float | None = None
    used: int = 0  # seats of the pool held now
    lent: int = 0  # seats of the pool lent now
    end: float | None = None  # the end granted, when lent


# cad 2.0: FEATURE of 10 seats, INCREMENT of 5 with BORROW=72 (the demo's): 5 lendable.
LINES = [
    Entitlement("cad", "2.0", 10, None),
    Entitlement("cad", "2.0", 5, None, borrow=72.0),
    Entitlement("viewer", "3.0", 50, None),
]

LOWWATER = [
    Case("no LOWWATER: the BORROW line's 5 seats", "", None, count=5),
    Case("LOWWATER 2 keeps 2 of them", "BORROW_LOWWATER cad 2", BorrowReason.LOWWATER, count=4),
    Case("LOWWATER 2 lends 3", "BORROW_LOWWATER cad 2", None, count=3),
    Case("3 lent: the 4th waits", "BORROW_LOWWATER cad 2", BorrowReason.LOWWATER, lent=3),
    Case(
        "LOWWATER at the pool's version", "BORROW_LOWWATER cad:VERSION=2.0 5", BorrowReason.LOWWATER
    ),
    Case("LOWWATER of another version", "BORROW_LOWWATER cad:VERSION=3.0 5", None),
    Case("LOWWATER above the line", "BORROW_LOWWATER cad 99", BorrowReason.LOWWATER),
    Case("lendable but all seats in use", "", Reason.NO_SEATS, used=15),
]

MAX_HOURS = [
    Case("the line's 72 h by default", "", None, end=WALL + 72 * HOUR),
    Case("MAX_BORROW_HOURS shortens", "MAX_BORROW_HOURS cad 24", None, end=WALL + 24 * HOUR),
    Case("it never lengthens", "MAX_BORROW_HOURS cad 100", None, end=WALL + 72 * HOUR),
    Case(
        "the smallest of two",
        "MAX_BORROW_HOURS cad 24\nMAX_BORROW_HOURS cad 12",
        None,
        end=WALL + 12 * HOUR,
    ),
    Case("hours within it", "MAX_BORROW_HOURS cad 24", None, hours=10, end=WALL + 10 * HOUR),
    Case("hours beyond it", "MAX_BORROW_HOURS cad 24", BorrowReason.BORROW_END, hours=25),
    Case("until within it", "", None, until=WALL + HOUR, end=WALL + HOUR),
    Case("until beyond the line", "", BorrowReason.BORROW_END, until=WALL + 73 * HOUR),
    Case("until in the past: a clock off", "", BorrowReason.BORROW_END, until=WALL - 60),
    Case("until now exactly", "", BorrowReason.BORROW_END, until=WALL),
    Case("MAX_BORROW_HOURS 0: nothing", "MAX_BORROW_HOURS cad 0", BorrowReason.BORROW_END),
]

INCLUDE_EXCLUDE = [
    Case("no list: everyone", "", None),
    Case("EXCLUDE_BORROW the user", "EXCLUDE_BORROW cad USER ann", Reason.EXCLUDED),
    Case("EXCLUDE_BORROW another", "EXCLUDE_BORROW cad USER bob", None),
    Case("INCLUDE_BORROW the user", "INCLUDE_BORROW cad USER ann", None),
    Case("INCLUDE_BORROW another", "INCLUDE_BORROW cad USER bob", Reason.NOT_INCLUDED),
    Case(
        "EXCLUDE before INCLUDE",
        "INCLUDE_BORROW cad USER ann\nEXCLUDE_BORROW cad USER ann",
        Reason.EXCLUDED,
    ),
    Case(
        "by host group", "HOST_GROUP labs lap\nEXCLUDE_BORROW cad HOST_GROUP labs", Reason.EXCLUDED
    ),
    Case("by group", "GROUP eng ann\nINCLUDE_BORROW cad GROUP eng", None),
    Case("of another feature", "EXCLUDE_BORROW viewer USER ann", None),
    Case("an EXCLUDE of checkouts excludes borrows", "EXCLUDE cad USER ann", Reason.EXCLUDED),
    Case("RESERVE keeps its seats from borrows", "RESERVE 15 cad USER bob", Reason.RESERVED),
    Case("MAX caps borrows too", "MAX 2 cad USER ann", Reason.MAX_REACHED, count=3),
]

OTHERS = [
    Case("a line without BORROW", "", BorrowReason.NOT_BORROWABLE),
    Case("no such feature", "", Reason.NO_SUCH_FEATURE),
]


def decide(case: Case, feature: str = "cad") -> Lent | Denial:
    policy = Policy(parse_options(case.options, path="site.opt")) if case.options else None
    return borrow.decide(
        Catalog(LINES), policy, feature=feature, version=None, count=case.count,
        until=case.until, hours=case.hours, who=Principal(case.user, case.host), now=WALL,
        day=DAY, used=lambda key: case.used, lent=lambda key: case.lent, holdings=lambda: [],
        already=False,
    )  # fmt: skip


def _check(case: Case, got: Lent | Denial) -> None:
    if case.reason is None:
        assert isinstance(got, Lent), (case.why, got)
        if case.end is not None:
            assert got.until == case.end, case.why
    else:
        assert isinstance(got, Denial), (case.why, got)
        assert got.reason == case.reason, (case.why, got.detail)
        assert not got.busy, "a borrow never waits in a queue"


@pytest.mark.parametrize("case", LOWWATER, ids=lambda c: c.why)
def test_borrow_lowwater(case: Case) -> None:
    _check(case, decide(case))


def test_a_lowwater_denial_says_why_once_per_pool() -> None:
    # cad 2.0 is one pool of two lines (FEATURE 10, INCREMENT 5 BORROW=72); the checkout
    # asks its room once to choose and once more to word its denial.
    got = decide(Case("", "BORROW_LOWWATER cad 5", BorrowReason.LOWWATER, lent=1))
    assert isinstance(got, Denial) and got.reason == BorrowReason.LOWWATER
    assert got.detail == "cad 2.0 lends at most 5 seats, 5 kept by BORROW_LOWWATER, 1 lent now"
    # Two pools short: each said once, in the order of the pools.
    lines = [*LINES, Entitlement("cad", "3.0", 4, None, borrow=24.0)]
    policy = Policy(parse_options("BORROW_LOWWATER cad 4", path="site.opt"))
    got = borrow.decide(
        Catalog(lines), policy, feature="cad", version=None, count=2, until=None, hours=None,
        who=Principal("ann", "lap"), now=WALL, day=DAY, used=lambda key: 0,
        lent=lambda key: 0, holdings=lambda: [], already=False,
    )  # fmt: skip
    assert isinstance(got, Denial) and got.detail == (
        "cad 2.0 lends at most 5 seats, 4 kept by BORROW_LOWWATER, 0 lent now; "
        "cad 3.0 lends at most 4 seats, 4 kept by BORROW_LOWWATER, 0 lent now"
    )


@pytest.mark.parametrize("case", MAX_HOURS, ids=lambda c: c.why)
def test_max_borrow_hours(case: Case) -> None:
    _check(case, decide(case))


@pytest.mark.parametrize("case", INCLUDE_EXCLUDE, ids=lambda c: c.why)
def test_include_and_exclude_borrow(case: Case) -> None:
    _check(case, decide(case))


def test_exclude_borrow_leaves_checkouts_alone() -> None:
    from zbroker.broker.policy import choose_under
    from zbroker.broker.seats import Choice

    policy = Policy(parse_options("EXCLUDE_BORROW cad USER ann", path="o"))
    got = choose_under(policy, Catalog(LINES), "cad", None, 1, Principal("ann", "lap"), DAY,
                       lambda key: 0, lambda: [])  # fmt: skip
    assert isinstance(got, Choice)


def test_the_other_denials() -> None:
    _check(OTHERS[0], decide(OTHERS[0], "viewer"))
    _check(OTHERS[1], decide(OTHERS[1], "nothing"))


def test_no_borrow_outlives_the_license_line() -> None:
    midnight = datetime.datetime(2025, 12, 1, tzinfo=datetime.UTC).timestamp()
    lines = [Entitlement("cad", "2.0", 5, DAY, borrow=72.0)]  # expires at the end of DAY
    got = borrow.decide(
        Catalog(lines), None, feature="cad", version=None, count=1, until=None, hours=None,
        who=Principal("ann", "lap"), now=WALL, day=DAY, used=lambda key: 0,
        lent=lambda key: 0, holdings=lambda: [], already=False,
    )  # fmt: skip
    assert isinstance(got, Lent) and got.until == midnight
    beyond = borrow.decide(
        Catalog(lines), None, feature="cad", version=None, count=1, until=None, hours=24,
        who=Principal("ann", "lap"), now=WALL, day=DAY, used=lambda key: 0,
        lent=lambda key: 0, holdings=lambda: [], already=False,
    )  # fmt: skip
    assert isinstance(beyond, Denial) and "lines expire" in beyond.detail


def test_until_and_hours_together_are_a_bad_request() -> None:
    led = ledger()
    opened(led, "s1")
    reply = run(led, Request("borrow", sid="s1", req=2, feature="cad", hours=1, until=WALL + 60))
    assert reply["status"] == "error" and reply["code"] == "bad_request"


def test_a_refused_end_says_the_servers_time() -> None:
    got = decide(Case("", "", BorrowReason.BORROW_END, until=WALL - 3600))
    assert isinstance(got, Denial)
    assert "2025-11-30 09:53:20 UTC" in got.detail and "clock" in got.detail


# --------------------------------------------------------------- the ledger


def ledger(lines: list[Entitlement] = LINES) -> Ledger:
    return Ledger(lines, lease=30.0, heartbeat=10.0)


def run(led: Ledger, request: Request, wall: float = WALL) -> dict[str, object]:
    """Decide and apply as a primary's node does, signing a borrow's token as it does."""
    out = led.handle(request, Now(1.0, wall))
    if out.reply is not None:
        return out.reply
    reply: dict[str, object] = {}
    for delta, answer in out.decided:
        if "token" in delta:
            delta["token"] = sign_facts(KEY, delta["token"])
            if answer is not None:
                answer["token"] = delta["token"]
        led.apply(delta)
        reply = answer or reply
    return reply


def opened(led: Ledger, sid: str, user: str = "ann", host: str = "lap") -> None:
    run(led, Request("open", sid=sid, req=1, user=user, host=host))


def test_a_borrow_outlives_its_session_and_counts_until_its_end() -> None:
    led = ledger()
    opened(led, "s1")
    reply = run(led, Request("borrow", sid="s1", req=2, feature="cad", hours=2))
    assert reply["status"] == "ok"
    token = Token.from_map(reply["token"])
    assert (token.user, token.host, token.start, token.end) == ("ann", "lap", WALL, WALL + 2 * HOUR)
    assert signature_ok(token) and token.triad == HEX
    run(led, Request("close", sid="s1", req=3))
    (cad,) = [f for f in led.status() if f["name"] == "cad"]
    assert (cad["in_use"], cad["borrowed"]) == (1, 1)
    holders, _ = led.holders("cad", 0, 10)
    assert holders[0]["hold"] == "borrow" and holders[0]["until"] == WALL + 2 * HOUR
    again = Ledger.from_snapshot(led.snapshot(), lease=30.0, heartbeat=10.0)
    assert again.holders("cad", 0, 10) == (holders, None)
    # the primary's tick lapses it at its end, not before
    assert not [d for d, _ in led.tick(Now(2.0, WALL + 2 * HOUR - 1)).decided if d["k"] == "lapse"]
    lapses = [d for d, _ in led.tick(Now(3.0, WALL + 2 * HOUR + 1)).decided if d["k"] == "lapse"]
    assert [d["grant"] for d in lapses] == [token.grant]
    for d in lapses:
        led.apply(d)
    assert led.in_use("cad") == 0


def test_a_retried_borrow_gets_the_same_token() -> None:
    led = ledger()
    opened(led, "s1")
    first = run(led, Request("borrow", sid="s1", req=2, feature="cad"))
    assert run(led, Request("borrow", sid="s1", req=2, feature="cad")) == first
    follower = Ledger.from_snapshot(led.snapshot(), lease=30.0, heartbeat=10.0)
    assert follower.recorded("s1", 2) == first


def test_borrowing_again_is_refused_and_returning_frees_the_seat() -> None:
    led = ledger()
    opened(led, "s1")
    run(led, Request("borrow", sid="s1", req=2, feature="cad"))
    again = run(led, Request("borrow", sid="s1", req=3, feature="cad"))
    assert again["reason"] == BorrowReason.ALREADY_BORROWED
    opened(led, "s2", user="bob")
    assert run(led, Request("return", sid="s2", req=2, feature="cad"))["reason"] == (
        BorrowReason.NOT_BORROWED
    )
    opened(led, "s3")  # the same user and host, another process: returns it
    reply = run(led, Request("return", sid="s3", req=2, feature="cad"))
    assert reply == {"status": "ok", "grant": 1}
    assert led.in_use("cad") == 0


def test_no_early_return_keeps_the_borrow() -> None:
    led = ledger([Entitlement("cad", "2.0", 5, None, borrow=24.0, early_return=False)])
    opened(led, "s1")
    run(led, Request("borrow", sid="s1", req=2, feature="cad"))
    assert run(led, Request("return", sid="s1", req=3, feature="cad"))["reason"] == (
        BorrowReason.NO_EARLY_RETURN
    )
    assert led.in_use("cad") == 1


def test_a_return_delta_must_name_a_borrow_of_the_user() -> None:
    led = ledger()
    opened(led, "s1")
    run(led, Request("checkout", sid="s1", req=2, feature="cad"))
    with pytest.raises(LedgerError, match="no borrow"):
        led.apply({"k": "return", "sid": "s1", "req": 3, "ack": 0, "grant": 1, "at": WALL})


def _lingering() -> tuple[Ledger, dict[str, object]]:
    """A ledger where ann holds one cad seat and lingers another, and the grant delta of
    her borrow as the primary would decide it (signed)."""
    led = Ledger(
        LINES, lease=30.0, heartbeat=10.0, options=parse_options("LINGER cad 600\n", path="o.opt")
    )
    opened(led, "s1")
    run(led, Request("checkout", sid="s1", req=2, feature="cad"))
    run(led, Request("checkout", sid="s1", req=3, feature="cad"))
    run(led, Request("checkin", sid="s1", req=4, grant=2))  # lingers until WALL + 600
    assert led.holds()[0].hold == "linger"
    out = led.handle(Request("borrow", sid="s1", req=5, feature="cad", hours=2), Now(1.0, WALL))
    ((delta, _),) = out.decided
    delta["token"] = sign_facts(KEY, delta["token"])
    return led, delta


@pytest.mark.parametrize(
    ("what", "change", "facts", "why"),
    [
        ("an end that is no time", {"borrow": "soon"}, {}, "'borrow' must be a finite number"),
        ("an infinite end", {"borrow": float("inf")}, {}, "'borrow' must be a finite number"),
        ("an end before its start", {"borrow": WALL - 1}, {}, "is not after"),
        ("a token that is no map", {"token": ["a", "list"]}, {}, "'token' must be a map"),
        ("another grant's token", {}, {"grant": 99}, "the token's grant differ"),
        ("a later end in the token", {}, {"end": WALL + 9 * HOUR}, "the token's end differ"),
        ("another host's token", {}, {"host": "desk"}, "the token's host differ"),
        ("a token without a borrow", {"borrow": None}, {}, "a token, but no 'borrow' end"),
        ("a borrow that reclaims", {"reclaims": 2}, {}, "neither reclaims"),
        ("a borrow that shares a seat", {"dup": "ann|lap"}, {}, "neither reclaims"),
    ],
)
def test_a_malformed_borrow_delta_changes_nothing(
    what: str, change: dict[str, object], facts: dict[str, object], why: str
) -> None:
    """``apply`` checks every field of a borrow before it touches anything: the grant
    counter, the seat, the lingering seat a reclaim would free, the recorded reply."""
    led, delta = _lingering()
    before = led.snapshot()
    bad = {**delta, "token": {**delta["token"], **facts}, **change}  # type: ignore[dict-item]
    bad = {k: v for k, v in bad.items() if v is not None}
    with pytest.raises(LedgerError, match=why):
        led.apply(bad)
    assert led.snapshot() == before, what
    led.apply(delta)  # the good one still fits: nothing was half done
    assert led.recorded("s1", 5)["token"] == delta["token"]  # type: ignore[index]


def test_borrow_requests_on_the_wire() -> None:
    def decoded(**fields: object) -> Request:
        return decode_request(pack({"v": 1, "sid": "s", "req": 1, **fields}))

    r = decoded(op="borrow", feature="cad", hours=2.5, count=2, version="2.0")
    assert (r.op, r.feature, r.hours, r.until, r.count) == ("borrow", "cad", 2.5, None, 2)
    assert decoded(op="return", feature="cad").feature == "cad"
    for bad in ({"hours": 0}, {"hours": -1}, {"until": float("nan")}, {"hours": True}):
        with pytest.raises(RemoteProtocolError):
            decoded(op="borrow", feature="cad", **bad)


# --------------------------------------------------------------- the token


def token(**changes: object) -> Token:
    facts = Token("cad", "2.0", 1, "ann", "lap", WALL, WALL + 24 * HOUR, 7, triad="")
    return dataclasses.replace(sign(KEY, facts), **changes)  # type: ignore[arg-type]


TRUSTED = frozenset({HEX})


def refused(
    t: Token, *, user: str = "ann", host: str = "lap", now: float = WALL + 60
) -> Refused | None:
    return refusal(t, trusted=TRUSTED, user=user, host=host, now=now)


@pytest.mark.parametrize(
    "now",
    [
        WALL + 60,
        WALL - 2,  # this clock 2 s behind the triad's: the token is newer than this clock
        WALL - CLOCK_SLACK + 1,  # as far behind as allowed
        WALL + 24 * HOUR - 1,  # the last second
    ],
)
def test_a_good_token_serves(now: float) -> None:
    assert refused(token(), now=now) is None


END = WALL + 24 * HOUR


@pytest.mark.parametrize(
    ("what", "t", "kw", "why", "keep"),
    [
        ("altered end", token(end=WALL + 240 * HOUR), {}, "forged or altered", False),
        ("altered count", token(count=5), {}, "forged or altered", False),
        ("altered host", token(host="desk"), {"host": "desk"}, "forged or altered", False),
        ("forged with a trusted key's name", token(sig="ab" * 64), {}, "forged or altered", False),
        (
            "forged with the forger's key",
            sign(Ed25519PrivateKey.generate(), token()),
            {},
            "no license file of the path names",
            True,  # it may be another license path's
        ),
        ("another host", token(), {"host": "desk"}, "not 'ann' on 'desk'", False),
        ("another user", token(), {"user": "bob"}, "not 'bob' on 'lap'", False),
        # Ended by this clock, which may be fast: not served, kept a day after its end.
        ("ended", token(), {"now": END}, "kept until", True),
        ("ended nearly a day ago", token(), {"now": END + ENDED_KEPT - 1}, "ended at", True),
        ("ended a day ago", token(), {"now": END + ENDED_KEPT}, "ended at", False),
        # Newer than this clock by more than the slack: the clock is behind; kept.
        ("this clock far behind", token(), {"now": WALL - 3600}, "behind the triad's", True),
        ("this clock just too far behind", token(), {"now": WALL - CLOCK_SLACK - 1}, "", True),
    ],
)
def test_a_token_is_refused(
    what: str, t: Token, kw: dict[str, object], why: str, keep: bool
) -> None:
    got = refused(t, **kw)  # type: ignore[arg-type]
    assert got is not None and why in got.why, what
    assert got.keep == keep, what


def test_a_clock_far_behind_says_by_how_much_and_when_the_token_serves() -> None:
    got = refused(token(), now=WALL - 2 * HOUR)
    assert got is not None and got.keep and got.clock
    assert "2.0 h after this computer's time" in got.why
    assert "serves from 2025-11-30 10:48:20 UTC by this clock" in got.why


def test_the_store_keeps_and_deletes_tokens(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "borrow")
    path = store.save(token())
    assert path.stat().st_mode & 0o077 == 0
    assert [(p, t) for p, t in store.tokens("cad")] == [(path, token())]
    assert list(store.tokens("viewer")) == []
    (tmp_path / "borrow" / "junk.json").write_text("{not json")
    (junk,) = [t for p, t in store.tokens() if p.name == "junk.json"]
    assert isinstance(junk, TokenError)
    store.delete(path)
    assert [p.name for p, _ in store.tokens()] == ["junk.json"]


def test_the_store_is_where_the_environment_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZBROKER_BORROW_DIR", str(tmp_path / "t"))
    assert TokenStore().directory == tmp_path / "t"
    monkeypatch.delenv("ZBROKER_BORROW_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert TokenStore().directory == tmp_path / "xdg" / "zbroker" / "borrow"


def test_a_token_map_is_checked_field_by_field() -> None:
    good = token().to_map()
    assert Token.from_map(json.loads(json.dumps(good))) == token()
    for field, value in [("v", 2), ("count", 0), ("end", "soon"), ("triad", "xyz"), ("sig", 1)]:
        with pytest.raises(TokenError):
            Token.from_map({**good, field: value})


def test_a_borrowed_seat_serves_first_without_asking_a_server(tmp_path: Path) -> None:
    """A checkout covered by a valid token is served from it at once: the client joins no
    I/O thread (no server is asked, connected or not); a checkin of it changes nothing
    on any server. One not covered (seats, version) is left to the servers."""
    with socket.socket() as s:  # a port of the OS's, never dialled: nothing is asked
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    lic = tmp_path / "site.lic"
    lic.write_text(f"SERVER alpha ANY {endpoint} BORROW_KEY={HEX}\nVENDOR demo\n")
    now = time.time()
    t = sign(KEY, Token("cad", "2.0", 2, "ann", "lap", now - 60, now + HOUR, 7, triad=""))
    TokenStore(tmp_path / "tokens").save(t)
    with LicenseClient(str(lic), user="ann", host="lap", borrow_dir=tmp_path / "tokens") as client:
        grant = client.checkout("cad", count=2, version="1.0", wait=30)
        assert (grant.borrowed_until, grant.id, grant.count, grant.version) == (t.end, 7, 2, "2.0")
        client.checkin(grant)
        assert grant.released
        assert client._engine is None  # no I/O thread joined: no server was asked
        assert client._from_token("cad", 3, None) is None  # more seats than borrowed
        assert client._from_token("cad", 1, "2.1") is None  # a newer version than borrowed
        assert client._from_token("cad", 1, "two") is None  # the servers say what is wrong
        assert client._from_token("viewer", 1, None) is None
    assert [p.name for p, _ in TokenStore(tmp_path / "tokens").tokens()] == [
        TokenStore(tmp_path / "tokens").path_of(t.triad, "cad").name
    ]  # the borrow goes on: its token stays


def _offline_license(tmp_path: Path) -> Path:
    """A license naming the test key and a server that is never dialled."""
    with socket.socket() as s:  # a port of the OS's, never dialled: nothing is asked
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    lic = tmp_path / "site.lic"
    lic.write_text(f"SERVER alpha ANY {endpoint} BORROW_KEY={HEX}\nVENDOR demo\n")
    return lic


def test_a_clock_that_is_off_deletes_no_valid_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The laptop's clock behind the triad's (the token's start after this clock) or fast
    (its end passed here first): a valid token is never deleted for it. A little behind,
    it serves; far behind, it is kept and said once; ended here, kept for a day."""
    lic, now = _offline_license(tmp_path), time.time()
    stores = {
        name: TokenStore(tmp_path / name)
        for name in ("skewed", "far_behind", "ended", "long_ended")
    }
    facts = {  # a token signed by the triad at start (its clock)
        "skewed": (now + 2, now + HOUR),  # this clock 2 s behind
        "far_behind": (now + HOUR, now + 2 * HOUR),  # an hour behind
        "ended": (now - HOUR, now - 60),  # ended by this clock, which may be fast
        "long_ended": (now - 3 * ENDED_KEPT, now - ENDED_KEPT - 60),
    }
    paths = {
        name: stores[name].save(sign(KEY, Token("cad", "2.0", 1, "ann", "lap", *se, 7, triad="")))
        for name, se in facts.items()
    }

    def client(name: str) -> LicenseClient:
        return LicenseClient(str(lic), user="ann", host="lap", borrow_dir=tmp_path / name)

    with client("skewed") as c:
        grant = c.checkout("cad")
        assert grant.borrowed_until == facts["skewed"][1] and c._engine is None
        assert [t.start for t in c.borrowed()] == [facts["skewed"][0]]
    with client("far_behind") as c, caplog.at_level(logging.INFO, logger="zbroker.clients"):
        assert c._from_token("cad", 1, None) is None
        assert c._from_token("cad", 1, None) is None
        assert c.borrowed() == []
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "behind the triad's by at least" in warned[0], warned
        assert "60 min after this computer's time" in warned[0]
    with client("ended") as c:
        assert c._from_token("cad", 1, None) is None
    with client("long_ended") as c:
        assert c._from_token("cad", 1, None) is None
    assert [name for name, path in paths.items() if path.exists()] == [
        "skewed",
        "far_behind",
        "ended",
    ]


def _fake_triad(
    client: LicenseClient,
    monkeypatch: pytest.MonkeyPatch,
    on_borrow: Callable[[], None] = lambda: None,
    returned: Exception | None = None,
    ahead: float = 0.0,
) -> list[str]:
    """Stands in for the triad's answers to ``borrow`` (a token of grant 7, after
    ``on_borrow``; the triad's clock ``ahead`` of this one) and ``return`` (``returned``
    raised, if given): what was asked."""
    asked: list[str] = []
    now = time.time() + ahead

    def ask(op: str, fields: dict[str, object], *args: object) -> dict[str, object]:
        asked.append(op)
        if op == "borrow":
            on_borrow()
            t = sign(KEY, Token("cad", "2.0", 1, "ann", "lap", now, now + 24 * HOUR, 7, triad=""))
            return {"token": t.to_map()}
        if returned is not None:
            raise returned
        return {"grant": 7}

    monkeypatch.setattr(client, "_ask_path", ask)
    return asked


@pytest.mark.parametrize("where", ["a file", "under a file", "cannot be made"])
def test_a_store_that_cannot_be_written_is_found_before_the_triad_is_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    lic = _offline_license(tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory\n")
    store = {
        "a file": blocker,
        "under a file": blocker / "borrow",
        "cannot be made": Path("/proc/no/such/borrow"),  # refused to root as well
    }[where]
    with LicenseClient(str(lic), user="ann", host="lap", borrow_dir=store) as client:
        asked = _fake_triad(client, monkeypatch)
        with pytest.raises(StoreError) as raised:
            client.borrow("cad", hours=1)
    assert asked == []  # nothing lent
    assert raised.value.directory == store and str(store) in str(raised.value)
    assert "ZBROKER_BORROW_DIR" in str(raised.value)
    if where != "cannot be made":
        assert f"{blocker} is a file, not a directory" in str(raised.value)
    else:
        assert "No such file or directory" in str(raised.value)


@pytest.mark.parametrize(
    ("ahead", "says"),
    [
        (HOUR, "60 min after this computer's time: this clock is behind the triad's"),
        (-HOUR, "this computer's clock is 3600 s ahead of the triad's"),
    ],
)
def test_a_borrow_says_at_once_when_this_clock_is_off(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    ahead: float,
    says: str,
) -> None:
    lic, store = _offline_license(tmp_path), tmp_path / "tokens"
    with LicenseClient(str(lic), user="ann", host="lap", borrow_dir=store) as client:
        _fake_triad(client, monkeypatch, ahead=ahead)
        with caplog.at_level(logging.WARNING, logger="zbroker.clients"):
            token = client.borrow("cad", hours=1)
            served = client._from_token("cad", 1, None)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and says in warned[0], warned  # and not again at the checkout
    assert (served is not None) == (ahead < 0)  # a fast clock serves, until the end here
    assert [t for _, t in TokenStore(store).tokens()] == [token]  # kept either way


def _break_store(store: Path) -> None:
    """The store fails between the check and the save (a disk filled, a mount gone)."""
    if store.is_dir():  # made by the check (a client that does not check never made it)
        store.rmdir()
    store.write_text("in the way\n")


@pytest.mark.parametrize(
    ("returned", "given_back", "says"),
    [
        (None, True, "the seats were given back: nothing is borrowed"),
        (
            LicenseDenied("no_early_return", "cad 2.0 may not be returned before its end"),
            False,
            "forbids returning them early (NO_EARLY_RETURN): the seats stay lent, with no token,",
        ),
        (
            LicenseUnavailable("no server answered"),
            False,
            "giving them back failed (no server answered): the seats stay lent",
        ),
    ],
)
def test_a_token_that_cannot_be_saved_gives_its_seat_back(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    returned: Exception | None,
    given_back: bool,
    says: str,
) -> None:
    lic, store = _offline_license(tmp_path), tmp_path / "tokens"
    with LicenseClient(str(lic), user="ann", host="lap", borrow_dir=store) as client:
        asked = _fake_triad(client, monkeypatch, lambda: _break_store(store), returned)
        with pytest.raises(TokenNotKept) as raised:
            client.borrow("cad", hours=1)
    assert asked == ["borrow", "return"]
    error = raised.value
    assert isinstance(error, StoreError) and error.returned == given_back
    assert error.token.grant == 7 and error.directory == store
    assert str(error).startswith("borrowed 1 seat(s) of cad (grant 7), but cannot keep its token")
    assert f"{store} is a file, not a directory" in str(error) and says in str(error)


# --------------------------------------------------------------- under random histories


def _borrow_machine() -> type:
    """The ledger's stateful test (tests/test_ledger_properties.py) with borrows and
    returns among its requests: every invariant of it holds with borrow holds too."""
    import hypothesis.strategies as st
    from hypothesis import settings
    from hypothesis.stateful import initialize, invariant, rule

    import tests.test_ledger_properties as props

    lending = [*props.BASE, Entitlement("cad", "2.0", 2, None, borrow=2.0),
               Entitlement("cad", "5.0", 1, None, borrow=1.0, early_return=False)]  # fmt: skip

    class BorrowMachine(props.LedgerMachine):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.ledger = Ledger(lending, lease=props.LEASE, heartbeat=props.HEARTBEAT)
            self.checkpoint = self.ledger.snapshot()

        @initialize(options=st.booleans())
        def open_all(self, options: bool) -> None:
            if options:
                self.ledger = Ledger(
                    lending, lease=props.LEASE, heartbeat=props.HEARTBEAT,
                    options=parse_options("LINGER cad 5\nBORROW_LOWWATER cad:VERSION=2.0 1\n"
                                          "MAX_BORROW_HOURS cad 1\n", path="p.opt"),
                )  # fmt: skip
                self.checkpoint = self.ledger.snapshot()
            for sid in sorted(props.USERS):
                self.send(self.request("open", sid, False))

        def commit(self, decided: list[tuple[dict[str, object], object]]) -> None:
            super().commit(decided)
            for delta, reply in decided:
                if delta["k"] == "return":
                    self.told[(str(delta["sid"]), int(delta["req"]))] = reply  # type: ignore[call-overload]

        @rule(
            data=st.data(),
            acks=st.booleans(),
            count=st.integers(1, 2),
            version=st.sampled_from([None, "2.0", "5"]),
            end=st.sampled_from([None, ("hours", 5 / 3600), ("hours", 1.0), ("until", -1.0),
                                 ("until", 3 * 3600.0)]),
        )  # fmt: skip
        def borrow(
            self, data: object, acks: bool, count: int, version: str | None, end: object
        ) -> None:
            kw: dict[str, object] = {}
            if isinstance(end, tuple):
                kw[end[0]] = end[1] if end[0] == "hours" else self.wall + end[1]
            sid = self.pick(data)  # type: ignore[arg-type]
            request = self.request("borrow", sid, acks, feature="cad", count=count,
                                   version=version, **kw)  # fmt: skip
            self.send(request)

        @rule(data=st.data(), acks=st.booleans())
        def give_back(self, data: object, acks: bool) -> None:
            self.send(self.request("return", self.pick(data), acks, feature="cad"))  # type: ignore[arg-type]

        @invariant()
        def status_agrees_with_the_grants(self) -> None:
            snap = self.ledger.snapshot()
            assert sum(f["in_use"] for f in self.ledger.status(self.now)) == sum(
                g["count"] for g in snap["grants"]
            )
            holds = {h.sid: h.hold for h in self.ledger.holds()}
            for kind, figure in (("linger", "lingering"), ("borrow", "borrowed")):
                held = sum(g["count"] for g in snap["grants"] if holds.get(g["sid"]) == kind)
                assert sum(f[figure] for f in self.ledger.status(self.now)) == held

    BorrowMachine.TestCase.settings = settings(
        max_examples=100, stateful_step_count=40, deadline=None
    )
    return BorrowMachine


TestBorrowMachine = _borrow_machine().TestCase


# --------------------------------------------------------------- the node's core


def _single_core(key: Ed25519PrivateKey | None) -> tuple[object, float]:
    from tests.test_core import NAMES, STEP, config
    from zbroker.broker.core import NodeCore
    from zbroker.broker.storage import Loaded

    lines = (Entitlement("cad", "2.0", 2, None, borrow=24.0),)
    core = NodeCore(config(NAMES[:1]), "n1", lines, Loaded(fresh=True), Now(1.0, WALL),
                    mode="plain", borrow_key=key)  # fmt: skip
    mono = 1.0
    for _ in range(20):  # the reload of the license's entitlements commits first
        mono += STEP
        core.ready(Now(mono, WALL))
    return core, mono


def _ask(core: object, mono: float, **fields: object) -> dict[str, object]:
    from tests.test_core import replies, request

    core.step(request(b"c", **fields), Now(mono, WALL))  # type: ignore[attr-defined]
    ((_, reply),) = replies(core.ready(Now(mono, WALL)))  # type: ignore[attr-defined]
    return reply  # type: ignore[no-any-return]


def test_the_primary_signs_the_token_with_the_triads_key() -> None:
    core, mono = _single_core(KEY)
    _ask(core, mono, op="open", sid="s", req=1, user="ann", host="lap")
    reply = _ask(core, mono + 0.01, op="borrow", sid="s", req=2, ack=2, feature="cad", hours=3)
    token = Token.from_map(reply["token"])
    assert refused(token, now=WALL + 60) is None and token.end == WALL + 3 * HOUR
    assert core.ledger.recorded("s", 2)["token"] == reply["token"]  # type: ignore[attr-defined]


def test_a_node_without_a_borrow_key_refuses_borrows() -> None:
    core, mono = _single_core(None)
    _ask(core, mono, op="open", sid="s", req=1, user="ann", host="lap")
    reply = _ask(core, mono + 0.01, op="borrow", sid="s", req=2, ack=2, feature="cad")
    assert reply["status"] == "denied" and reply["reason"] == BorrowReason.NOT_BORROWABLE
    assert "borrow_key" in str(reply["detail"])
