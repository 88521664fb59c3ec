"""Hypothesis stateful tests of the ledger: random clients, retries, time, failovers.

The machine plays a primary: it hands random requests to ``handle``, applies every
delta it gets back at once (as the node does), ticks, moves the clock, reloads the
license and fails over (a new ledger from a snapshot, volatile state lost). After
every step it checks the invariants against its own model of what clients were told.
Half the runs play under an options file with LINGER and TIMEOUT lines (a short floor), so
lingering seats, reclaims, idle sessions, lapses and timeouts mix with everything else.
"""

from __future__ import annotations

import datetime
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from zbroker.broker.ledger import Decided, Ledger
from zbroker.broker.model import Entitlement, Now, Request, parse_version
from zbroker.broker.options import parse_options

pytestmark = pytest.mark.unit

LEASE, HEARTBEAT = 10.0, 2.0
DAY0 = datetime.datetime(2026, 6, 1, 12, tzinfo=datetime.UTC).timestamp()
USERS = {"s0": ("ann", "h1"), "s1": ("bob", "h1"), "s2": ("ann", "h2"), "s3": ("cid", "h2")}

BASE = [
    Entitlement("cad", "1.0", 2, None),
    Entitlement("cad", "2.0", 2, None),
    Entitlement("cad", "2", 1, datetime.date(2026, 6, 2)),  # INCREMENT that expires
    Entitlement("cad", "3.0", 1, None, users=frozenset({"ann"})),
    Entitlement("cad", "4.0", 1, datetime.date(2026, 6, 2)),  # the only line >= 4: expires
    Entitlement("solver", "1.5", 2, None, hosts=frozenset({"h1"})),
]
# Seconds under the machine's clock steps: seats linger, and idle sessions time out.
OPTIONS = parse_options("LINGER cad 5\nTIMEOUT cad:VERSION=2.0 4\nTIMEOUTALL 8\n", path="p.opt")
MIN_TIMEOUT = 1.0
RELOADS = [
    BASE,
    [*BASE, Entitlement("cad", "2.0", 3, None)],  # grows
    [Entitlement("cad", "2.0", 1, None), Entitlement("solver", "1.5", 1, None)],  # shrinks
]


def pool_totals(entitlements: list[dict[str, Any]], day: datetime.date | None) -> dict[Any, int]:
    """An oracle, independent of zbroker.broker.seats: seats per (feature, parsed version)."""
    totals: dict[Any, int] = {}
    for e in entitlements:
        key = (e["feature"], parse_version(e["version"]))
        live = day is None or e["expires"] is None or day.isoformat() <= e["expires"]
        totals[key] = totals.get(key, 0) + (e["count"] if live else 0)
    return totals


