"""One server or triad of the license path, as the client's I/O thread drives it.

Theory of operation. A ``Link`` holds everything the client knows about one triad:
its endpoints and the last known primary, the session (sid, lease, heartbeats), the
requests in flight (``Exchange``s, matched to replies by ``(sid, req)``) and the grants
the application holds from it. It is called only from the I/O thread; it never reads
a clock (``now`` comes in) and never touches a socket (``send`` is handed in).
Links of many clients may share one connection to a node (engine.py): every request
carries a sid, so every reply names the link it belongs to; ``status`` needs no session
and carries the link's own ``tag`` as its sid for that reason alone.

Session states (``TRANSITIONS`` below is the whole table; ``Link._set_session`` checks
every change, and grants have their own table in grant.py):

    CLOSED ──first call needing a session──> OPENING ──open ok──> OPEN
    OPENING ──no node opened it / closed before any node could──> CLOSED
    OPEN ──our lease copy ran out──> LAPSED ──any ok/denied renews──> OPEN
    OPEN/LAPSED ──error unknown_session, grants held──> OPENING (new sid) ──open ok──> OPEN
                                                         + re-checkout
    OPEN/LAPSED ──error unknown_session, nothing held──> CLOSED (the next call opens)
    OPEN/LAPSED/OPENING ──close──> CLOSED

Rules:

- Requests needing a session wait in ``_waiting`` until it is open; the open itself is
  a background exchange, re-sent until some node answers.
- The lease copy counts from the *first* send of a request that was answered ``ok`` or
  ``denied`` (whichever copy the primary acted on, it was sent no earlier), so it
  lapses no later than the triad's. When it lapses, held grants become UNSAFE and are
  reported; heartbeats go on, and a renewal makes them HELD again. A grant got, or got
  back by a re-checkout, while the copy has lapsed (judged after that reply's own
  renewal) starts UNSAFE and is reported the same way: the triad may expire the session
  before the next renewal, and the application must not take it as safe meanwhile.
- ``unknown_session`` for the current sid means the triad expired the session: a new
  sid is opened and every grant still held is checked out again; those that cannot be
  got back become LOST and are reported. An application call that got
  ``unknown_session`` had no effect and is re-submitted on the new session.
- A checkout or checkin whose deadline passes while a node may have acted on it is
  answered ``OutcomeUnknown`` and goes on in the background with the same req; a
  grant it turns out to have got is checked back in. ``ack`` stays below it until
  then, so the triad keeps the recorded answer.
- A request whose caller stopped waiting (``abandon``: interrupted, or the I/O thread
  was late) ends as an unknown one does: a grant it gets, or got already, is checked
  back in. ``give_back`` checks a grant in with nobody waiting (a ``with`` block left by
  an exception when the checkin failed): released at once, re-sent in the background.
- A queued checkout asks each node for what is left of its wait (``Exchange.wait_until``,
  by the library's clock): a new primary never starts the application's wait over.
- Every ``ok`` reply of the session that carries the contract (``lease``, ``heartbeat``)
  is followed (``_adopt``), before it renews the lease copy: a node that takes over with
  another lease is heeded. The primary's connection dropping brings the next heartbeat
  forward, so that the new primary's contract is heard before its lease could run out.
- A node whose ZAP handler refused the client's key (``on_refused``, from the engine)
  is named as the cause of a call that no node served.
- A send the process cannot afford (``send`` raises ``LicenseUnavailable``: no
  descriptors left for a connection) is a miss that records the cause; once a request
  has met as many such refusals as the triad has nodes and no node can have acted on
  it, it ends at once, definite, with that cause, instead of waiting out its deadline.
"""

from __future__ import annotations

import enum
import functools
import itertools
import logging
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from zbroker.clients.errors import (
    LicenseError,
    LicenseUnavailable,
    OutcomeUnknown,
    ProtocolError,
)
from zbroker.clients.exchange import Exchange
from zbroker.clients.grant import Grant, GrantRecord, GrantState, IllegalTransition, _Releaser
from zbroker.clients.protocol import ErrorCode, Status
from zbroker.clients.wire import Reply, decode_reply, encode_request, failure_of, grant_of

log = logging.getLogger(__name__)  # under "zbroker.clients", which has the NullHandler

MAX_NODES = 6  # the triad's three, plus endpoints learned from redirects (other spellings)
# While a checkout waits in a queue, the session heartbeats at least this often: a frozen
# primary (SIGSTOP, a paused VM) breaks no connection, and the waiting checkout, which
# gets no answer until a seat frees, would stay on it for its whole wait. The heartbeat
# finds the new primary, and the checkout follows it (_follow).
WAIT_CHECK = 1.0
ACTIVE = (GrantState.HELD, GrantState.UNSAFE)

