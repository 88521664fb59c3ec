"""Hypothesis: random options files and request sequences against the real ledger.

``tests/test_policy_properties.py`` plays random options files against a model ledger of
its own that asks ``Policy`` directly. This machine plays them against
``zbroker.broker.ledger.Ledger`` itself, as the primary runs it: sessions opened by
random principals, checkouts with and without ``wait`` (so the tick's queue serves some),
checkins, closes, the application's idle marks, time passing, ticks (lease expiries,
lingering seats lapsing, idle grants timing out), failovers (a new ledger from the
snapshot) and rereads of a new random options file. The file has GROUP, HOST_GROUP,
INCLUDE/EXCLUDE(ALL), RESERVE and MAX (with and without ``:VERSION=``, ``ALL_USERS``,
``ALL_GROUPS``) lines, and LINGER, TIMEOUT and TIMEOUTALL lines within the clock's
steps, so lingering seats (held by holds that copy their user's names), reclaims and
timeouts mix with everything else.

After every step, with the test's own reading of the lines (``caps_of``, ``kept_of``):

- in use never exceeds a pool's count;
- every grant the ledger decides leaves its principal within every MAX cap, and while
  every grant was decided under the options in force, every MAX cap holds;
- and then a reservation is always available to its principal: one who may use the
  feature, is under every MAX cap and whose reservation its principals fill less than
  it keeps, opening a session now and checking out one seat of that pool is granted.

A reread keeps the grants it finds (as FlexNet does), even those the new file would
refuse: the last two properties wait until every grant from before it is gone.
"""

from __future__ import annotations

import datetime
import itertools
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.test_policy_properties import (
    PEOPLE,
    POOLS,
    Held,
    caps_of,
    is_named,
    kept_of,
    options_text,
    rule_line,
)
from zbroker.broker.ledger import Decided, Ledger
from zbroker.broker.model import Entitlement, Now, Request
from zbroker.broker.options import Options, parse_options
from zbroker.broker.policy import Principal

pytestmark = pytest.mark.unit

LEASE, HEARTBEAT = 10.0, 2.0
MIN_TIMEOUT = 1.0  # the floor, low enough for the clock's steps
DAY0 = datetime.datetime(2026, 6, 1, 12, tzinfo=datetime.UTC).timestamp()


def timing_line() -> st.SearchStrategy[str]:
    """LINGER, TIMEOUT and TIMEOUTALL lines of a few seconds, pool-wide or of one pool."""
    feature = st.sampled_from(["cad", "cad:VERSION=1.0", "cad:VERSION=2.0"])
    seconds = st.integers(0, 12)  # within the clock's steps
    return st.one_of(
        st.builds(lambda f, s: f"LINGER {f} {s}", feature, seconds),
        st.builds(lambda f, s: f"TIMEOUT {f} {s}", feature, seconds),
        seconds.map(lambda s: f"TIMEOUTALL {s}"),
    )


def options_file() -> st.SearchStrategy[Options]:
    lines = st.builds(
        lambda rules, timing: rules + timing,
        st.lists(rule_line(), max_size=8),
        st.lists(timing_line(), max_size=3),
    )
    return lines.map(lambda ls: parse_options(options_text(ls), path="h.opt"))


