"""``Link`` and ``Exchange`` alone: a fake send, a fake clock, replies written by hand.

No socket and no thread: the test is the I/O thread. ``Wire`` stands for the engine's
send (it records every frame, or refuses a node as a missing connection or a process
out of descriptors would), ``Rig.now`` is the clock, and ``Rig.answer`` hands the link
a reply as a node would write it. So every rule of link.py's docstring, and every row
of the session and grant transition tables, is driven step by step at exact times.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest

from zbroker.clients import grant as grant_module
from zbroker.clients import link as link_module
from zbroker.clients.errors import LicenseDenied, LicenseUnavailable, OutcomeUnknown
from zbroker.clients.exchange import BACKOFF_CAP, BACKOFF_CAP_BACKGROUND, BACKOFF_FIRST, Exchange
from zbroker.clients.grant import Grant, GrantRecord, GrantState, IllegalTransition
from zbroker.clients.link import Link, SessionState
from zbroker.clients.protocol import PROTOCOL_VERSION, ErrorCode, Status
from zbroker.clients.wire import pack

pytestmark = pytest.mark.unit

ENDPOINTS = ("tcp://a:1", "tcp://b:1", "tcp://c:1")
TRY = 0.3  # the per-try timeout
LEASE, HEARTBEAT = 1.0, 0.3


@dataclass
class Sent:
    node: int
    msg: dict[str, Any]

    @property
    def op(self) -> str:
        return str(self.msg["op"])


@dataclass
class Wire:
    """The engine's send: records frames; ``refuse`` nodes have no connection (False),
    ``starve`` nodes cost a descriptor the process has not got (LicenseUnavailable)."""

    frames: list[Sent] = field(default_factory=list)
    refuse: set[int] = field(default_factory=set)
    starve: set[int] = field(default_factory=set)

    def __call__(self, link: Link, node: int, frame: bytes) -> bool:
        if node in self.starve:
            raise LicenseUnavailable("no file descriptor left for a connection")
        if node in self.refuse:
            return False
        self.frames.append(Sent(node, msgpack.unpackb(frame)))
        return True

    def of(self, op: str) -> list[Sent]:
        return [s for s in self.frames if s.op == op]

    def last(self, op: str) -> Sent:
        return self.of(op)[-1]


class Owner:
    def checkin(self, grant: Grant, timeout: float | None = None) -> None:
        raise AssertionError("the test checks in through the link")


class Rig:
    """One link, its wire, its clock and what it reported lost."""

    def __init__(self, *, recover_timeout: float = 2.0) -> None:
        self.now = 100.0
        self.wire = Wire()
        self.reports: list[list[Grant]] = []
        self._sids = 0
        self.link = Link(
            0,
            ENDPOINTS,
            hello={"user": "u", "host": "h", "display": ":0"},
            send=self.wire,
            report=self.reports.append,
            owner=Owner(),
            new_sid=self._new_sid,
            try_timeout=TRY,
            recover_timeout=recover_timeout,
        )

    def _new_sid(self) -> str:
        self._sids += 1
        return f"s{self._sids}"

    def at(self, now: float) -> None:
        """Move the clock to ``now`` and tick the link, as the I/O thread does."""
        self.now = now
        self.link.tick(now)

    def answer(self, sent: Sent, status: str = Status.OK, **body: Any) -> None:
        """``sent``'s node answers it now, as a node writes a reply."""
        reply = {"v": PROTOCOL_VERSION, "sid": sent.msg.get("sid"), "req": sent.msg["req"]}
        self.link.on_frame(sent.node, pack(reply | {"status": status, **body}), self.now)

    def open_ok(self, lease: float = LEASE) -> None:
        self.answer(self.wire.last("open"), lease=lease, heartbeat=HEARTBEAT)

    def checkout(
        self,
        feature: str = "cad",
        *,
        count: int = 1,
        wait: float | None = None,
        timeout: float = 2.0,
    ) -> Future[Any]:
        fut: Future[Any] = Future()
        self.link.checkout(
            fut,
            self.now,
            feature=feature,
            count=count,
            version=None,
            wait=wait,
            deadline=self.now + timeout,
        )
        return fut

    def checkin(self, grant: Grant, timeout: float = 2.0) -> Future[Any]:
        fut: Future[Any] = Future()
        self.link.checkin(fut, self.now, grant, self.now + timeout)
        return fut

    def close(self, timeout: float = 2.0) -> Future[Any]:
        fut: Future[Any] = Future()
        self.link.close(fut, self.now, self.now + timeout)
        return fut

    def granted(self, sent: Sent, gid: int, feature: str = "cad") -> None:
        grant = {"id": gid, "feature": feature, "version": "1.0", "count": sent.msg["count"]}
        self.answer(sent, grant=grant)

    def hold(self, gid: int = 1, feature: str = "cad") -> Grant:
        """Open the session if needed and check one grant out: the common start."""
        fut = self.checkout(feature)
        if self.link.state is SessionState.OPENING:
            self.open_ok()
        self.granted(self.wire.last("checkout"), gid, feature)
        grant: Grant = fut.result(0)
        return grant