# (link, node index, frame) -> handed to zmq? Raises LicenseUnavailable (with the cause)
# when this process cannot afford a connection to that node: no descriptors left.
Send = Callable[["Link", int, bytes], bool]
Report = Callable[[list[Grant]], None]


class SessionState(enum.Enum):
    CLOSED = "closed"
    OPENING = "opening"
    OPEN = "open"
    LAPSED = "lapsed"


# from -> the states a session may go to
TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.CLOSED: frozenset({SessionState.OPENING}),
    SessionState.OPENING: frozenset({SessionState.OPEN, SessionState.CLOSED}),
    SessionState.OPEN: frozenset({SessionState.LAPSED, SessionState.OPENING, SessionState.CLOSED}),
    SessionState.LAPSED: frozenset({SessionState.OPEN, SessionState.OPENING, SessionState.CLOSED}),
}


@dataclass
class _Recovery:
    """One round of checking grants out again on a new session."""

    waiting: set[GrantRecord] = field(default_factory=set)
    lost: list[GrantRecord] = field(default_factory=list)


def _resolve(fut: Future[Any], value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: Future[Any], error: BaseException) -> None:
    if not fut.done():
        fut.set_exception(error)


def _log_idle_failure(fut: Future[Any]) -> None:
    if fut.exception() is not None:
        log.warning("a new session could not be marked idle: %s", fut.exception())


def _is_unknown_session(reply: Reply | None) -> bool:
    return (
        reply is not None
        and reply.status == Status.ERROR
        and reply.body.get("code") == ErrorCode.UNKNOWN_SESSION
    )


