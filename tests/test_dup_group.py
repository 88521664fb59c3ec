"""Duplicate grouping (DUP_GROUP) in the ledger, the license file and the wire, with a fake
clock: which checkouts share a seat, how a group counts, and that it replicates exactly
(broker/dup.py, broker/ledger.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest

from tests.test_ledger import HEARTBEAT, LEASE, World, denied, ent, grant_of
from zbroker.broker.dup import key_of
from zbroker.broker.ledger import Ledger, LedgerError
from zbroker.broker.license import LicenseSyntaxError, parse_syntax
from zbroker.broker.model import Entitlement, Reason, Request
from zbroker.broker.options import parse_options
from zbroker.broker.wire import RemoteProtocolError, decode_request, pack
from zbroker.clients.protocol import parse_dup_mask

pytestmark = pytest.mark.unit

# The sessions of the mask tests: each differs from "base" in one name.
NAMES = {
    "base": ("ann", "ws1", ":0"),
    "user": ("bob", "ws1", ":0"),
    "host": ("ann", "ws2", ":0"),
    "display": ("ann", "ws1", ":1"),
    "vendor": ("ann", "ws1", ":0"),  # same names, another vendor string
}


def line(count: int = 4, mask: str | None = None, version: str = "2.0") -> Entitlement:
    return dataclasses.replace(ent(version, count), dup_group=mask)


def world(*lines: Entitlement, options: str | None = None) -> World:
    opts = None if options is None else parse_options(options, path="site.opt")
    ledger = Ledger(list(lines) or [line()], lease=LEASE, heartbeat=HEARTBEAT, options=opts)
    w = World([], ledger)
    for sid, (user, host, display) in NAMES.items():
        w.send("open", sid, user=user, host=host, display=display, client_version="1")
    return w


def out(w: World, sid: str, count: int = 1, **kw: Any) -> Any:
    vendor = "other" if sid == "vendor" else "v1"
    return w.checkout(sid, count, vendor_string=kw.pop("vendor_string", vendor), **kw)


def lapse(w: World, sid: str) -> None:
    """Let ``sid``'s lease lapse while every other session renews its own."""
    for step in (LEASE / 2, LEASE / 2 + 0.1):
        w.advance(step)
        for other in NAMES:
            if other != sid:
                w.send("heartbeat", other)


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize(
    ("text", "mask"),
    [("UHD", "UHD"), ("dhu", "UHD"), ("U", "U"), ("VH", "HV"), ("site", "SITE"),
     ("NONE", "NONE"), ("uhdv", "UHDV")],
)  # fmt: skip
def test_masks_read_in_any_order_and_case(text: str, mask: str) -> None:
    assert parse_dup_mask(text) == mask


@pytest.mark.parametrize("text", ["", "UU", "X", "UHDX", "SITES", "U H"])
def test_a_bad_mask_says_what_a_mask_is(text: str) -> None:
    with pytest.raises(ValueError, match="NONE, SITE or letters of UHDV"):
        parse_dup_mask(text)


# Which of the other sessions share base's seat under each mask.
SHARES = {
    "U": {"host", "display", "vendor"},
    "H": {"user", "display", "vendor"},
    "D": {"user", "host", "vendor"},
    "V": {"user", "host", "display"},
    "UH": {"display", "vendor"},
    "UHD": {"vendor"},
    "UHDV": set(),
    "SITE": {"user", "host", "display", "vendor"},
    "NONE": set(),
}


@pytest.mark.parametrize("mask", sorted(SHARES))
@pytest.mark.parametrize("where", ["license", "request"])
def test_each_mask_groups_exactly_the_checkouts_that_match_under_it(mask: str, where: str) -> None:
    w = world(line(count=10, mask=mask if where == "license" else None))
    asked = {"dup": mask} if where == "request" else {}
    grant_of(out(w, "base", 1, **asked))
    for other in ("user", "host", "display", "vendor"):
        before = w.ledger.in_use("cad")
        grant_of(out(w, other, 1, **asked))
        shares = other in SHARES[mask]
        assert w.ledger.in_use("cad") == before + (0 if shares else 1), (mask, other)


def test_the_license_s_mask_wins_over_the_request_and_none_forbids_grouping() -> None:
    w = world(line(count=10, mask="NONE"))
    grant_of(out(w, "base", dup="SITE"))
    grant_of(out(w, "user", dup="SITE"))
    assert w.ledger.in_use("cad") == 2
    w = world(line(count=10, mask="UHD"))
    grant_of(out(w, "base", dup="SITE"))
    grant_of(out(w, "user", dup="SITE"))  # UHD from the license: bob is another user
    assert w.ledger.in_use("cad") == 2


def test_without_any_mask_nothing_is_grouped_and_grants_carry_no_key() -> None:
    w = world(line(count=10))
    grant_of(out(w, "base"))
    grant_of(out(w, "vendor"))
    assert w.ledger.in_use("cad") == 2
    assert all("dup" not in d for d in w.log if d["k"] == "grant")


# ---------------------------------------------------------------- counting


