"""Hypothesis stateful test of duplicate groups in the ledger: random grouped and plain
checkouts (with counts, waits, masks from the request and from the line), checkins,
removals, lease expiries, ticks and failovers, with a backup applying every delta.

After every step: the backup's ledger equals the primary's (its ``apply`` refuses any
over-allocation, so a seat counted short by a decision would fail here), and every
pool's seats in use are exactly what an oracle computes from the grants alone (each
group's largest count once, every other grant's count) and never above the pool's total.
"""

from __future__ import annotations

import datetime
import itertools
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from zbroker.broker.ledger import Decided, Ledger
from zbroker.broker.model import Entitlement, Now, Request, parse_version
from zbroker.broker.options import parse_options

pytestmark = pytest.mark.unit

LEASE, HEARTBEAT = 10.0, 2.0
DAY0 = datetime.datetime(2026, 6, 1, 12, tzinfo=datetime.UTC).timestamp()
NAMES = {
    "s0": ("ann", "h1", ":0"),
    "s1": ("ann", "h1", ":0"),
    "s2": ("ann", "h2", ":0"),
    "s3": ("bob", "h1", ":1"),
    "s4": ("bob", "h1", ":1"),
}
LINES = [
    Entitlement("cad", "1.0", 3, None),
    Entitlement("cad", "2.0", 4, None),
    Entitlement("solver", "1.0", 3, None, dup_group="UH"),  # the line's mask decides
]
OPTIONS = parse_options("LINGER cad 3\nMAX 3 cad USER ann\nRESERVE 1 cad USER bob\n", path="o.opt")


class DupMachine(RuleBasedStateMachine):
    @initialize(with_options=st.booleans())
    def start(self, with_options: bool) -> None:
        options = OPTIONS if with_options else None
        self.primary = Ledger(LINES, lease=LEASE, heartbeat=HEARTBEAT, options=options)
        self.backup = Ledger(LINES, lease=LEASE, heartbeat=HEARTBEAT, options=options)
        self.mono, self.wall = 1000.0, DAY0
        self.reqs = itertools.count(1)
        for sid in NAMES:
            self._open(sid)

    @property
    def now(self) -> Now:
        return Now(self.mono, self.wall)

    def _commit(self, decided: list[Decided]) -> None:
        for delta, _ in decided:
            self.primary.apply(delta)
            self.backup.apply(delta)

    def _send(self, op: str, sid: str, **kw: Any) -> None:
        session = self.primary.session(sid)
        ack = session.ack if session is not None else 0
        request = Request(op, sid, next(self.reqs), ack, **kw)
        self._commit(self.primary.handle(request, self.now).decided)

    def _open(self, sid: str) -> None:
        user, host, display = NAMES[sid]
        self._send("open", sid, user=user, host=host, display=display, client_version="1")

    @rule(
        asks=st.lists(
            st.tuples(
                st.sampled_from(sorted(NAMES)),
                st.sampled_from(["cad", "cad", "solver"]),
                st.integers(1, 3),
                st.sampled_from([None, "2.0"]),
                st.sampled_from([None, "U", "U", "UH", "UHD", "V", "SITE", "NONE"]),
                st.sampled_from(["", "x"]),
                st.sampled_from([None, None, 5.0, 30.0]),
            ),
            min_size=1,
            max_size=4,
        )
    )
    def checkout(self, asks: list[tuple[Any, ...]]) -> None:
        for sid, feature, count, version, dup, vendor, wait in asks:
            if self.primary.session(sid) is None:
                self._open(sid)
            self._send(
                "checkout", sid, feature=feature, count=count, version=version, wait=wait,
                dup=dup, vendor_string=vendor,
            )  # fmt: skip

    @rule(data=st.data())
    def checkin(self, data: st.DataObject) -> None:
        held = [(g.sid, g.id) for g in self.primary.grants() if not g.sid.startswith("hold:")]
        if held:
            sid, gid = data.draw(st.sampled_from(held))
            self._send("checkin", sid, grant=gid)

    @rule(data=st.data())
    def take(self, data: st.DataObject) -> None:
        grants = [g.id for g in self.primary.grants()]
        if grants:
            gid = data.draw(st.sampled_from(grants))
            self._commit(
                [({"k": "take", "grant": gid, "reason": "removed", "at": self.wall}, None)]
            )

    @rule(sid=st.sampled_from(sorted(NAMES)), closes=st.integers(0, 3))
    def close(self, sid: str, closes: int) -> None:
        if closes == 0:  # now and then: expiries end most sessions here
            self._send("close", sid)

    @rule(
        seconds=st.sampled_from([0.5, 3.0, 6.0, 11.0]),
        alive=st.lists(st.booleans(), min_size=len(NAMES), max_size=len(NAMES)),
    )
    def time_passes(self, seconds: float, alive: list[bool]) -> None:
        """Time goes by; the sessions marked ``alive`` heartbeat, the others may expire
        (a lease is 10 s), and with them some members of groups whose others stay."""
        self.mono += seconds
        self.wall += seconds
        for sid, beats in zip(sorted(NAMES), alive, strict=True):
            if beats and self.primary.session(sid) is not None:
                self._send("heartbeat", sid)
        self.tick()

    @rule()
    def tick(self) -> None:
        self._commit(self.primary.tick(self.now).decided)

    @rule()
    def failover(self) -> None:
        """The backup takes over: a ledger from its snapshot, volatile state lost."""
        snap = self.backup.snapshot()
        self.primary = Ledger.from_snapshot(snap, lease=LEASE, heartbeat=HEARTBEAT)
        self.primary.forget_volatile()

    @invariant()
    def the_backup_holds_what_the_primary_holds(self) -> None:
        assert self.backup.snapshot() == self.primary.snapshot()

    @invariant()
    def seats_in_use_are_each_group_once_and_never_over(self) -> None:
        snap = self.primary.snapshot()
        plain: dict[Any, int] = {}
        groups: dict[Any, int] = {}
        for g in snap["grants"]:
            pool = (g["feature"], parse_version(g["version"]))
            if "dup" in g:
                key = (pool, g["dup"])
                groups[key] = max(groups.get(key, 0), g["count"])
            else:
                plain[pool] = plain.get(pool, 0) + g["count"]
        for (pool, _), seats in groups.items():
            plain[pool] = plain.get(pool, 0) + seats
        for line in LINES:
            pool = (line.feature, parse_version(line.version))
            used = plain.get(pool, 0)
            assert self.primary.in_use(line.feature, line.version) == used
            assert used <= line.count
        for feature in {line.feature for line in LINES}:
            held = sum(n for (f, _), n in plain.items() if f == feature)
            assert self.primary.in_use(feature) == self.backup.in_use(feature) == held


TestDupGroups = DupMachine.TestCase
TestDupGroups.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