def in_use(snap: dict[str, Any]) -> dict[Any, int]:
    used: dict[Any, int] = {}
    for g in snap["grants"]:
        key = (g["feature"], parse_version(g["version"]))
        used[key] = used.get(key, 0) + g["count"]
    return used


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(BASE, lease=LEASE, heartbeat=HEARTBEAT)
        self.mono, self.wall = 100.0, DAY0
        self.next_req = dict.fromkeys(USERS, 1)
        self.sent: dict[tuple[str, int], Request] = {}  # every request, for retries
        self.told: dict[tuple[str, int], Any] = {}  # recorded replies clients got
        self.checkpoint = self.ledger.snapshot()
        self.log: list[dict[str, Any]] = []
        self.shrunk = False

    @property
    def now(self) -> Now:
        return Now(self.mono, self.wall)

    def commit(self, decided: list[Decided]) -> None:
        """Apply as the node does; none may raise, and no grant may over-allocate."""
        for delta, reply in decided:
            self.ledger.apply(delta)
            self.log.append(delta)
            if delta["k"] in ("close", "expire"):
                self.told = {k: v for k, v in self.told.items() if k[0] != delta["sid"]}
            elif delta["k"] in ("open", "grant", "release", "answer", "idle"):
                key = (delta["sid"], delta["req"])
                assert key not in self.told, f"{key} answered twice"
                self.told[key] = reply
            if delta["k"] == "grant":
                snap = self.ledger.snapshot()
                day = Now(0, delta["at"]).date
                key = (delta["feature"], parse_version(delta["version"]))
                assert in_use(snap)[key] <= pool_totals(snap["entitlements"], day)[key]

    def send(self, request: Request) -> None:
        self.sent[(request.sid, request.req)] = request
        before = self.ledger.snapshot()
        out = self.ledger.handle(request, self.now)
        assert self.ledger.snapshot() == before, "handle mutated replicated state"
        assert not (out.decided and out.reply is not None)
        self.commit(out.decided)

    def request(self, op: str, sid: str, acks: bool, **kw: Any) -> Request:
        req = self.next_req[sid]
        self.next_req[sid] += 1
        # Acknowledge everything answered so far, up to the first request still waiting.
        waiting = [r for (s, r) in self.sent if s == sid and (s, r) not in self.told]
        ack = min([*waiting, req]) if acks else 0
        return Request(op, sid, req, ack, *USERS[sid], display=":0", client_version="t", **kw)

    def pick(self, data: st.DataObject) -> str:
        """Mostly an open session; now and then any, to hit unknown sessions."""
        live = self.ledger.sessions()
        if not live or data.draw(st.integers(0, 9)) == 0:
            return data.draw(st.sampled_from(sorted(USERS)))
        return data.draw(st.sampled_from(live))

    @initialize(options=st.booleans())
    def open_all(self, options: bool) -> None:
        if options:
            self.ledger = Ledger(
                BASE, lease=LEASE, heartbeat=HEARTBEAT, options=OPTIONS, min_timeout=MIN_TIMEOUT
            )
            self.checkpoint = self.ledger.snapshot()
        for sid in sorted(USERS):
            self.send(self.request("open", sid, False))

    @rule(sid=st.sampled_from(sorted(USERS)), acks=st.booleans())
    def open(self, sid: str, acks: bool) -> None:
        self.send(self.request("open", sid, acks))

    @rule(data=st.data(), acks=st.booleans())
    def close(self, data: st.DataObject, acks: bool) -> None:
        self.send(self.request("close", self.pick(data), acks))

    @rule(data=st.data(), acks=st.booleans())
    def heartbeat(self, data: st.DataObject, acks: bool) -> None:
        self.send(self.request("heartbeat", self.pick(data), acks))

    @rule(
        data=st.data(),
        acks=st.booleans(),
        feature=st.sampled_from(["cad", "cad", "solver", "nope"]),
        version=st.sampled_from([None, "1", "2.0", "3", "4"]),
        count=st.integers(1, 4),
        wait=st.sampled_from([None, 0.0, 1.0, 30.0]),
    )
    def checkout(
        self,
        data: st.DataObject,
        acks: bool,
        feature: str,
        version: str | None,
        count: int,
        wait: Any,
    ) -> None:
        kw = {"feature": feature, "version": version, "count": count, "wait": wait}
        self.send(self.request("checkout", self.pick(data), acks, **kw))

    @rule(data=st.data(), acks=st.booleans(), pick=st.integers(0, 20))
    def checkin(self, data: st.DataObject, acks: bool, pick: int) -> None:
        # Mostly a grant that exists (its own or another session's), now and then none.
        grants = [g["grant"] for g in self.ledger.snapshot()["grants"]]
        gid = grants[pick % len(grants)] if grants and pick < 15 else pick
        self.send(self.request("checkin", self.pick(data), acks, grant=gid))

    @rule(data=st.data(), count=st.integers(1, 2), wait=st.sampled_from([1.0, 30.0]))
    def checkout_and_wait(self, data: st.DataObject, count: int, wait: float) -> None:
        kw = {"feature": "cad", "version": "2", "count": count, "wait": wait}
        self.send(self.request("checkout", self.pick(data), True, **kw))

    @rule(data=st.data(), acks=st.booleans(), idle=st.booleans())
    def idle(self, data: st.DataObject, acks: bool, idle: bool) -> None:
        self.send(self.request("idle", self.pick(data), acks, idle=idle))

    def clients_grants(self) -> list[Any]:
        return [g for g in self.ledger.grants() if g.sid in USERS]  # not the holds'

    @precondition(lambda self: self.clients_grants())
    @rule(data=st.data())
    def checkin_own(self, data: st.DataObject) -> None:
        grant = data.draw(st.sampled_from(self.clients_grants()))
        self.send(self.request("checkin", grant.sid, True, grant=grant.id))

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.sent)))
        self.send(self.sent[key])  # a retry: commit() checks it is never answered twice

    @rule(seconds=st.sampled_from([0.0, 0.4, 3.0, 5.0, 6.0, LEASE + 1, 86400.0]))
    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    @rule()
    def tick(self) -> None:
        self.commit(self.ledger.tick(self.now).decided)

    @rule(event=st.sampled_from(["failover", "checkpoint", *range(len(RELOADS))]))
    def admin(self, event: str | int) -> None:
        """The rare events share one rule, so that clients get most of the steps."""
        if event == "failover":
            snap = self.ledger.snapshot()
            self.ledger = Ledger.from_snapshot(
                snap, lease=LEASE, heartbeat=HEARTBEAT, min_timeout=MIN_TIMEOUT
            )
            self.advance(5 * LEASE)  # however long the failover took, leases start afresh
            decided = self.ledger.tick(self.now).decided
            assert all(d["k"] != "expire" for d, _ in decided), "a new primary expired someone"
            self.commit(decided)  # holds lapse and idle grants time out by the wall clock
            self.advance(LEASE / 2)
            self.commit(self.ledger.tick(self.now).decided)
            assert self.ledger.sessions() == [s["sid"] for s in snap["sessions"] if "hold" not in s]
        elif event == "checkpoint":
            self.checkpoint, self.log = self.ledger.snapshot(), []
        else:
            self.reload(RELOADS[int(event)])

    def reload(self, entitlements: list[Entitlement]) -> None:
        delta = self.ledger.reload_delta(entitlements, self.ledger.options)
        totals = pool_totals(delta["entitlements"], None)
        used = in_use(self.ledger.snapshot())
        self.shrunk |= any(n > totals.get(key, 0) for key, n in used.items())
        self.commit([(delta, None)])

    @invariant()
    def retries_get_the_same_reply_and_no_delta(self) -> None:
        # Asked of a copy (a new primary after a failover), since handle renews leases.
        copy = Ledger.from_snapshot(self.ledger.snapshot(), lease=LEASE, heartbeat=HEARTBEAT)
        for (sid, req), reply in self.told.items():
            session = copy.session(sid)
            if session is None or req < session.ack:
                continue  # forgotten on purpose: the session ended or the client acked it
            out = copy.handle(self.sent[(sid, req)], self.now)
            assert out.decided == [] and out.reply == reply, (sid, req)

    @invariant()
    def seats_never_exceed_the_pool(self) -> None:
        snap = self.ledger.snapshot()
        if not self.shrunk:
            totals = pool_totals(snap["entitlements"], None)
            for key, n in in_use(snap).items():
                assert n <= totals.get(key, 0), key

    @invariant()
    def replay_from_checkpoint_gives_the_live_ledger(self) -> None:
        replica = Ledger.from_snapshot(self.checkpoint, lease=LEASE, heartbeat=HEARTBEAT)
        for delta in self.log:
            replica.apply(delta)
        snap = self.ledger.snapshot()
        assert replica.snapshot() == snap
        again = Ledger.from_snapshot(snap, lease=LEASE, heartbeat=HEARTBEAT).snapshot()
        assert again == snap

    @invariant()
    def seats_in_use_of_each_feature_and_pool_agree_with_the_grants(self) -> None:
        snap = self.ledger.snapshot()
        by_pool = in_use(snap)
        features = {e["feature"] for e in snap["entitlements"]} | {f for f, _ in by_pool}
        for feature in features:
            held = sum(n for (f, _), n in by_pool.items() if f == feature)
            assert self.ledger.in_use(feature) == held, feature
        for e in snap["entitlements"]:
            pool = (e["feature"], parse_version(e["version"]))
            assert self.ledger.in_use(e["feature"], e["version"]) == by_pool.get(pool, 0)

    @invariant()
    def status_agrees_with_the_grants(self) -> None:
        snap = self.ledger.snapshot()
        held = sum(g["count"] for g in snap["grants"])
        assert sum(f["in_use"] for f in self.ledger.status(self.now)) == held
        lingering = sum(g["count"] for g in snap["grants"] if g["sid"].startswith("hold:"))
        assert sum(f["lingering"] for f in self.ledger.status(self.now)) == lingering

    @invariant()
    def a_hold_holds_one_grant_and_no_client_session_outlives_its_lease_idle(self) -> None:
        holds = {h.sid: h for h in self.ledger.holds()}
        for g in self.ledger.grants():
            if g.sid.startswith("hold:"):
                assert g.sid == f"hold:{g.id}" and holds[g.sid].grants == {g.id}
        assert len(holds) == len({g.sid for g in self.ledger.grants()} & set(holds))


LedgerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestLedgerMachine = LedgerMachine.TestCase