def unknown_session(rig: Rig, sent: Sent) -> None:
    rig.answer(sent, Status.ERROR, code=ErrorCode.UNKNOWN_SESSION, detail="no such session")


# --- the bug of simulation seed 4660 (2542 in today's simulation): a grant got while the
# lease copy had lapsed was handed out HELD, and the triad expired its session unseen


def test_a_grant_got_while_the_lease_copy_lapsed_starts_unsafe_and_is_reported() -> None:
    rig = Rig()
    rig.hold(1)
    rig.at(100.5)
    fut = rig.checkout("solver")  # its first send at 100.5: a renewal would last to 101.5
    sent = rig.wire.last("checkout")
    rig.at(101.0)
    assert rig.link.state is SessionState.LAPSED  # the open's lease ran out at 101.0
    rig.reports.clear()
    rig.now = 101.6  # answered after its own first send + lease: no renewal
    rig.granted(sent, 2, "solver")
    grant = fut.result(0)
    assert rig.link.state is SessionState.LAPSED
    assert grant.state is GrantState.UNSAFE and not grant.safe
    assert rig.reports == [[grant]], "reported like the grants that lapsed"
    # a renewal makes it HELD again, as the others
    rig.at(101.7)
    heartbeat = rig.wire.last("heartbeat")
    rig.answer(heartbeat, lease=LEASE)
    assert rig.link.state is SessionState.OPEN
    assert grant.state is GrantState.HELD


def test_a_grant_answered_after_the_lease_ran_out_before_any_tick_is_unsafe() -> None:
    rig = Rig()
    first = rig.hold(1)  # lease copy to 101.0
    rig.now = 100.5
    fut = rig.checkout("solver")
    rig.now = 101.6  # no tick in between: the link still says OPEN
    rig.granted(rig.wire.last("checkout"), 2, "solver")
    grant = fut.result(0)
    assert rig.link.state is SessionState.LAPSED
    assert first.state is GrantState.UNSAFE and grant.state is GrantState.UNSAFE
    assert rig.reports == [[first], [grant]]


def test_a_grant_got_back_by_the_recovery_while_lapsed_is_unsafe_and_reported() -> None:
    rig = Rig(recover_timeout=3.0)
    grant = rig.hold(1)
    rig.at(100.3)
    unknown_session(rig, rig.wire.last("heartbeat"))
    assert grant.state is GrantState.RECOVERING and rig.link.state is SessionState.OPENING
    rig.open_ok()  # the new session opened at 100.3: lease copy to 101.3; the re-checkout leaves
    again = rig.wire.last("checkout")
    assert again.msg["sid"] == rig.link.sid
    rig.at(101.4)
    assert rig.link.state is SessionState.LAPSED and rig.reports == []
    rig.granted(again, 7)
    assert grant.id == 7 and grant.state is GrantState.UNSAFE
    assert rig.reports == [[grant]]


# --- the transition tables: every row taken by a scenario, every other change refused


@dataclass(frozen=True)
class Case:
    """A scenario that ends in one transition: ``edge`` is (from, to); from None: birth."""

    name: str
    edge: tuple[Any, Any]
    run: Callable[[Rig], object]

    def __str__(self) -> str:
        return self.name


def _lapsed(rig: Rig) -> Grant:
    grant = rig.hold(1)
    rig.at(101.0)  # the open's first send at 100.0 + lease 1.0; the heartbeat leaves now
    return grant