def test_a_full_pool_still_admits_a_member_of_an_existing_group() -> None:
    w = world(line(count=1, mask="U"))
    grant_of(out(w, "base"))
    grant_of(out(w, "host"))  # same user: the same seat
    assert w.ledger.in_use("cad") == 1
    denied(out(w, "user"), Reason.NO_SEATS)


def test_count_above_the_group_s_takes_the_difference_if_it_fits() -> None:
    w = world(line(count=4, mask="U"))
    grant_of(out(w, "base", 2))
    assert w.ledger.in_use("cad") == 2
    grant_of(out(w, "host", 1))  # within the group's 2
    assert w.ledger.in_use("cad") == 2
    grant_of(out(w, "display", 3))  # one more than the group holds
    assert w.ledger.in_use("cad") == 3
    grant_of(out(w, "user", 1))  # bob alone: the last free seat
    denied(out(w, "vendor", 5), Reason.NO_SEATS)  # 5 > the pool's 4
    detail = denied(out(w, "vendor", 4), Reason.NO_SEATS)  # needs 1 more: none free
    assert "cad" in detail
    assert w.ledger.in_use("cad") == 4


def test_the_group_shrinks_to_its_largest_member_and_the_last_frees_it() -> None:
    w = world(line(count=4, mask="U"))
    small = grant_of(out(w, "base", 1))["id"]
    big = grant_of(out(w, "host", 3))["id"]
    mid = grant_of(out(w, "display", 2))["id"]
    assert w.ledger.in_use("cad") == 3
    w.send("checkin", "host", grant=big)
    assert w.ledger.in_use("cad") == 2
    w.send("checkin", "display", grant=mid)
    assert w.ledger.in_use("cad") == 1
    w.send("close", "base")  # the last member: by its session's end
    assert w.ledger.in_use("cad") == 0
    assert small not in {g.id for g in w.ledger.grants()}


def test_a_member_asking_more_than_fits_waits_and_is_served_when_seats_free() -> None:
    w = world(line(count=3, mask="U"))
    grant_of(out(w, "base", 1))
    bob = grant_of(out(w, "user", 2))["id"]
    assert out(w, "host", 2, wait=600) is None  # needs 1 more: queued
    w.send("checkin", "user", grant=bob)
    granted = [d for d in w.tick() if d["k"] == "grant"]
    assert [(d["sid"], d["count"]) for d in granted] == [("host", 2)]
    assert w.ledger.in_use("cad") == 2


def test_a_member_whose_session_expires_frees_seats_as_the_group_shrinks() -> None:
    w = world(line(count=2))
    grant_of(out(w, "base", 2, dup="U"))  # ann's group holds 2
    grant_of(out(w, "host", 1, dup="U"))
    assert out(w, "user", 1, wait=600) is None  # bob (in no group) waits: all taken
    lapse(w, "base")
    deltas = w.tick()
    assert [d["k"] for d in deltas] == ["expire", "grant"]
    assert deltas[1]["sid"] == "user" and w.ledger.in_use("cad") == 2


def test_a_waiting_member_is_judged_at_the_tick_after_others_expire() -> None:
    w = world(line(count=3, mask="U"))
    grant_of(out(w, "base", 2))  # ann's group holds 2
    grant_of(out(w, "user", 1))  # bob: the pool is full
    assert out(w, "host", 3, wait=600) is None  # ann's group would need 1 more
    lapse(w, "user")  # bob's
    assert [d["k"] for d in w.tick()] == ["expire"]  # groups are judged on what is applied
    assert [(d["k"], d["sid"]) for d in w.tick()] == [("grant", "host")]
    assert w.ledger.in_use("cad") == 3


# ---------------------------------------------------------------- the options file


def test_max_counts_a_group_once() -> None:
    w = world(line(count=10, mask="U"), options="MAX 1 cad USER ann\n")
    grant_of(out(w, "base"))
    grant_of(out(w, "host"))  # ann's second checkout shares the seat: still 1
    grant_of(out(w, "display"))
    denied(out(w, "host", 2), Reason.MAX_REACHED)  # would make ann's group 2
    assert w.ledger.in_use("cad") == 1


def test_reserve_counts_a_group_once() -> None:
    w = world(line(count=3, mask="U"), options="RESERVE 1 cad USER bob\n")
    grant_of(out(w, "base"))
    grant_of(out(w, "host"))  # ann's group: 1 seat
    grant_of(out(w, "display", 2))  # grows to 2: the 3rd seat is bob's
    assert w.ledger.in_use("cad") == 2
    denied(out(w, "host", 3), Reason.RESERVED)  # one more for ann's group: bob's seat
    grant_of(out(w, "user"))
    assert w.ledger.in_use("cad") == 3


def test_an_excluded_user_cannot_join_a_group() -> None:
    w = world(line(count=10, mask="H"), options="EXCLUDE cad USER bob\n")
    grant_of(out(w, "base"))
    denied(out(w, "user"), Reason.EXCLUDED)


# ---------------------------------------------------------------- replication