class PolicyLedgerMachine(RuleBasedStateMachine):
    @initialize(options=options_file(), totals=st.tuples(st.integers(1, 4), st.integers(1, 4)))
    def setup(self, options: Options, totals: tuple[int, int]) -> None:
        self.totals = dict(zip(POOLS, totals, strict=True))
        lines = [Entitlement("cad", v, n, None) for v, n in self.totals.items()]
        self.ledger = Ledger(
            lines, lease=LEASE, heartbeat=HEARTBEAT, options=options, min_timeout=MIN_TIMEOUT
        )
        self.mono, self.wall = 100.0, DAY0
        self.sids = itertools.count(1)
        self.reqs: dict[str, int] = {}
        self.people: dict[str, Principal] = {}  # who opened each client session
        self.legacy: set[int] = set()  # grants made before the last reread

    @property
    def now(self) -> Now:
        return Now(self.mono, self.wall)

    @property
    def options(self) -> Options:
        options = self.ledger.options
        assert options is not None
        return options

    def commit(self, decided: list[Decided]) -> None:
        """Apply as the node does, checking each grant against the caps as it lands."""
        for delta, _ in decided:
            self.ledger.apply(delta)
            if delta["k"] == "grant":
                grant = self.ledger.grant(delta["grant"])
                assert grant is not None
                who = self.principal(grant.sid)
                held = self.held()
                for line, n in caps_of(self.options, held, who, grant.version):
                    assert n <= (line.number or 0), (line, who, held)

    def send(self, sid: str, op: str, **kw: Any) -> None:
        req = self.reqs[sid] = self.reqs.get(sid, 0) + 1
        who = self.people[sid]
        request = Request(
            op, sid, req, req, who.user, who.host, client_version="t", address=who.address, **kw
        )
        self.commit(self.ledger.handle(request, self.now).decided)

    def principal(self, sid: str) -> Principal:
        """The grant's holder as the policy sees it: a hold's copied names too."""
        s = self.ledger.session(sid)
        assert s is not None
        return Principal(s.user, s.host, s.display, s.address, s.project)

    def held(self) -> list[Held]:
        return [(self.principal(g.sid), g.version, g.count) for g in self.ledger.grants()]

    def live(self) -> list[str]:
        return [sid for sid in self.ledger.sessions() if sid in self.people]

    # ---------------------------------------------------------------- rules

    @rule(who=st.sampled_from(PEOPLE))
    def open(self, who: Principal) -> None:
        sid = f"s{next(self.sids)}"
        self.people[sid] = who
        self.send(sid, "open")

    @precondition(lambda self: self.live())
    @rule(
        data=st.data(),
        version=st.sampled_from([None, "1.0", "2.0"]),
        count=st.integers(1, 2),
        wait=st.sampled_from([None, None, 3.0, 30.0]),
    )
    def checkout(
        self, data: st.DataObject, version: str | None, count: int, wait: float | None
    ) -> None:
        sid = data.draw(st.sampled_from(self.live()))
        self.send(sid, "checkout", feature="cad", version=version, count=count, wait=wait)

    @precondition(lambda self: self.live())
    @rule(data=st.data(), version=st.sampled_from([None, "1.0", "2.0"]))
    def checkout_one(self, data: st.DataObject, version: str | None) -> None:
        """A second checkout rule: checkouts get a fair share of the steps."""
        sid = data.draw(st.sampled_from(self.live()))
        self.send(sid, "checkout", feature="cad", version=version)

    @precondition(lambda self: any(g.sid in self.people for g in self.ledger.grants()))
    @rule(data=st.data())
    def checkin(self, data: st.DataObject) -> None:
        mine = [g for g in self.ledger.grants() if g.sid in self.people]
        grant = data.draw(st.sampled_from(mine))
        self.send(grant.sid, "checkin", grant=grant.id)

    @precondition(lambda self: self.live())
    @rule(data=st.data(), op=st.sampled_from(["close", "idle", "busy", "heartbeat"]))
    def session(self, data: st.DataObject, op: str) -> None:
        """The rarer session requests share one rule (a close lingers its grants)."""
        sid = data.draw(st.sampled_from(self.live()))
        if op in ("idle", "busy"):
            self.send(sid, "idle", idle=op == "idle")
        else:
            self.send(sid, op)

    def holders(self) -> list[str]:
        return sorted({g.sid for g in self.ledger.grants()} & set(self.live()))

    @precondition(lambda self: self.holders())
    @rule(data=st.data())
    def idle_holder(self, data: st.DataObject) -> None:
        """A session holding seats goes idle: the one whose grants a TIMEOUT can take."""
        self.send(data.draw(st.sampled_from(self.holders())), "idle", idle=True)

    @rule(seconds=st.sampled_from([0.5, 2.0, 5.0, LEASE + 1]))
    def advance_and_tick(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds
        self.commit(self.ledger.tick(self.now).decided)

    @rule(data=st.data(), event=st.sampled_from(["failover", "reread", "none", "none"]))
    def admin(self, data: st.DataObject, event: str) -> None:
        """Failovers and rereads share one rule (and give up half its turns), so that
        clients get most of the steps and a policy stays long enough to fill up."""
        if event == "failover":
            self.ledger = Ledger.from_snapshot(
                self.ledger.snapshot(), lease=LEASE, heartbeat=HEARTBEAT, min_timeout=MIN_TIMEOUT
            )
            self.commit(self.ledger.tick(self.now).decided)
        elif event == "reread":
            options = data.draw(options_file())
            self.legacy |= {g.id for g in self.ledger.grants()}
            self.commit([(self.ledger.reload_delta(self.ledger.entitlements, options), None)])

    # ---------------------------------------------------------------- invariants

    def settled(self) -> bool:
        """Every grant was decided under the options in force."""
        return not self.legacy & {g.id for g in self.ledger.grants()}

    @invariant()
    def in_use_never_exceeds_a_count(self) -> None:
        for version, total in self.totals.items():
            assert self.ledger.in_use("cad", version) <= total, version

    @invariant()
    def max_caps_hold(self) -> None:
        if not self.settled():
            return
        held = self.held()
        for who, version, _ in held:
            for line, n in caps_of(self.options, held, who, version):
                assert n <= (line.number or 0), (line, who, held)

    def granted_now(self, who: Principal, version: str) -> bool:
        """Whether a new session of ``who`` gets one seat of pool ``version`` now, asked
        of a copy (a new primary from the snapshot: the queue does not matter, since a
        checkout without ``wait`` is decided at once)."""
        copy = Ledger.from_snapshot(
            self.ledger.snapshot(), lease=LEASE, heartbeat=HEARTBEAT, min_timeout=MIN_TIMEOUT
        )
        decided: list[Decided] = []
        for request in (
            Request("open", "probe", 1, 0, who.user, who.host, address=who.address),
            Request("checkout", "probe", 2, 2, who.user, who.host, feature="cad", version=version),
        ):
            decided = copy.handle(request, self.now).decided
            for delta, _ in decided:
                copy.apply(delta)
        return any(d["k"] == "grant" for d, _ in decided)

    @invariant()
    def a_reservation_is_always_available_to_its_principal(self) -> None:
        if not self.settled():
            return
        policy = self.ledger.policy
        assert policy is not None
        held = self.held()
        for version, total in self.totals.items():
            for line, n in kept_of(self.options, total, version):
                theirs = sum(k for p, v, k in held if v == version and is_named(line, p))
                if theirs >= n:
                    continue
                for who in PEOPLE:
                    if not is_named(line, who) or policy.admits(who, "cad", POOLS[version]):
                        continue
                    caps = caps_of(self.options, held, who, version)
                    if any(h + 1 > (c.number or 0) for c, h in caps):
                        continue
                    assert self.granted_now(who, version), (line, who, held)


TestPolicyLedgerMachine = PolicyLedgerMachine.TestCase
TestPolicyLedgerMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_the_machine_writes_every_timing_line_the_parser_takes() -> None:
    text = options_text(["LINGER cad:VERSION=1.0 0", "TIMEOUT cad 12", "TIMEOUTALL 3"])
    assert [ln.keyword for ln in parse_options(text, path="h.opt").lines] == [
        "LINGER", "TIMEOUT", "TIMEOUTALL",
    ]  # fmt: skip