def _forgotten(rig: Rig) -> Grant:
    grant = rig.hold(1)
    rig.at(100.3)
    unknown_session(rig, rig.wire.last("heartbeat"))
    return grant


def _closed_unanswered(rig: Rig) -> None:
    fut = rig.close(timeout=1.0)
    rig.at(rig.now + 1.0)
    assert fut.result(0) is None


def _open_refused(rig: Rig) -> None:
    fut = rig.checkout()
    rig.answer(rig.wire.last("open"), Status.ERROR, code=ErrorCode.LIMIT, detail="too many")
    assert isinstance(fut.exception(0), LicenseUnavailable)


def _open_unaffordable(rig: Rig) -> None:
    rig.wire.starve = {0, 1, 2}
    fut = rig.checkout()
    error = fut.exception(0)
    assert isinstance(error, LicenseUnavailable) and "no file descriptor" in str(error)


def _close_while_opening_unsent(rig: Rig) -> None:
    rig.wire.refuse = {0, 1, 2}  # no connection yet: the open never left the process
    rig.checkout()
    assert rig.close().result(0) is None


def _close_ok(rig: Rig) -> None:
    rig.hold(1)
    fut = rig.close()
    rig.answer(rig.wire.last("close"))
    assert fut.result(0) is None


def _forgotten_nothing_held(rig: Rig) -> None:
    rig.checkout()
    rig.open_ok()
    rig.answer(rig.wire.last("checkout"), Status.DENIED, reason="no_seats", detail="none")
    rig.at(100.3)
    unknown_session(rig, rig.wire.last("heartbeat"))
    assert rig.link.sid is None, "the next call opens a new session"


def _lapsed_nothing_held_forgotten(rig: Rig) -> None:
    rig.checkout()
    rig.open_ok()
    rig.answer(rig.wire.last("checkout"), Status.DENIED, reason="no_seats", detail="none")
    rig.at(101.0)
    unknown_session(rig, rig.wire.last("heartbeat"))


def _forgotten_lapsed(rig: Rig) -> None:
    _lapsed(rig)
    unknown_session(rig, rig.wire.last("heartbeat"))


def _closed_lapsed(rig: Rig) -> None:
    _lapsed(rig)
    _closed_unanswered(rig)


def _renewed(rig: Rig) -> None:
    _lapsed(rig)
    rig.answer(rig.wire.last("heartbeat"), lease=LEASE)


def _recovered(rig: Rig) -> None:
    grant = _forgotten(rig)
    rig.open_ok()
    rig.granted(rig.wire.last("checkout"), 7)
    assert grant.id == 7 and grant.safe and rig.reports == []


def _recovered_lapsed(rig: Rig) -> None:
    grant = _forgotten(rig)
    rig.open_ok()
    again = rig.wire.last("checkout")
    rig.at(rig.now + LEASE)
    rig.granted(again, 7)
    assert rig.reports == [[grant]]


def _not_recovered(rig: Rig) -> None:
    grant = _forgotten(rig)
    rig.open_ok()
    rig.answer(rig.wire.last("checkout"), Status.DENIED, reason="no_seats", detail="taken")
    assert grant.lost and rig.reports == [[grant]]


def _checked_in(rig: Rig) -> None:
    grant = rig.hold(1)
    fut = rig.checkin(grant)
    rig.answer(rig.wire.last("checkin"))
    assert fut.result(0) is None and grant.released


def _checked_in_recovering(rig: Rig) -> None:
    grant = _forgotten(rig)
    assert rig.checkin(grant).result(0) is None  # the re-checkout gives it back when done


def _taken(rig: Rig) -> None:
    grant = rig.hold(1)
    rig.at(100.3)
    taken = [{"grant": 1, "reason": "removed"}, {"grant": 99, "reason": "removed"}]
    rig.answer(rig.wire.last("heartbeat"), lease=LEASE, taken=taken)
    assert grant.lost and grant.lost_reason == "removed" and rig.reports == [[grant]]
    rig.at(100.7)
    rig.answer(rig.wire.last("heartbeat"), lease=LEASE, taken=taken)  # listed again
    assert rig.reports == [[grant]] and rig.link.held == []  # reported once


