"""Hypothesis: random options files and request sequences against a model ledger.

The machine writes a random options file (GROUP, HOST_GROUP, INCLUDE/EXCLUDE(ALL),
RESERVE, MAX with and without :VERSION=, ALL_USERS/ALL_GROUPS), parses it, and plays
checkouts and checkins of random principals against a small ledger of its own that
grants only what ``Policy.admits`` and ``Policy.room`` allow. After every step it
checks, with its own brute-force reading of the lines (not the policy's):

- in use never exceeds a pool's total;
- every MAX cap holds;
- seats held by principals on no reservation never eat into reserved seats;
- a reservation is always available to its principal: one who may use the pool, is
  under every MAX cap, and whose reservation's principals together hold less than it
  keeps, can always check out one seat.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import partial

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from zbroker.broker.options import OptionLine, Options, parse_options
from zbroker.broker.policy import Holding, Policy, Principal
from zbroker.clients.protocol import parse_version

pytestmark = pytest.mark.unit

POOLS = {"1.0": parse_version("1.0"), "2.0": parse_version("2.0")}
GROUPS = {"eng": ("ann", "bob"), "ops": ("bob", "cid")}
HOST_GROUPS = {"lab": ("h1",)}
PEOPLE = [
    Principal(user, host, address=address)
    for user, (host, address) in itertools.product(
        ["ann", "bob", "cid", "dan"], [("h1", "10.0.0.1"), ("h2", "10.0.1.2")]
    )
]
PRINCIPALS = [
    ("USER", "ann"), ("USER", "bob"), ("USER", "dan"), ("HOST", "h2"), ("INTERNET", "10.0.0.*"),
    ("GROUP", "eng"), ("GROUP", "ops"), ("HOST_GROUP", "lab"),
]  # fmt: skip


def feature_word(version: str | None) -> str:
    return "cad" if version is None else f"cad:VERSION={version}"


def rule_line() -> st.SearchStrategy[str]:
    principal = st.sampled_from(PRINCIPALS).map(lambda p: f"{p[0]} {p[1]}")
    version = st.sampled_from([None, None, "1.0", "2.0"]).map(feature_word)
    count = st.integers(0, 4)
    return st.one_of(
        st.builds(lambda n, f, w: f"RESERVE {n} {f} {w}", count, version, principal),
        st.builds(lambda n, f, w: f"MAX {n} {f} {w}", count, version, principal),
        st.builds(lambda n, f: f"MAX {n} {f} USER ALL_USERS", count, version),
        st.builds(lambda n, f: f"MAX {n} {f} GROUP ALL_GROUPS", count, version),
        st.builds(lambda f, w: f"EXCLUDE {f} {w}", version, principal),
        st.builds(lambda f, w: f"INCLUDE {f} {w}", version, principal),
        principal.map(lambda w: f"INCLUDEALL {w}"),
        st.just("NOLOG QUEUED"),
    )


def options_text(lines: list[str]) -> str:
    head = [f"GROUP {g} {' '.join(m)}" for g, m in GROUPS.items()]
    head += [f"HOST_GROUP {g} {' '.join(m)}" for g, m in HOST_GROUPS.items()]
    return "\n".join(head + lines) + "\n"


def is_named(ln: OptionLine, p: Principal) -> bool:
    """The test's own reading of a line's principal (ALL_* aside)."""
    kind, name = ln.kind, ln.name or ""
    return {
        "USER": p.user == name,
        "HOST": p.host == name,
        "INTERNET": p.address.startswith(name.rstrip("*")),
        "GROUP": p.user in GROUPS.get(name, ()),
        "HOST_GROUP": p.host in HOST_GROUPS.get(name, ()),
    }[kind or ""]


def user_in(members: tuple[str, ...], p: Principal) -> bool:
    return p.user in members


def in_scope(ln: OptionLine, version: str) -> bool:
    return ln.version is None or ln.version == version


Held = tuple[Principal, str, int]  # who holds, the pool's version ("1.0", "2.0"), seats


def held_by(grants: list[Held], version: str | None, test: Callable[[Principal], bool]) -> int:
    return sum(n for p, v, n in grants if (version is None or v == version) and test(p))


def caps_of(
    options: Options, grants: list[Held], p: Principal, version: str
) -> list[tuple[OptionLine, int]]:
    """(line, held now) of every MAX cap that applies to ``p`` in pool ``version``: the
    test's own reading of MAX, ALL_USERS and ALL_GROUPS (a named line is its one's cap)."""
    out = []
    lines = [ln for ln in options.lines if ln.keyword == "MAX" and in_scope(ln, version)]
    for ln in lines:
        named_user = any(
            m.kind == "USER" and m.name == p.user and m.version == ln.version for m in lines
        )
        if ln.kind == "USER" and ln.name == "ALL_USERS":
            if not named_user:
                out.append((ln, held_by(grants, ln.version, lambda q: q.user == p.user)))
        elif ln.kind == "GROUP" and ln.name == "ALL_GROUPS":
            for g, members in GROUPS.items():
                named = any(
                    m.kind == "GROUP" and m.name == g and m.version == ln.version for m in lines
                )
                if p.user in members and not named:
                    out.append((ln, held_by(grants, ln.version, partial(user_in, members))))
        elif is_named(ln, p):
            out.append((ln, held_by(grants, ln.version, partial(is_named, ln))))
    return out


def kept_of(options: Options, total: int, version: str) -> list[tuple[OptionLine, int]]:
    """Reservations of the pool ``version`` of ``total`` seats, in file order up to it."""
    left, out = total, []
    for ln in options.lines:
        if ln.keyword == "RESERVE" and in_scope(ln, version):
            n = min(ln.number or 0, left)
            left -= n
            if n:
                out.append((ln, n))
    return out


class PolicyMachine(RuleBasedStateMachine):
    @initialize(
        lines=st.lists(rule_line(), max_size=8),
        totals=st.tuples(st.integers(0, 5), st.integers(0, 5)),
    )
    def setup(self, lines: list[str], totals: tuple[int, int]) -> None:
        self.options = parse_options(options_text(lines), path="h.opt")
        self.policy = Policy(self.options)
        self.totals = dict(zip(POOLS, totals, strict=True))
        self.grants: list[tuple[Principal, str, int]] = []  # (who, pool version, seats)

    def holdings(self) -> list[Holding]:
        return [(p, POOLS[v], n) for p, v, n in self.grants]

    def used(self, version: str) -> int:
        return sum(n for _, v, n in self.grants if v == version)

    def may(self, p: Principal, version: str, count: int) -> bool:
        if self.policy.admits(p, "cad", POOLS[version]) is not None:
            return False
        room = self.policy.room(
            p, "cad", POOLS[version], self.totals[version], self.used(version), self.holdings()
        )
        if room.seats < self.totals[version] - self.used(version):
            assert room.refusal is not None  # held back: it must say why
        return count <= room.seats

    @rule(
        who=st.sampled_from(PEOPLE), version=st.sampled_from(list(POOLS)), count=st.integers(1, 2)
    )
    def checkout(self, who: Principal, version: str, count: int) -> None:
        if self.may(who, version, count):
            self.grants.append((who, version, count))

    @rule(data=st.data())
    def checkin(self, data: st.DataObject) -> None:
        if self.grants:
            self.grants.pop(data.draw(st.integers(0, len(self.grants) - 1)))

    # ------------------------------------------------------------ invariants

    @invariant()
    def in_use_never_exceeds_a_count(self) -> None:
        for version, total in self.totals.items():
            assert self.used(version) <= total

    def caps(self, p: Principal, version: str) -> list[tuple[OptionLine, int]]:
        return caps_of(self.options, self.grants, p, version)

    @invariant()
    def max_caps_hold(self) -> None:
        for p, version, _ in self.grants:
            for ln, held in self.caps(p, version):
                assert held <= (ln.number or 0), (ln, held)

    def kept(self, version: str) -> list[tuple[OptionLine, int]]:
        return kept_of(self.options, self.totals[version], version)

    @invariant()
    def outsiders_never_take_reserved_seats(self) -> None:
        for version, total in self.totals.items():
            kept = self.kept(version)
            outside = sum(
                n
                for p, v, n in self.grants
                if v == version and not any(is_named(ln, p) for ln, _ in kept)
            )
            assert outside <= total - sum(n for _, n in kept)

    @invariant()
    def a_reservation_is_always_available_to_its_principal(self) -> None:
        for version in POOLS:
            for ln, n in self.kept(version):
                theirs = sum(k for p, v, k in self.grants if v == version and is_named(ln, p))
                if theirs >= n:
                    continue
                for p in PEOPLE:
                    if not is_named(ln, p):
                        continue
                    if self.policy.admits(p, "cad", POOLS[version]) is not None:
                        continue
                    if any(held + 1 > (cap.number or 0) for cap, held in self.caps(p, version)):
                        continue
                    assert self.may(p, version, 1), (ln, p, self.grants)


TestPolicyMachine = PolicyMachine.TestCase
TestPolicyMachine.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)


def test_the_generated_lines_parse() -> None:
    # every kind of line the machine writes is one the parser takes
    text = options_text(
        ["RESERVE 1 cad:VERSION=1.0 INTERNET 10.0.0.*", "MAX 0 cad GROUP ALL_GROUPS"]
    )
    assert len(parse_options(text, path="h.opt").lines) == 2