class Link:
    def __init__(
        self,
        entry: int,
        endpoints: tuple[str, ...],
        *,
        hello: Mapping[str, str],
        send: Send,
        report: Report,
        owner: _Releaser | weakref.ref[_Releaser],
        new_sid: Callable[[], str],
        try_timeout: float,
        recover_timeout: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.entry = entry
        self.tag = new_sid()  # the sid of this link's status requests: routes their replies
        self.triad = endpoints
        self.endpoints = list(endpoints)
        self.primary = 0  # index of the node believed to be primary
        self.state = SessionState.CLOSED
        self.sid: str | None = None
        self.lease = 0.0
        self.heartbeat = 0.0
        self.lease_deadline = 0.0
        self.next_heartbeat = 0.0
        self.heartbeat_sent = 0.0  # when the last heartbeat started
        self._queued = 0  # exchanges in the table that may wait in a queue (extra_try)
        # Records of this link's grants not yet released or lost: never the application's
        # Grants, which keep the client alive (grant.py), so the engine holding the link
        # does not keep an application's client, dropped with its grants, from closing.
        self.held: list[GrantRecord] = []
        self.idle = False  # the application said it is idle (TIMEOUT): a new session says so too
        self._hello = dict(hello)
        self._send = send
        self._report = report
        # A LicenseClient passes itself weakly: the engine, which holds every link, must not
        # keep an application's client alive (it is closed when collected).
        self._owner = owner
        self._new_sid = new_sid
        self._try_timeout = try_timeout
        self._recover_timeout = recover_timeout
        self._clock = clock  # read by grants' ``safe`` on application threads, never here
        self._reqs = itertools.count(1)  # one counter for all sessions: unique in each
        self._next_req = next(self._reqs)
        self._table: dict[tuple[str | None, int], Exchange] = {}
        self._waiting: list[Exchange] = []
        self._hb: Exchange | None = None
        self._opening: Exchange | None = None  # the open in flight, while OPENING
        self._now = 0.0
        self._refused: dict[int, str] = {}  # node -> why its ZAP handler refused our key

    @property
    def name(self) -> str:
        return ",".join(self.triad)

    def lease_valid(self) -> bool:
        """Whether the lease copy is still running by the clock now (True without a clock):
        ``Grant.safe`` asks it at each read, from any thread (one float read)."""
        return self._clock is None or self._clock() < self.lease_deadline

    # --- operations from application threads (run on the I/O thread)
    def checkout(
        self,
        fut: Future[Any],
        now: float,
        *,
        feature: str,
        count: int,
        version: str | None,
        wait: float | None,
        deadline: float,
        grouping: Mapping[str, str] | None = None,
    ) -> None:
        self._now = now
        fields = {
            "op": "checkout",
            "feature": feature,
            "count": count,
            "version": version,
            "wait": wait,
            **(grouping or {}),  # dup, vendor_string: only when the application gave them
        }
        ex = Exchange("checkout", fields, deadline, extra_try=wait or 0.0)
        ex.wait_until = None if wait is None else now + wait
        ex.done = lambda ex, reply: self._checkout_done(fut, ex, reply)
        ex.unknown = lambda ex: _fail(
            fut,
            OutcomeUnknown(
                f"checkout of {feature} on {self.name}: no answer before the deadline; the library "
                "will learn the outcome and check back in any grant it got"
            ),
        )
        self._submit(ex)

    def checkin(self, fut: Future[Any], now: float, view: Grant, deadline: float) -> None:
        self._now = now
        grant = view._record  # the exchange keeps the record only: see ``held``
        if grant.state is GrantState.RECOVERING:  # re-checkout in flight: it checks in when done
            self._forget(grant, GrantState.RELEASED)
        if grant.state not in ACTIVE:
            _resolve(fut, None)
            return
        ex = Exchange("checkin", {"op": "checkin", "grant": grant.id}, deadline, sid=grant._session)
        ex.done = lambda ex, reply: self._checkin_done(fut, grant, ex, reply)

        def unknown(ex: Exchange) -> None:
            self._forget(grant, GrantState.RELEASED)  # settled in the background
            _fail(
                fut,
                OutcomeUnknown(
                    f"checkin of grant {grant.id} on {self.name}: no answer "
                    "before the deadline; the library keeps re-sending it"
                ),
            )

        ex.unknown = unknown
        self._start(ex)

    def ask(
        self, fut: Future[Any], now: float, op: str, fields: dict[str, Any], deadline: float
    ) -> None:
        """A request of the session that holds no grant of the link (``borrow``,
        ``return``): resolves with the ``ok`` reply's body, fails as a checkout does."""
        self._now = now
        what = f"{op} of {fields.get('feature')} on {self.name}"
        ex = Exchange(op, {"op": op, **fields}, deadline)

        def done(ex: Exchange, reply: Reply | None) -> None:
            if reply is None:
                _fail(fut, self._unavailable(f"could serve the {op} request", ex))
            elif reply.status == Status.OK:
                _resolve(fut, dict(reply.body))
            elif _is_unknown_session(reply):
                if not fut.done():  # no effect: ask again on the new session
                    again = Exchange(op, ex.fields, ex.deadline, done=done, unknown=ex.unknown)
                    self._submit(again)
            else:
                _fail(fut, failure_of(reply))

        ex.done = done
        ex.unknown = lambda ex: _fail(
            fut, OutcomeUnknown(f"{what}: no answer before the deadline; ask again to learn it")
        )
        self._submit(ex)

    def set_idle(self, fut: Future[Any], now: float, idle: bool, deadline: float) -> None:
        """Mark the session idle or busy again (``idle``: docs/protocol.md). A link with no
        open session only remembers it: opening one would cost a session for nothing, and
        the session it opens later is marked as it opens (``_open_done``)."""
        self._now = now
        self.idle = idle
        if self.sid is None or self.state not in (SessionState.OPEN, SessionState.LAPSED):
            _resolve(fut, None)
            return
        self.ask(fut, now, "idle", {"idle": idle}, deadline)

    def status(self, fut: Future[Any], now: float, deadline: float) -> None:
        self._now = now

        def done(ex: Exchange, reply: Reply | None) -> None:
            if reply is None:
                _fail(fut, self._unavailable("answered status", ex))
            elif reply.status == Status.OK:
                # protocol.md calls the payload ``status`` (clashing with the reply's own
                # status field); broker/node.py sends ``report``: accept either.
                key = "report" if "report" in reply.body else "status"
                try:
                    _resolve(fut, reply.mapping(key))
                except ProtocolError as exc:
                    _fail(fut, exc)
            else:
                _fail(fut, failure_of(reply))

        self._start(Exchange("status", {"op": "status"}, deadline, done=done, sid=self.tag))

    def close(self, fut: Future[Any], now: float, deadline: float) -> None:
        """Close the session (releasing everything on the triad); best effort by the deadline."""
        self._now = now
        waiting, self._waiting = self._waiting, []
        for ex in waiting:
            ex.done(ex, None)
        opening = self._opening
        if self.sid is None or (opening is not None and not opening.maybe_applied):
            self._closed()  # no node can have opened it: nothing to close
            _resolve(fut, None)
            return

        def done(ex: Exchange, reply: Reply | None) -> None:
            if reply is None or reply.status != Status.OK:
                log.info("close of session on %s not confirmed: the triad expires it", self.name)
            self._closed()
            _resolve(fut, None)

        self._start(
            Exchange("close", {"op": "close"}, deadline, done=done, sid=self.sid, quick_fail=True)
        )

    def abandon(self, fut: Future[Any], now: float) -> None:
        """The caller stopped waiting for ``fut`` (interrupted, or the I/O thread
        answered late): nothing it gets may stay held. A request still going on ends as an
        unknown outcome does (a grant it gets is checked back in: ``_checkout_done``); a
        grant it got already, which its caller never saw, is given back."""
        self._now = now
        if not fut.done():
            _fail(fut, OutcomeUnknown("its caller stopped waiting"))
        elif fut.exception() is None and isinstance(fut.result(), Grant):
            self.give_back(fut.result(), now)

    def give_back(self, view: Grant, now: float) -> None:
        """Check ``view`` in without anyone waiting: it is released at once for the
        application, and the checkin is re-sent in the background until a node answers
        (or the triad forgets the session, which frees the seats too)."""
        self._now = now
        grant = view._record
        if grant not in self.held:
            return  # already ended
        recovering = grant.state is GrantState.RECOVERING  # its re-checkout gives it back
        self._forget(grant, GrantState.RELEASED)
        if not recovering:
            self._release_quietly(grant._session, grant.id)

    def abort(self, now: float) -> None:
        """The client is stopping: end every exchange as its deadline would."""
        self._now = now
        for ex in self._waiting:
            ex.done(ex, None)
        self._waiting = []
        for ex in list(self._table.values()):
            if ex.deadline is not None:  # background ones have nobody to tell
                self._expire(ex)
        self._table.clear()
        self._queued = 0

    # --- events
    def on_frame(self, node: int, frame: bytes, now: float) -> None:
        try:
            reply = decode_reply(frame)
        except ProtocolError as exc:
            log.warning("dropped a reply from %s: %s", self.endpoints[node], exc)
            return
        self.on_reply(node, reply, now)

    def on_reply(self, node: int, reply: Reply, now: float) -> bool:
        """A decoded reply from ``node``; False when it answers no request of this link."""
        self._now = now
        if reply.req is None:
            ex = self._status_without_req(reply)
        else:
            ex = self._table.get((reply.sid, reply.req))
        if ex is None:
            return False  # a late duplicate, the answer to a request given up, not ours
        if reply.body.get("outcome") != "unknown":
            # A redirect from a node that had proposed the request while primary says
            # nothing about its fate: that copy still counts as unanswered.
            ex.record_reply(node)
        if reply.status in (Status.REDIRECT, Status.UNAVAILABLE):
            detail = reply.body.get("detail")
            if reply.status == Status.UNAVAILABLE and isinstance(detail, str) and detail:
                ex.said = f"{self.endpoints[node]}: {detail[:200]}"
            if ex.in_flight and node != ex.node:
                return True  # an older try's answer: the current try may still succeed
            to = None
            target = reply.body.get("primary")
            if reply.status == Status.REDIRECT and isinstance(target, str):
                to = self._node_for(target)
            moved = to is not None and to != self.primary
            if to is not None:
                self.primary = to
            self._missed(ex, to)
            if moved:
                self._follow()
            return True
        if ex.op != "status" and reply.status in (Status.OK, Status.DENIED):
            if node != self.primary:  # only the primary gives those
                self.primary = node
                self._follow()
            if ex.sid == self.sid and ex.op != "open":  # an open's values: _open_done
                self._adopt(reply)  # before the renewal: it counts by the primary's lease
                self._renewed(ex)
        # After the renewal, before the completion: a grant this reply gives is judged
        # by a lease copy that is up to date, even when no tick ran since it ran out.
        self._lapse(now)
        self._untable(ex)
        if ex is self._hb:
            self._hb = None
        if (
            _is_unknown_session(reply)
            and ex.op != "close"  # being closed anyway: nothing to recover
            and ex.sid is not None
            and ex.sid == self.sid
        ):
            self._session_gone()
        ex.done(ex, reply)
        return True

    def _status_without_req(self, reply: Reply) -> Exchange | None:
        """A status answer with ``req`` nil (an older node): match this link's oldest."""
        if reply.status != Status.OK or reply.sid not in (None, self.tag):
            return None
        return next((ex for ex in self._table.values() if ex.op == "status"), None)

    def on_disconnected(self, node: int, now: float) -> None:
        """The connection to ``node`` dropped (its process died): stop waiting on it.

        The copies it had stay unanswered, so their outcome stays unknown until another
        node answers the same request; the next ``tick`` re-sends them elsewhere. The
        primary's drop also brings the next heartbeat forward, to learn the contract of
        the node that takes over.
        """
        for ex in self._table.values():
            if ex.in_flight and ex.node == node:
                ex.try_deadline = min(ex.try_deadline, now)
        if node == self.primary and self.state in (SessionState.OPEN, SessionState.LAPSED):
            # Heartbeat now: the next primary may ask for a shorter lease, and only its
            # reply says so (_adopt); waiting out our interval could outlast that lease.
            self.next_heartbeat = min(self.next_heartbeat, now)

    def on_refused(self, node: int, why: str | None) -> None:
        """The node's ZAP handler refused this client's key (``why``), or accepts it now
        (None): a try the node cannot take ends its call with that cause (``_try``)."""
        if why is None:
            self._refused.pop(node, None)
        else:
            self._refused[node] = why

    def tick(self, now: float) -> None:
        self._now = now
        for ex in [w for w in self._waiting if w.deadline is not None and now >= w.deadline]:
            self._waiting.remove(ex)
            if self._opening is not None:  # why the session it waited for did not open
                ex.cause = ex.cause or self._opening.cause
                ex.said = ex.said or self._opening.said
            ex.done(ex, None)  # never sent: definitely nothing happened
        for ex in list(self._table.values()):
            if ex.key not in self._table:
                continue  # finished by an earlier step of this loop
            if ex.deadline is not None and now >= ex.deadline:
                self._expire(ex)
            elif ex.in_flight and now >= ex.try_deadline:
                self._missed(ex, None)
            elif not ex.in_flight and now >= ex.resend_at:
                self._try(ex)
        self._lease_tick(now)

    def next_timer(self) -> float:
        """The earliest time ``tick`` has something to do."""
        times = [ex.next_timer() for ex in self._table.values()]
        times += [ex.deadline for ex in self._waiting if ex.deadline is not None]
        if self.state is SessionState.OPEN:
            times.append(self.lease_deadline)
        if self.state in (SessionState.OPEN, SessionState.LAPSED) and self._hb is None:
            times.append(self._heartbeat_due())
        return min(times, default=float("inf"))

    # --- sending
    def _submit(self, ex: Exchange) -> None:
        """Send now if the session is open, else wait for it (opening it if needed)."""
        if self.state in (SessionState.OPEN, SessionState.LAPSED):
            ex.sid = self.sid
            self._start(ex)
            return
        self._waiting.append(ex)
        if self.state is SessionState.CLOSED:
            self._open()

    def _start(self, ex: Exchange) -> None:
        ex.req = self._next_req
        self._next_req = next(self._reqs)
        ex.node = self.primary
        self._table[ex.key] = ex
        self._queued += ex.extra_try > 0
        self._try(ex)

    def _untable(self, ex: Exchange) -> None:
        if self._table.pop(ex.key, None) is not None:
            self._queued -= ex.extra_try > 0

    def _ack(self, sid: str | None) -> int:
        if sid is None:
            return 0
        return min((req for (s, req) in self._table if s == sid), default=self._next_req)

    def _try(self, ex: Exchange) -> None:
        """Send one copy; on a local refusal move on at once, at most one round."""
        for _ in range(len(self.endpoints)):
            fields = {**ex.fields, "req": ex.req, "ack": self._ack(ex.sid)}
            if ex.wait_until is not None:  # what is left of the wait: see Exchange.wait_until
                fields["wait"] = max(0.0, ex.wait_until - self._now)
            if ex.sid is not None:
                fields["sid"] = ex.sid
            connecting = True
            try:
                ok = self._send(self, ex.node, encode_request(fields))
            except LicenseUnavailable as exc:  # no connection affordable: see Send
                ex.cause, ex.starved, ok, connecting = exc.detail, ex.starved + 1, False, False
                if ex.starved >= len(self.endpoints) and not ex.maybe_applied:
                    self._finish(ex, None)
                    return
            ex.record_send(ex.node, ok, self._now, self._try_timeout)
            if ok:
                return
            if ex.node in self._refused:  # not connected, and why: the node refused our key
                ex.cause = self._refused[ex.node]
            if connecting and ex.await_redirect(self._now):
                return  # tick sends it
            if not ex.miss(self._now, len(self.endpoints), None):
                self._finish(ex, None)
                return
            if ex.resend_at > self._now:
                return  # backing off: tick sends it

    def _follow(self) -> None:
        """A new primary: checkouts waiting in a queue on another node go to it (the same
        request: a waiter already in its line stays one)."""
        for ex in list(self._table.values()):
            if ex.in_flight and ex.extra_try > 0 and ex.node != self.primary:
                self._missed(ex, self.primary)

    def _heartbeat_due(self) -> float:
        if self._queued:  # a checkout that may wait in a queue is out (no scan: each cycle)
            return min(self.next_heartbeat, self.heartbeat_sent + WAIT_CHECK)
        return self.next_heartbeat

    def _missed(self, ex: Exchange, to: int | None) -> None:
        if not ex.miss(self._now, len(self.endpoints), to):
            self._finish(ex, None)
        elif ex.resend_at <= self._now:
            self._try(ex)

    def _expire(self, ex: Exchange) -> None:
        if ex.unknown is not None and ex.maybe_applied:
            tell, ex.unknown, ex.deadline = ex.unknown, None, None
            tell(ex)  # the exchange stays in the table to learn the outcome
        else:
            self._finish(ex, None)

    def _finish(self, ex: Exchange, reply: Reply | None) -> None:
        self._untable(ex)
        if ex is self._hb:
            self._hb = None
        ex.done(ex, reply)

    def _unavailable(self, what: str, ex: Exchange) -> LicenseUnavailable:
        """The error of a request that no node acted on, with the local cause if any and
        the last node's word (no quorum, an election) if one answered: the application
        tells "nothing is running" from "the triad is between primaries"."""
        cause = f": {ex.cause}" if ex.cause else ""
        said = f" (last answer: {ex.said})" if ex.said else "" if cause else " (no node answered)"
        return LicenseUnavailable(f"no server of {self.name} {what}{cause}{said}")

    def _node_for(self, endpoint: str) -> int | None:
        if endpoint in self.endpoints:
            return self.endpoints.index(endpoint)
        if len(self.endpoints) >= MAX_NODES:
            return None
        self.endpoints.append(endpoint)  # the engine connects it on first send
        return len(self.endpoints) - 1

    # --- the session
    def _set_session(self, state: SessionState) -> None:
        """The one way the session changes state: along ``TRANSITIONS`` only."""
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"session {self.sid} on {self.name}", self.state, state)
        self.state = state

    def _open(self) -> None:
        self._set_session(SessionState.OPENING)
        self.sid = self._new_sid()
        self._opening = Exchange(
            "open", {"op": "open", **self._hello}, None, done=self._open_done, sid=self.sid
        )
        self._start(self._opening)

    def _open_done(self, ex: Exchange, reply: Reply | None) -> None:
        if ex.sid != self.sid:
            return
        self._opening = None
        error: LicenseError = LicenseUnavailable(
            f"could not open a session on {self.name}" + (f": {ex.cause}" if ex.cause else "")
        )
        if reply is not None and reply.status == Status.OK and ex.first_sent is not None:
            try:
                lease, heartbeat = reply.seconds("lease"), reply.seconds("heartbeat")
            except ProtocolError as exc:
                error = exc
            else:
                self._set_session(SessionState.OPEN)
                self.lease, self.heartbeat = lease, heartbeat
                self.lease_deadline = ex.first_sent + lease
                self.next_heartbeat = self._now + heartbeat
                self._recover()  # before the waiting calls: held seats come back first
                if self.idle:  # a new session starts busy on the triad: say it is not
                    marked: Future[Any] = Future()  # no one waits: a failure is logged
                    marked.add_done_callback(_log_idle_failure)
                    self.ask(marked, self._now, "idle", {"idle": True}, self._now + lease)
                waiting, self._waiting = self._waiting, []
                for w in waiting:
                    self._submit(w)
                return
        elif reply is not None:
            error = failure_of(reply)
        log.warning("session on %s not opened: %s", self.name, error)
        self._set_session(SessionState.CLOSED)
        self.sid = None
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            w.cause, w.said = w.cause or ex.cause, w.said or ex.said
            w.done(w, reply)
        lost = [g for g in self.held if g.state is GrantState.RECOVERING]
        for grant in lost:
            self._forget(grant, GrantState.LOST)
        if lost:
            self._tell(lost)

    def _renewed(self, ex: Exchange) -> None:
        if ex.first_sent is None or self.state not in (SessionState.OPEN, SessionState.LAPSED):
            return
        self.lease_deadline = max(self.lease_deadline, ex.first_sent + self.lease)
        if self.state is SessionState.LAPSED and self._now < self.lease_deadline:
            log.info("lease on %s renewed: grants safe again", self.name)
            self._set_session(SessionState.OPEN)
            for grant in self.held:
                if grant.state is GrantState.UNSAFE:
                    grant._set_state(GrantState.HELD)

    def _lapse(self, now: float) -> None:
        """OPEN -> LAPSED once our lease copy ran out: held grants are no longer safe."""
        if self.state is SessionState.OPEN and now >= self.lease_deadline:
            log.warning("lease on %s lapsed: grants no longer safe", self.name)
            self._set_session(SessionState.LAPSED)
            unsafe = [g for g in self.held if g.state is GrantState.HELD]
            for grant in unsafe:
                grant._set_state(GrantState.UNSAFE)
            if unsafe:
                self._tell(unsafe)

    def _lease_tick(self, now: float) -> None:
        self._lapse(now)
        if (
            self.state in (SessionState.OPEN, SessionState.LAPSED)
            and self._hb is None
            and now >= self._heartbeat_due()
        ):
            self.next_heartbeat, self.heartbeat_sent = now + self.heartbeat, now
            deadline = now + max(self.heartbeat, 3 * self._try_timeout)
            self._hb = Exchange(
                "heartbeat", {"op": "heartbeat"}, deadline, done=self._heartbeat_done, sid=self.sid
            )
            self._start(self._hb)

    def _adopt(self, reply: Reply) -> None:
        """Follow the contract of the primary that answered: the lease and heartbeat
        interval a reply carries (a node restarted with another ``lease`` may take over).
        A reply with a lease but no interval (a heartbeat's, docs/protocol.md) keeps the
        interval's share of the lease, as a node derives the one from the other."""
        if reply.status != Status.OK or "lease" not in reply.body or self.lease <= 0:
            return
        try:
            lease = reply.seconds("lease")
            if "heartbeat" in reply.body:
                heartbeat = reply.seconds("heartbeat")
            else:
                heartbeat = self.heartbeat * (lease / self.lease)  # same lease: same, exactly
        except ProtocolError as exc:
            log.warning("reply from %s: %s", self.name, exc)
            return
        if (lease, heartbeat) != (self.lease, self.heartbeat):
            log.info(
                "%s asks for a lease of %g s, heartbeats every %g s (was %g s, %g s)",
                self.name, lease, heartbeat, self.lease, self.heartbeat,
            )  # fmt: skip
        self.lease, self.heartbeat = lease, heartbeat
        self.next_heartbeat = min(self.next_heartbeat, self._now + heartbeat)

    def _heartbeat_done(self, ex: Exchange, reply: Reply | None) -> None:
        if reply is not None and reply.status == Status.OK and "taken" in reply.body:
            self._taken(ex.sid, reply.body["taken"])

    def _taken(self, sid: str | None, taken: object) -> None:
        """The triad took these grants from session ``sid`` (docs/protocol.md, heartbeat):
        each held one goes LOST with its reason and is reported once; the triad lists a
        grant until it forgets it, and a grant no longer held is not reported again."""
        if not isinstance(taken, list):
            log.warning("heartbeat reply from %s: 'taken' is not a list", self.name)
            return
        reasons: dict[int, str] = {}
        for item in taken:
            gid = item.get("grant") if isinstance(item, dict) else None
            why = item.get("reason") if isinstance(item, dict) else None
            if isinstance(gid, int) and isinstance(why, str):
                reasons[gid] = why[:64]
        lost = [g for g in self.held if g._session == sid and g.id in reasons and g.state in ACTIVE]
        for grant in lost:
            log.warning(
                "grant %d of %s on %s was taken by the triad: %s",
                grant.id,
                grant.feature,
                self.name,
                reasons[grant.id],
            )
            grant._taken(reasons[grant.id])
            self.held.remove(grant)
        if lost:
            self._tell(lost)

    def _session_gone(self) -> None:
        log.warning("%s no longer knows session %s", self.name, self.sid)
        self._hb = None
        recovering = [g for g in self.held if g.state in ACTIVE]
        for grant in recovering:
            grant._set_state(GrantState.RECOVERING)
        if recovering:
            self._open()  # a new sid at once, to check them out again
        else:
            self._set_session(SessionState.CLOSED)  # the next call that needs one opens it
            self.sid = None

    def _closed(self) -> None:
        # Already CLOSED when the triad forgot the session while the close was on its way.
        if self.state is not SessionState.CLOSED:
            self._set_session(SessionState.CLOSED)
        self.sid, self._hb, self._opening = None, None, None
        for grant in list(self.held):
            self._forget(grant, GrantState.RELEASED)

    # --- grants
    def _alive_owner(self) -> _Releaser | None:
        """The client, or None once it was collected (a LicenseClient passes itself weakly)."""
        return self._owner() if isinstance(self._owner, weakref.ref) else self._owner

    def _tell(self, records: list[GrantRecord]) -> None:
        """Report grants to the application, as the Grants it holds (``GrantRecord.grant``);
        a client collected meanwhile has nobody left to tell."""
        owner = self._alive_owner()
        if owner is not None:
            self._report([record.grant(owner) for record in records])

    def _forget(self, grant: GrantRecord, state: GrantState) -> None:
        """The grant ends (RELEASED or LOST) and leaves ``held``; it ends once: a grant
        not in ``held`` already ended (a checkin settled after OutcomeUnknown)."""
        if grant in self.held:
            grant._set_state(state)
            self.held.remove(grant)

    def _checkout_done(self, fut: Future[Any], ex: Exchange, reply: Reply | None) -> None:
        if reply is None:  # never reached a node that could act on it
            _fail(fut, self._unavailable("could serve the checkout", ex))
            return
        if reply.status == Status.OK:
            try:
                info = grant_of(reply)
            except ProtocolError as exc:
                _fail(fut, exc)
                return
            owner = self._alive_owner()
            # Settled after OutcomeUnknown, abandoned, or its client was collected: give it back.
            if fut.done() or ex.sid is None or owner is None:
                self._release_quietly(ex.sid, info.id)
                return
            grant = GrantRecord(
                id=info.id,
                feature=info.feature,
                version=info.version,
                count=info.count,
                triad=self.triad,
                entry=self.entry,
                session=ex.sid,
                state=self._granted_state(),
                lease_valid=self.lease_valid,
            )
            grant._grouping = {k: ex.fields[k] for k in ("dup", "vendor_string") if k in ex.fields}
            self.held.append(grant)
            _resolve(fut, grant.grant(owner))
            self._report_if_unsafe(grant)
        elif _is_unknown_session(reply):
            if not fut.done():  # no effect: ask again on the new session
                again = Exchange(
                    "checkout",
                    ex.fields,
                    ex.deadline,
                    done=ex.done,
                    unknown=ex.unknown,
                    extra_try=ex.extra_try,
                    wait_until=ex.wait_until,
                )
                self._submit(again)
        else:
            _fail(fut, failure_of(reply))

    def _checkin_done(
        self, fut: Future[Any], grant: GrantRecord, ex: Exchange, reply: Reply | None
    ) -> None:
        if reply is None:
            _fail(fut, self._unavailable("took the checkin", ex))
        elif reply.status == Status.OK or _is_unknown_session(reply):
            self._forget(grant, GrantState.RELEASED)  # unknown session: it holds nothing
            _resolve(fut, None)
        else:
            if reply.status == Status.DENIED:  # not_held: this session holds nothing of it
                self._forget(grant, GrantState.RELEASED)
            _fail(fut, failure_of(reply))

    def _granted_state(self) -> GrantState:
        """The state of a grant got now: HELD only while our lease copy is valid."""
        return GrantState.HELD if self.state is SessionState.OPEN else GrantState.UNSAFE

    def _report_if_unsafe(self, grant: GrantRecord) -> None:
        if grant.state is GrantState.UNSAFE:
            log.warning(
                "grant %d of %s on %s got while the lease lapsed: not safe until renewed",
                grant.id,
                grant.feature,
                self.name,
            )
            self._tell([grant])

    def _release_quietly(self, sid: str | None, grant_id: int) -> None:
        """Check in a grant nobody holds (settled checkout, late re-checkout)."""
        if sid is None:
            return
        log.info("checking in grant %d on %s: no one holds it", grant_id, self.name)
        self._start(Exchange("checkin", {"op": "checkin", "grant": grant_id}, None, sid=sid))

    def _recover(self) -> None:
        """Check out again, on the new session, every grant the triad forgot."""
        grants = [g for g in self.held if g.state is GrantState.RECOVERING]
        if not grants:
            return
        round_ = _Recovery(waiting=set(grants))
        deadline = self._now + self._recover_timeout
        for grant in grants:
            fields = {
                "op": "checkout",
                "feature": grant.feature,
                "count": grant.count,
                "version": grant.version,
                "wait": None,
                **grant._grouping,  # back into its duplicate group
            }
            ex = Exchange("checkout", fields, deadline, sid=self.sid)
            ex.done = functools.partial(self._recovered, round_, grant)
            ex.unknown = functools.partial(self._recovered, round_, grant, reply=None)
            self._start(ex)

    def _recovered(
        self, round_: _Recovery, grant: GrantRecord, ex: Exchange, reply: Reply | None
    ) -> None:
        counted = grant not in round_.waiting  # already given up at the deadline
        round_.waiting.discard(grant)
        info = None
        if reply is not None and reply.status == Status.OK:
            try:
                info = grant_of(reply)
            except ProtocolError as exc:
                log.warning("re-checkout reply from %s: %s", self.name, exc)
        if info is not None and ex.sid is not None:
            if grant.state is GrantState.RECOVERING and not counted:
                grant._rebind(info.id, info.version, ex.sid, self._granted_state())
                self._report_if_unsafe(grant)
            else:  # released meanwhile, or already reported lost: nobody wants it
                self._release_quietly(ex.sid, info.id)
        elif _is_unknown_session(reply):
            pass  # the new session vanished too: the next round takes the grant over
        elif not counted and grant.state is GrantState.RECOVERING:
            self._forget(grant, GrantState.LOST)
            round_.lost.append(grant)
        if not round_.waiting and round_.lost:
            lost, round_.lost = round_.lost, []
            self._tell(lost)