def _taken_unsafe(rig: Rig) -> None:
    fut = rig.checkout()
    rig.open_ok(lease=0.5)  # shorter than a heartbeat's 3 tries: its answer can come late
    rig.granted(rig.wire.last("checkout"), 1)
    grant: Grant = fut.result(0)
    rig.at(100.3)  # the heartbeat leaves
    rig.at(100.9)  # the lease copy lapsed at 100.5: UNSAFE, reported
    assert grant.state is GrantState.UNSAFE
    rig.answer(rig.wire.last("heartbeat"), lease=0.5, taken=[{"grant": 1, "reason": "timeout"}])
    assert grant.lost and grant.lost_reason == "timeout" and rig.reports == [[grant], [grant]]


def _born_unsafe(rig: Rig) -> None:
    _lapsed(rig)
    rig.now = 101.5
    fut = rig.checkout("solver")
    rig.now = 102.6
    rig.granted(rig.wire.last("checkout"), 2, "solver")
    assert fut.result(0).state is GrantState.UNSAFE


C, OG, OP, L = SessionState.CLOSED, SessionState.OPENING, SessionState.OPEN, SessionState.LAPSED
SESSION_CASES = [
    Case("first call opens", (C, OG), lambda rig: rig.checkout()),
    Case("open ok", (OG, OP), lambda rig: rig.hold(1)),
    Case("open refused", (OG, C), _open_refused),
    Case("open unaffordable", (OG, C), _open_unaffordable),
    Case("close before any node could open", (OG, C), _close_while_opening_unsent),
    Case("lease copy ran out", (OP, L), _lapsed),
    Case("forgotten, grants held", (OP, OG), _forgotten),
    Case("forgotten, nothing held", (OP, C), _forgotten_nothing_held),
    Case("closed", (OP, C), _close_ok),
    Case("renewed", (L, OP), _renewed),
    Case("forgotten while lapsed", (L, OG), _forgotten_lapsed),
    Case("forgotten while lapsed, nothing held", (L, C), _lapsed_nothing_held_forgotten),
    Case("closed while lapsed", (L, C), _closed_lapsed),
]

H, U, R = GrantState.HELD, GrantState.UNSAFE, GrantState.RECOVERING
GRANT_CASES = [
    Case("granted", (None, H), lambda rig: rig.hold(1)),
    Case("granted while lapsed", (None, U), _born_unsafe),
    Case("lease lapsed", (H, U), _lapsed),
    Case("session forgotten", (H, R), _forgotten),
    Case("checked in", (H, GrantState.RELEASED), _checked_in),
    Case("taken by the triad", (H, GrantState.LOST), _taken),
    Case("taken while unsafe", (U, GrantState.LOST), _taken_unsafe),
    Case("renewed", (U, H), _renewed),
    Case("forgotten while unsafe", (U, R), _forgotten_lapsed),
    Case("closed while unsafe", (U, GrantState.RELEASED), _closed_lapsed),
    Case("checked out again", (R, H), _recovered),
    Case("checked out again after the lapse", (R, U), _recovered_lapsed),
    Case("could not get it back", (R, GrantState.LOST), _not_recovered),
    Case("checked in while recovering", (R, GrantState.RELEASED), _checked_in_recovering),
]


def _state_id(state: object) -> str:
    return state.value if isinstance(state, enum.Enum) else str(state)


def _edges(table: Mapping[Any, frozenset[Any]]) -> set[tuple[Any, Any]]:
    return {(old, new) for old, targets in table.items() for new in targets}


def test_the_scenarios_cover_both_tables_exactly() -> None:
    assert {c.edge for c in SESSION_CASES} == _edges(link_module.TRANSITIONS)
    births = {(None, state) for state in grant_module.INITIAL}
    assert {c.edge for c in GRANT_CASES} == _edges(grant_module.TRANSITIONS) | births


@pytest.fixture
def session_moves(monkeypatch: pytest.MonkeyPatch) -> list[tuple[SessionState, SessionState]]:
    moves: list[tuple[SessionState, SessionState]] = []
    checked = Link._set_session

    def recording(self: Link, state: SessionState) -> None:
        old = self.state
        checked(self, state)
        moves.append((old, state))

    monkeypatch.setattr(Link, "_set_session", recording)
    return moves


