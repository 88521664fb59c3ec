"""The options file's decisions (broker/policy.py), on FlexNet's own examples.

Each case quotes an example of FlexNet Publisher's License Administration Guide
(docs.revenera.com/fnp/<release>/LicAdmin_Guide, the page named in the case; older
copies as the FLEXnet Licensing End User Guide, chapter 5 "The Options File") and
shows zbroker's allow/deny decision and reason for it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import pytest

from zbroker.broker.model import Entitlement, Reason
from zbroker.broker.options import parse_options
from zbroker.broker.policy import Holding, Policy, Principal, choose_under
from zbroker.broker.seats import Catalog, Choice, Denial
from zbroker.clients.protocol import parse_version

pytestmark = pytest.mark.unit

V1, V2 = parse_version("1.0"), parse_version("2.0")


def policy(text: str, **kw: float) -> Policy:
    return Policy(parse_options(text, path="site.opt"), **kw)


def who(user: str, host: str = "ws1", **kw: str) -> Principal:
    return Principal(user, host, **kw)


@dataclass(frozen=True)
class Admission:
    page: str  # where in FlexNet's guide the option lines come from
    options: str
    principal: Principal
    feature: str
    reason: str | None  # None: allowed
    version: tuple[int, ...] = V1


ADMISSIONS = [
    # EXCLUDE page: "EXCLUDE f1 USER hank"
    Admission("EXCLUDE", "EXCLUDE f1 USER hank", who("hank"), "f1", Reason.EXCLUDED),
    Admission("EXCLUDE", "EXCLUDE f1 USER hank", who("bob"), "f1", None),
    Admission("EXCLUDE", "EXCLUDE f1 USER hank", who("hank"), "f2", None),
    # INCLUDE page: "INCLUDE f1 USER bob"
    Admission("INCLUDE", "INCLUDE f1 USER bob", who("bob"), "f1", None),
    Admission("INCLUDE", "INCLUDE f1 USER bob", who("frank"), "f1", Reason.NOT_INCLUDED),
    Admission("INCLUDE", "INCLUDE f1 USER bob", who("frank"), "f2", None),
    # INCLUDEALL page: "INCLUDEALL USER jane"; the include list is made of all
    # INCLUDEALL and INCLUDE lines
    Admission("INCLUDEALL", "INCLUDEALL USER jane", who("jane"), "f9", None),
    Admission("INCLUDEALL", "INCLUDEALL USER jane", who("joe"), "f9", Reason.NOT_INCLUDED),
    Admission("INCLUDEALL", "INCLUDEALL USER jane\nINCLUDE f1 USER joe", who("joe"), "f1", None),
    # Rules of Precedence: "The EXCLUDE list is checked before the INCLUDE list;
    # someone who is on both lists is not allowed to use the feature."
    Admission(
        "Rules of Precedence",
        "INCLUDE f1 USER bob\nEXCLUDE f1 USER bob",
        who("bob"),
        "f1",
        Reason.EXCLUDED,
    ),
    Admission("Rules of Precedence", "", who("anyone"), "f1", None),  # neither list
    # GROUP page: "GROUP Hackers bob howard james"; EXCLUDEALL page, with a group
    Admission(
        "GROUP, EXCLUDEALL",
        "GROUP Hackers bob howard james\nEXCLUDEALL GROUP Hackers",
        who("howard"),
        "f7",
        Reason.EXCLUDED,
    ),
    Admission(
        "GROUP, EXCLUDEALL",
        "GROUP Hackers bob howard james\nEXCLUDEALL GROUP Hackers",
        who("Howard"),
        "f7",
        None,
    ),  # group members are case-sensitive by default
    # GROUPCASEINSENSITIVE page: ON makes the GROUP's user names case-insensitive
    Admission(
        "GROUPCASEINSENSITIVE",
        "GROUPCASEINSENSITIVE ON\nGROUP Hackers bob howard james\nEXCLUDEALL GROUP Hackers",
        who("Howard"),
        "f7",
        Reason.EXCLUDED,
    ),
    # Type Specification: "GROUP stars joe barbara susan" / "EXCLUDE coolsoft GROUP stars"
    Admission(
        "Specifying License Restrictions Using Type",
        "GROUP stars joe barbara susan\nEXCLUDE coolsoft GROUP stars",
        who("susan"),
        "coolsoft",
        Reason.EXCLUDED,
    ),
    # The Type Specification example above, its group written with the alias USER_GROUP
    Admission(
        "GROUP: USER_GROUP",
        "USER_GROUP stars joe barbara susan\nEXCLUDE coolsoft GROUP stars",
        who("joe"),
        "coolsoft",
        Reason.EXCLUDED,
    ),
    # HOST_GROUP page: "HOST_GROUP Pacific tokyo seattle auckland"; "anywhere a host
    # name can be used in an options file, an IP address can be used instead"
    Admission(
        "HOST_GROUP",
        "HOST_GROUP Pacific tokyo seattle auckland\nINCLUDE f1 HOST_GROUP Pacific",
        who("ann", "seattle"),
        "f1",
        None,
    ),
    Admission(
        "HOST_GROUP",
        "HOST_GROUP Pacific tokyo seattle auckland\nINCLUDE f1 HOST_GROUP Pacific",
        who("ann", "oslo"),
        "f1",
        Reason.NOT_INCLUDED,
    ),
    Admission(
        "HOST_GROUP",
        "HOST_GROUP Pacific tokyo 10.2.*.*\nINCLUDE f1 HOST_GROUP Pacific",
        who("ann", "oslo", address="10.2.7.9"),
        "f1",
        None,
    ),
    # Type Specification: HOST "the IP-address can contain wildcard characters";
    # INTERNET "IP address of the machine ... (wildcard characters can be used)"
    Admission(
        "Type: HOST",
        "EXCLUDE f1 HOST 192.168.1.*",
        who("a", "x", address="192.168.1.20"),
        "f1",
        Reason.EXCLUDED,
    ),
    Admission(
        "Type: INTERNET",
        "INCLUDE f1 INTERNET 192.168.*.*",
        who("a", "x", address="10.0.0.1"),
        "f1",
        Reason.NOT_INCLUDED,
    ),
    Admission(
        "Type: INTERNET",
        "INCLUDE f1 INTERNET 192.168.*.*",
        who("a", "x", address="192.168.3.4"),
        "f1",
        None,
    ),
    # Type: DISPLAY and PROJECT (LM_PROJECT there, ZBROKER_PROJECT here)
    Admission(
        "Type: DISPLAY", "EXCLUDE f1 DISPLAY :0", who("a", display=":0"), "f1", Reason.EXCLUDED
    ),
    Admission("Type: PROJECT", "INCLUDE f1 PROJECT apollo", who("a", project="apollo"), "f1", None),
    Admission(
        "Type: PROJECT",
        "INCLUDE f1 PROJECT apollo",
        who("a", project="gemini"),
        "f1",
        Reason.NOT_INCLUDED,
    ),
    # Specifying Features: feature[:keyword=value] names a group of licenses (a pool)
    Admission(
        "Specifying Features",
        "EXCLUDE f1:VERSION=2.0 USER hank",
        who("hank"),
        "f1",
        Reason.EXCLUDED,
        V2,
    ),
    Admission(
        "Specifying Features", "EXCLUDE f1:VERSION=2.0 USER hank", who("hank"), "f1", None, V1
    ),
    # Simple Options File Example: "EXCLUDE compile USER lori"
    Admission(
        "Simple Options File Example",
        "RESERVE 1 compile USER robert\nRESERVE 3 compile HOST mainline\n"
        "EXCLUDE compile USER lori\nNOLOG QUEUED",
        who("lori"),
        "compile",
        Reason.EXCLUDED,
    ),
]


@pytest.mark.parametrize("case", ADMISSIONS, ids=lambda c: f"{c.page}:{c.principal.user}")
def test_admission_as_flexnet_decides(case: Admission) -> None:
    refusal = policy(case.options).admits(case.principal, case.feature, case.version)
    assert (refusal.reason if refusal else None) == case.reason, refusal
    if refusal is not None:
        assert "site.opt" in refusal.detail  # the detail names the file and line


def test_an_exclusion_detail_says_who_and_which_line() -> None:
    refusal = policy("\n\nEXCLUDE f1 USER hank").admits(who("hank"), "f1", V1)
    assert refusal is not None
    assert refusal.detail == "user 'hank' may not use f1: EXCLUDE f1 USER hank (site.opt:3)"


def test_a_host_line_matched_by_address_names_the_address() -> None:
    # FlexNet's HOST type takes an IP address too: the detail must show what matched,
    # not only the host name the client gave.
    refusal = policy("EXCLUDE f1 HOST 10.1.2.3").admits(who("ann", address="10.1.2.3"), "f1", V1)
    assert refusal is not None
    assert refusal.detail == (
        "host 'ws1' (address 10.1.2.3) may not use f1: EXCLUDE f1 HOST 10.1.2.3 (site.opt:1)"
    )


@pytest.mark.parametrize(
    ("options", "where"),
    [
        ("INCLUDE f1 USER bob", "(site.opt line 1)"),
        ("INCLUDE f1 USER bob\nINCLUDE f1 USER ann", "(site.opt lines 1, 2)"),
    ],
)
def test_an_include_refusal_names_its_line_or_lines(options: str, where: str) -> None:
    refusal = policy(options).admits(who("frank"), "f1", V1)
    assert refusal is not None
    assert refusal.detail.endswith(f"is not on the INCLUDE list of f1 {where}")


# --- counts ----------------------------------------------------------------------------


def held(*grants: tuple[Principal, int] | tuple[Principal, int, tuple[int, ...]]) -> list[Holding]:
    """Holdings of (principal, seats[, version]); version 1.0 when left out."""
    return [(g[0], g[2] if len(g) == 3 else V1, g[1]) for g in grants]


def test_reserve_one_for_mel() -> None:
    # RESERVE page: "RESERVE 1 f1 USER mel" -- others see the seat as taken
    p = policy("RESERVE 1 f1 USER mel")
    room = p.room(who("bob"), "f1", V1, total=3, used=2, holdings=held((who("ann"), 2)))
    assert room.seats == 0 and room.refusal is not None
    assert room.refusal.reason == Reason.RESERVED
    assert "RESERVE 1 f1 USER mel (site.opt:1)" in room.refusal.detail
    assert p.room(who("mel"), "f1", V1, 3, 2, held((who("ann"), 2))).seats == 1
    # once mel holds the seat, the reservation is filled: the rest is everyone's
    hs = held((who("mel"), 1))
    assert p.room(who("bob"), "f1", V1, 3, 1, hs).seats == 2


def test_the_simple_options_file_example() -> None:
    # "Reserves one license for the feature compile for the user robert; reserves three
    # licenses for compile for anyone on the system with the host name mainline;
    # prevents the user lori from using compile; NOLOG QUEUED" (ignored, reported)
    p = policy(
        "RESERVE 1 compile USER robert\nRESERVE 3 compile HOST mainline\n"
        "EXCLUDE compile USER lori\nNOLOG QUEUED"
    )
    assert p.options.warnings() == ["site.opt:4: NOLOG is not implemented by zbroker: ignored"]
    total = 5
    assert p.room(who("ann"), "compile", V1, total, 0, []).seats == 1
    assert p.room(who("robert"), "compile", V1, total, 0, []).seats == 2
    assert p.room(who("ann", "mainline"), "compile", V1, total, 0, []).seats == 4
    assert p.room(who("robert", "mainline"), "compile", V1, total, 0, []).seats == 5
    one = held((who("ann"), 1))
    assert p.room(who("cid"), "compile", V1, total, 1, one).refusal is not None


def test_reservations_are_honoured_in_file_order_up_to_the_count() -> None:
    p = policy("RESERVE 2 f1 USER ann\nRESERVE 2 f1 USER bob\nRESERVE 2 f1 USER cid")
    # 3 seats: ann keeps 2, bob the 1 left, cid none
    assert p.room(who("cid"), "f1", V1, 3, 0, []).seats == 0
    assert p.room(who("bob"), "f1", V1, 3, 0, []).seats == 1
    assert p.room(who("ann"), "f1", V1, 3, 0, []).seats == 2


def test_a_reservation_per_pool_as_flexnet_counts_it() -> None:
    # Flexera KB "Using the RESERVE keyword with multiple licensing pools": without a
    # qualifier each pool of the feature keeps the count; with :VERSION= only that one.
    p = policy("GROUP FLEXERA_USERS user1 user2 user3\nRESERVE 2 group_lic GROUP FLEXERA_USERS")
    v29 = parse_version("2.9")
    assert p.room(who("x"), "group_lic", V1, 12, 0, []).seats == 10
    assert p.room(who("x"), "group_lic", v29, 5, 0, []).seats == 3
    q = policy("GROUP G user1\nRESERVE 2 group_lic:VERSION=2.9 GROUP G")
    assert q.room(who("x"), "group_lic", V1, 12, 0, []).seats == 12
    assert q.room(who("x"), "group_lic", v29, 5, 0, []).seats == 3


def test_overlapping_reservations_are_filled_the_way_that_fills_most() -> None:
    # bob is in eng and has a reservation of his own: whatever the order, ann (eng)
    # still gets the eng seat while bob holds one.
    p = policy("GROUP eng ann bob\nRESERVE 1 f1 GROUP eng\nRESERVE 1 f1 USER bob")
    hs = held((who("bob"), 1))
    assert p.room(who("ann"), "f1", V1, 2, 1, hs).seats == 1
    assert p.room(who("cid"), "f1", V1, 2, 1, hs).seats == 0


def test_max_five_for_jan() -> None:
    # MAX page: "MAX 5 f1 USER jan"
    p = policy("MAX 5 f1 USER jan")
    hs = held((who("jan"), 3), (who("ann"), 4))
    assert p.room(who("jan"), "f1", V1, 10, 7, hs).seats == 2
    assert p.room(who("ann"), "f1", V1, 10, 7, hs).seats == 3
    full = held((who("jan"), 5))
    room = p.room(who("jan"), "f1", V1, 10, 5, full)
    assert room.seats == 0 and room.refusal is not None
    assert room.refusal.reason == Reason.MAX_REACHED
    assert (
        room.refusal.detail
        == "user jan holds 5 of f1, the most MAX 5 f1 USER jan (site.opt:1) allows"
    )


def test_max_on_a_group_caps_the_groups_total() -> None:
    # MAX page: "When this option is used for a group, it limits the usage for an entire
    # group, not just individual users within that group."
    p = policy("GROUP eng ann bob\nMAX 3 f1 GROUP eng")
    hs = held((who("ann"), 2), (who("bob"), 1))
    assert p.room(who("bob"), "f1", V1, 10, 3, hs).seats == 0
    assert p.room(who("cid"), "f1", V1, 10, 3, hs).seats == 7


def test_max_all_users_and_all_groups() -> None:
    # MAX page: "USER ALL_USERS" / "GROUP ALL_GROUPS" apply the cap to each one; a line
    # naming a user or group is that one's cap (whatever the order)
    p = policy(
        "GROUP eng ann bob\nGROUP ops cid\nMAX 1 f1 USER ALL_USERS\nMAX 4 f1 USER ann\n"
        "MAX 2 f1 GROUP ALL_GROUPS"
    )
    assert p.room(who("dan"), "f1", V1, 10, 0, held((who("dan"), 1))).seats == 0
    assert p.room(who("ann"), "f1", V1, 10, 1, held((who("ann"), 1))).seats == 1  # eng: 2
    assert p.room(who("bob"), "f1", V1, 10, 2, held((who("ann"), 2))).seats == 0  # eng full
    assert p.room(who("cid"), "f1", V1, 10, 2, held((who("ann"), 2))).seats == 1


def test_max_without_a_version_counts_every_pool() -> None:
    p = policy("MAX 2 f1 USER jan\nMAX 1 f1:VERSION=2.0 USER ann")
    hs = held((who("jan"), 1, V1), (who("jan"), 1, V2), (who("ann"), 1, V1))
    assert p.room(who("jan"), "f1", V2, 10, 1, hs).seats == 0
    assert p.room(who("ann"), "f1", V2, 10, 1, hs).seats == 1  # the 1.0 seat is not 2.0's


def test_no_count_lines_need_no_holdings() -> None:
    p = policy("EXCLUDE f1 USER hank\nTIMEOUT f1 3600")
    assert not p.counts("f1")
    assert p.room(who("ann"), "f1", V1, 4, 1, []).seats == 3


def test_timeout_and_timeoutall_with_the_floor() -> None:
    # TIMEOUT page: "TIMEOUT f1 3600"; a value under the publisher's minimum is raised
    # to it (900 s here, min_timeout); TIMEOUTALL "same as TIMEOUT, but applies to all"
    p = policy("TIMEOUT f1 3600\nTIMEOUTALL 7200\nTIMEOUT f2 60\nTIMEOUT f3:VERSION=2.0 1000")
    assert p.timeout("f1", V1) == 3600
    assert p.timeout("f9", V1) == 7200
    assert p.timeout("f2", V1) == 900
    assert p.timeout("f3", V2) == 1000 and p.timeout("f3", V1) == 7200
    assert policy("TIMEOUT f2 60", min_timeout=30).timeout("f2", V1) == 60
    assert policy("").timeout("f1", V1) is None  # without a TIMEOUT line nothing times out


def test_linger() -> None:
    # LINGER page: "LINGER f1 3600"
    p = policy("LINGER f1 3600\nLINGER f1:VERSION=2.0 60")
    assert p.linger("f1", V1) == 3600
    assert p.linger("f1", V2) == 60
    assert p.linger("f2", V1) is None


# --- the checkout under the options file ------------------------------------------------

DAY = datetime.date(2026, 6, 1)
CATALOG = Catalog([Entitlement("cad", "1.0", 2, None), Entitlement("cad", "2.0", 2, None)])


def decide(
    text: str | None, principal: Principal, count: int = 1, grants: list[Holding] | None = None
) -> Choice | Denial:
    hs = grants or []
    asked: list[int] = []

    def used(key: tuple[str, tuple[int, ...]]) -> int:
        return sum(n for _, v, n in hs if v == key[1])

    def holdings() -> list[Holding]:
        asked.append(1)
        return hs

    p = None if text is None else policy(text)
    got = choose_under(p, CATALOG, "cad", None, count, principal, DAY, used, holdings)
    assert len(asked) <= 1  # the holdings are gathered once at most
    if p is not None and not p.counts("cad"):
        assert not asked  # and not at all without a MAX or RESERVE line
    return got


def test_choose_under_no_options_is_the_licenses_choice() -> None:
    got = decide(None, who("ann"))
    assert isinstance(got, Choice) and got.pool.version == "1.0"


def test_choose_under_an_exclusion_denies_at_once() -> None:
    got = decide("EXCLUDE cad USER hank", who("hank"))
    assert isinstance(got, Denial) and got.reason == Reason.EXCLUDED and not got.busy
    got = decide("INCLUDE cad USER bob", who("ann"))
    assert isinstance(got, Denial) and got.reason == Reason.NOT_INCLUDED and not got.busy
    got = decide("INCLUDE cad USER bob\nEXCLUDE cad:VERSION=2.0 USER ann", who("ann"))
    assert isinstance(got, Denial) and got.reason == Reason.EXCLUDED  # EXCLUDE first


def test_choose_under_a_pool_excluded_leaves_the_others() -> None:
    got = decide("EXCLUDE cad:VERSION=1.0 USER hank", who("hank"))
    assert isinstance(got, Choice) and got.pool.version == "2.0"


def test_choose_under_reserved_seats_are_skipped_then_waited_for() -> None:
    text = "RESERVE 2 cad:VERSION=1.0 USER mel"
    got = decide(text, who("ann"))
    assert isinstance(got, Choice) and got.pool.version == "2.0"
    full = held((who("bob"), 2, V2))
    got = decide(text, who("ann"), grants=full)
    assert isinstance(got, Denial) and got.reason == Reason.RESERVED and got.busy
    got = decide(text, who("mel"), grants=full)
    assert isinstance(got, Choice) and got.pool.version == "1.0"


def test_choose_under_max_reached_is_not_busy() -> None:
    got = decide("MAX 1 cad USER ann", who("ann"), grants=held((who("ann"), 1, V1)))
    assert isinstance(got, Denial) and got.reason == Reason.MAX_REACHED and not got.busy


def test_choose_under_full_pools_are_the_licenses_no_seats() -> None:
    full = held((who("bob"), 2, V1), (who("bob"), 2, V2))
    got = decide("MAX 9 cad USER ann", who("ann"), grants=full)
    assert isinstance(got, Denial) and got.reason == Reason.NO_SEATS and got.busy