def test_apply_refuses_a_member_that_would_over_allocate() -> None:
    w = world(line(count=2, mask="U"))
    grant_of(out(w, "base", 1))
    grant_of(out(w, "user", 1))
    key = key_of("U", "ann", "", "", "")
    before = w.ledger.snapshot()
    bad = {"k": "grant", "sid": "host", "req": 50, "ack": 0, "grant": w.ledger.next_grant,
           "feature": "cad", "version": "2.0", "count": 2, "at": w.wall, "dup": key}  # fmt: skip
    with pytest.raises(LedgerError, match="over-allocate"):
        w.ledger.apply(bad)
    assert w.ledger.snapshot() == before
    bad["count"] = 1  # within the group's seat: fits
    w.ledger.apply(bad)
    assert w.ledger.in_use("cad") == 2


def test_groups_replicate_and_survive_a_snapshot() -> None:
    w = world(line(count=4, mask="U"))
    ids = [grant_of(out(w, sid, n))["id"] for sid, n in (("base", 1), ("host", 2), ("user", 1))]
    wire = msgpack.unpackb(msgpack.packb(w.ledger.snapshot()), raw=False, strict_map_key=True)
    again = Ledger.from_snapshot(wire, lease=LEASE, heartbeat=HEARTBEAT)
    assert again.snapshot() == w.ledger.snapshot() and again.in_use("cad") == 3
    backup = Ledger([], lease=LEASE, heartbeat=HEARTBEAT)
    backup.apply(w.ledger.reload_delta(w.ledger.entitlements))
    for delta in w.log:
        backup.apply(msgpack.unpackb(msgpack.packb(delta), raw=False, strict_map_key=True))
    assert backup.snapshot() == w.ledger.snapshot() and backup.in_use("cad") == 3
    holders, _ = again.holders("cad", 0, 10)
    sharers = {h["grant"]: h.get("sharers") for h in holders}
    assert sharers == {ids[0]: ids[:2], ids[1]: ids[:2], ids[2]: ids[2:]}  # bob alone
    assert again.status()[0]["in_use"] == 3


def test_a_reload_delta_carries_the_mask() -> None:
    w = world(line(count=4, mask="UHD"))
    delta = w.ledger.reload_delta(w.ledger.entitlements)
    assert delta["entitlements"][0]["dup_group"] == "UHD"
    backup = Ledger([], lease=LEASE, heartbeat=HEARTBEAT)
    backup.apply(msgpack.unpackb(msgpack.packb(delta), raw=False, strict_map_key=True))
    assert backup.entitlements == w.ledger.entitlements
    delta["entitlements"][0]["dup_group"] = "XYZ"
    with pytest.raises(LedgerError, match="dup_group"):
        backup.apply(delta)


# ---------------------------------------------------------------- files and wire


def test_dup_group_on_a_license_line_is_read_and_a_bad_one_refused_with_its_place() -> None:
    text = "FEATURE cad acme 2.0 permanent 4 DUP_GROUP=uhd SIGN=00\n"
    parsed = parse_syntax(text, path="site.lic", servers_required=False)
    assert parsed.lines[0].attrs["DUP_GROUP"] == "uhd"  # signed as written
    assert parsed.lines[0].entitlement("site.lic").dup_group == "UHD"
    with pytest.raises(LicenseSyntaxError) as err:
        parse_syntax(text.replace("uhd", "uhq"), path="site.lic", servers_required=False)
    assert "site.lic:1:" in str(err.value) and "DUP_GROUP=NONE, SITE" in str(err.value)


def test_the_wire_reads_dup_and_vendor_string_of_a_checkout() -> None:
    base = {"v": 1, "op": "checkout", "sid": "s", "req": 1, "feature": "cad"}
    request = decode_request(pack({**base, "dup": "hu", "vendor_string": "x"}))
    assert (request.dup, request.vendor_string) == ("UH", "x")
    assert decode_request(pack(base)).dup is None
    with pytest.raises(RemoteProtocolError, match="dup"):
        decode_request(pack({**base, "dup": "UQ"}))
    assert Request("checkout").dup is None


def test_a_member_of_a_group_never_lingers() -> None:
    w = world(line(count=4, mask="U"), options="LINGER cad 3600\n")
    first = grant_of(out(w, "base"))["id"]
    second = grant_of(out(w, "host"))["id"]
    w.send("checkin", "base", grant=first)
    w.send("checkin", "host", grant=second)
    assert w.ledger.in_use("cad") == 0 and w.ledger.status()[0]["lingering"] == 0


def test_an_expiring_member_of_a_group_that_stays_frees_no_seat_for_a_waiter() -> None:
    w = world(line(count=2))
    grant_of(out(w, "base", dup="U"))
    grant_of(out(w, "host", dup="U"))  # ann's group: one seat
    grant_of(out(w, "user"))  # bob, in no group: the pool is full
    assert out(w, "vendor", wait=600) is None  # waits, in no group
    lapse(w, "base")
    assert [d["k"] for d in w.tick()] == ["expire"]  # ann's group still holds its seat
    assert w.ledger.in_use("cad") == 2