@pytest.fixture
def grant_moves(monkeypatch: pytest.MonkeyPatch) -> list[tuple[GrantState | None, GrantState]]:
    """Every grant's changes, its birth recorded as (None, state)."""
    moves: list[tuple[GrantState | None, GrantState]] = []
    checked, born = GrantRecord._set_state, GrantRecord.__init__

    def recording(self: GrantRecord, state: GrantState) -> None:
        old = self.state
        checked(self, state)
        moves.append((old, state))

    def birth(self: GrantRecord, *args: Any, **kwargs: Any) -> None:
        born(self, *args, **kwargs)
        moves.append((None, self.state))

    monkeypatch.setattr(GrantRecord, "_set_state", recording)
    monkeypatch.setattr(GrantRecord, "__init__", birth)
    return moves


@pytest.mark.parametrize("case", SESSION_CASES, ids=str)
def test_every_session_transition(
    case: Case, session_moves: list[tuple[SessionState, SessionState]]
) -> None:
    case.run(Rig())
    assert session_moves and session_moves[-1] == case.edge, session_moves


@pytest.mark.parametrize("case", GRANT_CASES, ids=str)
def test_every_grant_transition(
    case: Case, grant_moves: list[tuple[GrantState | None, GrantState]]
) -> None:
    case.run(Rig())
    assert grant_moves and grant_moves[-1] == case.edge, grant_moves


@pytest.mark.parametrize(
    ("old", "new"),
    [(a, b) for a in SessionState for b in SessionState if b not in link_module.TRANSITIONS[a]],
    ids=_state_id,
)
def test_an_illegal_session_transition_raises_and_is_not_taken(
    old: SessionState, new: SessionState
) -> None:
    link = Rig().link
    link.state = old
    with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}") as error:
        link._set_session(new)
    assert (error.value.old, error.value.new) == (old, new)
    assert link.state is old


def _grant(state: GrantState = GrantState.HELD) -> GrantRecord:
    return GrantRecord(
        id=1,
        feature="cad",
        version="1",
        count=1,
        triad=ENDPOINTS,
        entry=0,
        session="s",
        state=state,
    )


@pytest.mark.parametrize(
    ("old", "new"),
    [(a, b) for a in GrantState for b in GrantState if b not in grant_module.TRANSITIONS[a]],
    ids=_state_id,
)
def test_an_illegal_grant_transition_raises_and_is_not_taken(
    old: GrantState, new: GrantState
) -> None:
    grant = _grant()
    grant._state = old  # placed there directly: the test is of the check alone
    with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}") as error:
        grant._set_state(new)
    assert (error.value.old, error.value.new) == (old, new)
    assert grant.state is old


@pytest.mark.parametrize(
    "state", sorted(set(GrantState) - grant_module.INITIAL, key=_state_id), ids=_state_id
)
def test_a_grant_is_born_held_or_unsafe_only(state: GrantState) -> None:
    with pytest.raises(IllegalTransition, match=f"\\(new\\) -> {state.value}"):
        _grant(state)


# --- the rules of link.py's docstring


def test_requests_wait_for_the_session_and_the_open_is_resent_until_answered() -> None:
    rig = Rig()
    fut = rig.checkout()
    assert [s.op for s in rig.wire.frames] == ["open"], "the checkout waits for the session"
    rig.at(100.0 + TRY)  # no answer: the open goes to the next node
    assert [s.node for s in rig.wire.of("open")] == [0, 1]
    assert len({s.msg["req"] for s in rig.wire.of("open")}) == 1, "the same request"
    rig.open_ok()
    checkout = rig.wire.last("checkout")
    assert checkout.msg["sid"] == rig.link.sid and checkout.node == 1, "the primary answered"
    rig.granted(checkout, 1)
    assert fut.result(0).safe


@pytest.mark.parametrize("status", [Status.OK, Status.DENIED])
def test_the_lease_counts_from_the_first_send_of_an_answered_request(status: str) -> None:
    rig = Rig()
    rig.checkout()
    rig.now = 100.1
    rig.open_ok()  # sent at 100.0, answered at 100.1
    assert rig.link.lease_deadline == 100.0 + LEASE
    rig.answer(rig.wire.last("checkout"), Status.DENIED, reason="no_seats", detail="none")
    rig.now = 100.2
    fut = rig.checkout()
    rig.at(100.2 + TRY)  # the first copy went unanswered: a second copy to the next node
    first, second = rig.wire.of("checkout")[-2:]
    assert first.msg["req"] == second.msg["req"] and (first.node, second.node) == (0, 1)
    rig.now = 100.9
    if status == Status.OK:
        rig.granted(second, 1)
    else:
        rig.answer(second, status, reason="no_seats", detail="none")
    assert fut.done()
    # whichever copy the primary acted on left no earlier than the first
    assert rig.link.lease_deadline == 100.2 + LEASE


