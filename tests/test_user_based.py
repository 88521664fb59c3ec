"""USER_BASED and HOST_BASED lines (issue 12 item 3): only the users (hosts) the options
file's INCLUDE lines name may use them, at most n of them; the names past n are ignored
with a warning naming the options file's line. The examples follow FlexNet's guide
(INCLUDE: "INCLUDE is required for USER_BASED or HOST_BASED features ... the license limits
the number of users that are INCLUDEd"; the INCLUDE example's picasso, mondrian, bigbrush)."""

from __future__ import annotations

import itertools

import pytest

from zbroker.broker.based import restrict
from zbroker.broker.ledger import Ledger
from zbroker.broker.license import parse_license
from zbroker.broker.model import Entitlement, Now, Request
from zbroker.broker.options import Options, parse_options

pytestmark = pytest.mark.unit

NOW = Now(1.0, 1_780_000_000.0)
LICENSE = """\
FEATURE paint  demo 1.0 permanent 3 USER_BASED=2
FEATURE sketch demo 1.0 permanent 2 HOST_BASED
FEATURE view   demo 1.0 permanent 5
"""
OPTIONS = """\
GROUP painters picasso mondrian
INCLUDE paint USER bob
INCLUDE paint GROUP painters
INCLUDE paint HOST bigbrush
INCLUDE sketch HOST bigbrush
INCLUDE sketch HOST 10.1.*.*
EXCLUDE paint USER bob
"""


def lines(text: str = LICENSE) -> list[Entitlement]:
    return parse_license(
        text, path="site.lic", public_key=None, servers_required=False
    ).entitlements


def decide(ledger: Ledger, user: str, host: str, feature: str) -> str:
    """ "ok" or the denial's reason, for one checkout by a fresh session."""
    sid = f"{user}@{host}/{next(_SIDS)}"
    for request in (
        Request("open", sid, 1, user=user, host=host),
        Request("checkout", sid, 2, ack=2, feature=feature),
    ):
        outcome = ledger.handle(request, NOW)
        for delta, _ in outcome.decided:
            ledger.apply(delta)
    reply = ledger.recorded(sid, 2)
    assert reply is not None
    return "ok" if reply["status"] == "ok" else str(reply["reason"])


_SIDS = itertools.count(1)


def site_options() -> Options:
    return parse_options(OPTIONS, path="site.opt")


def test_the_flag_and_its_count_come_from_the_signed_line() -> None:
    paint, sketch, view = lines()
    assert (paint.user_based, paint.host_based) == (2, None)
    assert (sketch.user_based, sketch.host_based) == (None, 2)  # the line's count
    assert (view.user_based, view.host_based) == (None, None)


@pytest.mark.parametrize(
    ("user", "host", "feature", "expected"),
    [
        ("picasso", "ws1", "paint", "ok"),  # named by GROUP painters, within USER_BASED=2
        ("mondrian", "ws1", "paint", "not_included"),  # the third name: past the count
        ("carol", "ws1", "paint", "not_included"),  # on no INCLUDE line
        ("carol", "bigbrush", "paint", "not_included"),  # a HOST names no user
        ("bob", "ws1", "paint", "excluded"),  # EXCLUDE first; he still takes a name
        ("carol", "bigbrush", "sketch", "ok"),  # HOST_BASED: any user on bigbrush
        ("carol", "ws1", "sketch", "not_included"),
    ],
)
def test_who_may_use_a_user_or_host_based_line(
    user: str, host: str, feature: str, expected: str
) -> None:
    ledger = Ledger(lines(), lease=30.0, heartbeat=10.0, options=site_options())
    assert decide(ledger, user, host, feature) == expected


def test_a_plain_line_next_to_them_is_everyones() -> None:
    ledger = Ledger(lines(), lease=30.0, heartbeat=10.0, options=site_options())
    assert decide(ledger, "carol", "ws1", "view") == "ok"


def test_without_an_options_file_no_one_may_use_them() -> None:
    ledger = Ledger(lines(), lease=30.0, heartbeat=10.0)
    assert decide(ledger, "picasso", "bigbrush", "paint") == "not_included"
    assert decide(ledger, "picasso", "bigbrush", "sketch") == "not_included"
    assert decide(ledger, "picasso", "bigbrush", "view") == "ok"


def test_the_includes_ignored_are_reported_with_their_line() -> None:
    _, warnings = restrict(lines(), parse_options(OPTIONS, path="site.opt"))
    assert warnings == [
        "site.opt:3: INCLUDE GROUP painters: mondrian beyond USER_BASED=2 of paint 1.0: ignored",
        "site.opt:4: INCLUDE HOST bigbrush names no user: it admits no one to USER_BASED paint 1.0",
        "site.opt:6: INCLUDE HOST 10.1.*.*: 10.1.*.*: HOST_BASED sketch 1.0 counts hosts by name, "
        "not address: ignored",
    ]


def test_users_on_the_line_narrow_the_names_and_includeall_names_too() -> None:
    text = "FEATURE paint demo 1.0 permanent 4 USER_BASED USERS=ann,bob\n"
    options = parse_options("INCLUDEALL USER ann\nINCLUDE paint USER carol\n", path="o")
    (paint,), warnings = restrict(lines(text), options)
    assert paint.users == frozenset({"ann"}) and warnings == []


def test_a_reload_applies_the_new_names_on_every_node_alike() -> None:
    ledger = Ledger(lines(), lease=30.0, heartbeat=10.0)
    assert decide(ledger, "picasso", "ws1", "paint") == "not_included"
    options = parse_options(OPTIONS, path="site.opt")
    delta = ledger.reload_delta(lines(), options, NOW)
    ledger.apply(delta)
    assert decide(ledger, "picasso", "ws1", "paint") == "ok"
    replica = Ledger.from_snapshot(ledger.snapshot(), lease=30.0, heartbeat=10.0)
    assert decide(replica, "picasso", "ws1", "paint") == "ok"
    assert decide(replica, "mondrian", "ws1", "paint") == "not_included"


def test_a_license_without_such_lines_is_pooled_as_it_is() -> None:
    plain = (Entitlement("cad", "2.0", 2, None),)
    pooled, warnings = restrict(plain, Options("x"))
    assert pooled is not None and pooled[0] is plain[0] and warnings == []