def test_an_unanswered_request_does_not_renew_and_the_lease_copy_lapses() -> None:
    rig = Rig()
    grant = rig.hold(1)
    rig.at(100.99)
    assert rig.link.state is SessionState.OPEN and grant.safe
    rig.at(101.0)
    assert rig.link.state is SessionState.LAPSED and rig.reports == [[grant]]
    rig.at(101.3)  # heartbeats go on while lapsed
    assert {s.msg["sid"] for s in rig.wire.of("heartbeat")} == {rig.link.sid}


def test_unknown_session_opens_a_new_sid_checks_grants_out_again_and_reports_the_lost() -> None:
    rig = Rig()
    cad, solver = rig.hold(1, "cad"), rig.hold(2, "solver")
    old_sid = rig.link.sid
    rig.at(100.3)
    unknown_session(rig, rig.wire.last("heartbeat"))
    assert cad.state is solver.state is GrantState.RECOVERING
    assert rig.link.sid != old_sid and rig.wire.last("open").msg["sid"] == rig.link.sid
    rig.open_ok()
    again = {s.msg["feature"]: s for s in rig.wire.of("checkout")[-2:]}
    assert {s.msg["sid"] for s in again.values()} == {rig.link.sid}
    rig.granted(again["cad"], 11)
    assert cad.safe and cad.id == 11 and rig.reports == [], "reported once the round is over"
    rig.answer(again["solver"], Status.DENIED, reason="no_seats", detail="taken meanwhile")
    assert solver.lost and rig.reports == [[solver]]
    assert rig.link.held == [cad._record]
    fut = rig.checkin(cad)  # goes to the session it was got back on
    checkin = rig.wire.last("checkin").msg
    assert (checkin["sid"], checkin["grant"]) == (rig.link.sid, 11)
    rig.answer(rig.wire.last("checkin"))
    assert fut.result(0) is None and cad.released


def test_a_grant_not_got_back_by_the_deadline_is_lost_and_its_late_grant_given_back() -> None:
    rig = Rig(recover_timeout=1.0)
    grant = rig.hold(1)
    rig.at(100.3)
    unknown_session(rig, rig.wire.last("heartbeat"))
    rig.open_ok()
    again = rig.wire.last("checkout")
    rig.at(100.3 + 1.0)  # nobody answered the re-checkout: it may have been granted
    assert grant.lost and rig.reports == [[grant]]
    rig.granted(again, 12)  # it was: nobody wants it now
    assert grant.id == 1 and grant.lost
    assert rig.wire.last("checkin").msg["grant"] == 12


def test_a_call_that_met_unknown_session_is_sent_again_on_the_new_session() -> None:
    rig = Rig()
    rig.hold(1, "cad")
    fut = rig.checkout("solver")
    first = rig.wire.last("checkout")
    unknown_session(rig, first)
    assert not fut.done(), "it had no effect: asked again, not failed"
    rig.open_ok()
    resent = [s for s in rig.wire.of("checkout") if s.msg["feature"] == "solver"][-1]
    assert resent.msg["sid"] == rig.link.sid != first.msg["sid"]
    assert resent.msg["req"] != first.msg["req"]
    rig.granted(resent, 5, "solver")
    assert fut.result(0).id == 5


def test_a_close_that_meets_unknown_session_opens_nothing_new() -> None:
    rig = Rig()
    grant = rig.hold(1)
    fut = rig.close()
    unknown_session(rig, rig.wire.last("close"))
    assert fut.result(0) is None and grant.released
    assert rig.link.state is SessionState.CLOSED and len(rig.wire.of("open")) == 1


def test_outcome_unknown_at_the_deadline_then_the_late_grant_is_checked_back_in() -> None:
    rig = Rig()
    rig.hold(1)
    rig.now = 100.1
    fut = rig.checkout("solver", timeout=0.5)
    req = rig.wire.last("checkout").msg["req"]
    rig.at(100.4)  # second copy, to node 1
    rig.at(100.6)
    assert isinstance(fut.exception(0), OutcomeUnknown)
    # it goes on in the background, the same request, and ack stays below it
    rig.at(100.9)
    copies = [s for s in rig.wire.of("checkout") if s.msg["req"] == req]
    assert len(copies) >= 3 and {s.msg["sid"] for s in copies} == {rig.link.sid}
    other = rig.checkout("cad")
    assert rig.wire.last("checkout").msg["ack"] <= req
    rig.granted(rig.wire.last("checkout"), 3)
    assert other.result(0).id == 3
    rig.at(101.0)
    assert all(s.msg["ack"] <= req for s in rig.wire.frames if s.msg.get("sid") == rig.link.sid)
    rig.granted(copies[0], 9, "solver")  # the first copy had been granted
    checkin = rig.wire.last("checkin")
    assert checkin.msg["grant"] == 9 and checkin.msg["ack"] > req, "settled: ack moves on"
    assert [g.id for g in rig.link.held] == [1, 3], "nobody holds the late grant"
    assert rig.reports == []


def test_a_checkin_settled_after_outcome_unknown_ends_the_grant_once() -> None:
    rig = Rig()
    grant = rig.hold(1)
    fut = rig.checkin(grant, timeout=0.5)
    rig.at(100.3)
    rig.at(100.5)
    assert isinstance(fut.exception(0), OutcomeUnknown) and grant.released
    checkins = rig.wire.of("checkin")
    rig.at(100.6)
    assert len(rig.wire.of("checkin")) > len(checkins), "re-sent in the background"
    rig.answer(checkins[0])  # settled: no second end, no error
    assert grant.released and rig.link.held == []


def test_a_denied_request_is_definite() -> None:
    rig = Rig()
    fut = rig.checkout()
    rig.open_ok()
    rig.answer(rig.wire.last("checkout"), Status.DENIED, reason="no_seats", detail="5 of 5")
    error = fut.exception(0)
    assert isinstance(error, LicenseDenied) and error.reason == "no_seats"


def test_a_request_refused_by_every_node_for_want_of_descriptors_ends_at_once() -> None:
    rig = Rig()
    rig.hold(1)
    rig.wire.starve = {0, 1, 2}
    fut = rig.checkout("solver")
    error = fut.exception(0)  # not at its deadline: no node can have acted on it
    assert isinstance(error, LicenseUnavailable) and "no file descriptor" in str(error)
    assert error.definite


def test_a_request_a_node_may_have_acted_on_waits_out_its_deadline_when_starved() -> None:
    rig = Rig()
    rig.hold(1)
    fut = rig.checkout("solver", timeout=1.0)  # one copy reached node 0
    rig.wire.starve = {0, 1, 2}
    rig.at(100.0 + TRY)
    assert not fut.done(), "node 0 owes an answer: the outcome is not definite"
    rig.at(101.0)
    assert isinstance(fut.exception(0), OutcomeUnknown)


def test_a_request_no_node_got_ends_unavailable_at_its_deadline() -> None:
    rig = Rig()
    rig.hold(1)
    rig.wire.refuse = {0, 1, 2}  # connections still being made: nothing left the process
    fut = rig.checkout("solver", timeout=1.0)
    rig.at(100.5)
    assert not fut.done()
    rig.at(101.0)
    assert isinstance(fut.exception(0), LicenseUnavailable)


def test_a_redirect_sends_the_next_try_to_the_primary_it_names() -> None:
    rig = Rig()
    rig.checkout()
    rig.answer(rig.wire.last("open"), Status.REDIRECT, primary=ENDPOINTS[2])
    assert rig.wire.last("open").node == 2 and rig.link.primary == 2
    rig.answer(rig.wire.last("open"), Status.UNAVAILABLE, detail="election")
    assert rig.wire.last("open").node == 0, "unavailable: the next node round robin"


def test_a_redirect_to_an_endpoint_not_in_the_list_is_learned() -> None:
    rig = Rig()
    rig.checkout()
    rig.answer(rig.wire.last("open"), Status.REDIRECT, primary="tcp://a.example:1")
    assert rig.link.endpoints[3] == "tcp://a.example:1" and rig.wire.last("open").node == 3


def test_an_older_copys_redirect_does_not_move_the_current_try() -> None:
    rig = Rig()
    rig.checkout()
    first = rig.wire.last("open")
    rig.at(100.0 + TRY)
    assert rig.wire.last("open").node == 1
    rig.answer(first, Status.REDIRECT, primary=ENDPOINTS[2])
    assert rig.wire.last("open").node == 1 and len(rig.wire.of("open")) == 2


def test_next_timer_is_the_earliest_thing_tick_has_to_do() -> None:
    rig = Rig()
    assert rig.link.next_timer() == float("inf")
    rig.checkout(timeout=2.0)
    assert rig.link.next_timer() == 100.0 + TRY  # the open's try
    rig.open_ok()
    rig.granted(rig.wire.last("checkout"), 1)
    assert rig.link.next_timer() == 100.0 + HEARTBEAT


# --- Exchange: which node next, when to re-send, definite or not


def test_exchange_misses_go_round_robin_and_back_off_after_each_full_round() -> None:
    ex = Exchange("checkout", {}, deadline=50.0)
    waits = []
    now = 0.0
    for _ in range(5):  # five full rounds of three misses
        for node in range(3):
            assert ex.node == node
            ex.record_send(node, True, now, TRY)
            assert ex.in_flight and ex.try_deadline == now + TRY
            assert ex.miss(now, 3, None)
        waits.append(round(ex.resend_at - now, 6))
        now = ex.resend_at
    assert waits == [0.01, 0.02, 0.04, 0.08, 0.16]
    for _ in range(6):
        ex.miss(now, 3, None)
    assert ex.resend_at - now == BACKOFF_CAP
    background = Exchange("open", {}, deadline=None, misses=3 * 20)
    background.miss(0.0, 3, None)
    background.miss(0.0, 3, None)
    background.miss(0.0, 3, None)
    assert background.resend_at == BACKOFF_CAP_BACKGROUND


def test_exchange_first_sent_is_kept_and_extra_try_lengthens_each_try() -> None:
    ex = Exchange("checkout", {}, deadline=10.0, extra_try=2.0)
    ex.record_send(0, False, 1.0, TRY)  # refused locally: nothing left the process
    assert ex.first_sent is None and not ex.in_flight
    ex.record_send(1, True, 2.0, TRY)
    ex.record_send(2, True, 3.0, TRY)
    assert ex.first_sent == 2.0 and ex.try_deadline == 3.0 + TRY + 2.0


def test_exchange_maybe_applied_while_any_node_owes_a_reply() -> None:
    ex = Exchange("checkout", {}, deadline=10.0)
    assert not ex.maybe_applied
    ex.record_send(0, True, 0.0, TRY)
    ex.record_send(1, True, 0.0, TRY)
    ex.record_reply(0)
    assert ex.maybe_applied, "node 1 owes one"
    ex.record_reply(1)
    assert not ex.maybe_applied


def test_exchange_waits_once_for_the_redirect_target_to_connect() -> None:
    ex = Exchange("checkout", {}, deadline=10.0)
    ex.record_send(0, True, 0.0, TRY)
    ex.miss(0.0, 3, 2)
    assert ex.node == 2 and ex.resend_at == 0.0
    assert ex.await_redirect(0.0) and ex.resend_at == BACKOFF_FIRST
    assert not ex.await_redirect(BACKOFF_FIRST), "passed over next time"


def test_exchange_quick_fail_gives_up_after_a_round_with_no_connection() -> None:
    ex = Exchange("close", {}, deadline=10.0, quick_fail=True)
    assert ex.miss(0.0, 3, None) and ex.miss(0.0, 3, None)
    assert not ex.miss(0.0, 3, None)
    connected = Exchange("close", {}, deadline=10.0, quick_fail=True)
    connected.record_send(0, True, 0.0, TRY)
    assert all(connected.miss(0.0, 3, None) for _ in range(3))


def test_exchange_next_timer_is_bounded_by_its_deadline() -> None:
    ex = Exchange("checkout", {}, deadline=0.1)
    ex.record_send(0, True, 0.0, TRY)
    assert ex.next_timer() == 0.1
    ex.deadline = None
    assert ex.next_timer() == TRY
