"""One request on its way to a triad: which node next, when to re-send, when to give up.

Theory of operation. An ``Exchange`` is one request (one ``(sid, req)``) and its
tries. A try sends the same frame to one node and waits ``try_timeout`` for a reply.
A try *misses* when it times out, when the node answers ``unavailable`` or
``redirect``, or when the send is refused locally (no connection to that node yet: the
DEALER sockets use ZMQ_IMMEDIATE, so a message never queues for a node that is not
there). After a miss the next try goes to the redirect target if one was named, else
to the next node round robin; after every full round of misses it waits a backoff
that doubles up to a cap, so a triad in an election is not hammered. A send to the
node a redirect named that is refused locally (its connection is still being made)
is tried again once after ``BACKOFF_FIRST`` instead of going back round the nodes
that just redirected it.

Definite versus unknown (see errors.py) is decided by counting, per node, copies sent
and replies received: a node with more copies than replies may have acted on one, so
``maybe_applied`` is true as soon as any node owes a reply. Pure bookkeeping: no
socket, no clock read; times come in as arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zbroker.clients.wire import Reply

BACKOFF_FIRST = 0.01  # after the first full round: a fresh socket is usually up by then
BACKOFF_CAP = 0.25  # calls with a deadline: an election takes well under a second
BACKOFF_CAP_BACKGROUND = 1.0  # settlement and session opening with no one waiting

Done = Callable[["Exchange", Reply | None], None]  # None: gave up with nothing applied


def _nothing(ex: Exchange, reply: Reply | None) -> None:
    """Default completion: nobody is waiting for this exchange."""


@dataclass(eq=False)
class Exchange:
    op: str
    fields: dict[str, Any]  # op-specific fields; v, sid, req and ack are added when sent
    deadline: float | None  # None: background, re-sent until answered or dropped
    done: Done = _nothing
    # Called instead of ``done`` when the deadline passes and the outcome is unknown; the
    # exchange then goes on in the background with ``deadline=None`` to settle it.
    unknown: Callable[[Exchange], None] | None = None
    sid: str | None = None  # fixed when assigned to a session (None for status)
    req: int = 0
    extra_try: float = 0.0  # added to the per-try timeout (a checkout that may queue)
    # A queued checkout's end of wait, by the library's clock: each copy asks for what is
    # left of it, so a new primary (which counts a wait from when it hears the request)
    # never restarts it, and the whole wait stays what the application asked.
    wait_until: float | None = None
    quick_fail: bool = False  # give up after a round in which no node was connected
    node: int = 0
    in_flight: bool = False
    try_deadline: float = 0.0
    resend_at: float = 0.0
    first_sent: float | None = None  # when the first copy left: leases count from here
    misses: int = 0
    round_connected: bool = False  # some send of the current round reached a connection
    cause: str | None = None  # why a send was refused locally, for the error it may end in
    said: str | None = None  # the last node's own word for not serving it ("no quorum")
    starved: int = 0  # sends refused because the process had no descriptor for a connection
    redirected: int | None = None  # the node a redirect named, until a try went to it
    sent: dict[int, int] = field(default_factory=dict)  # node -> copies sent
    answered: dict[int, int] = field(default_factory=dict)  # node -> replies received

    @property
    def key(self) -> tuple[str | None, int]:
        return (self.sid, self.req)

    @property
    def maybe_applied(self) -> bool:
        return any(n > self.answered.get(node, 0) for node, n in self.sent.items())

    def record_send(self, node: int, ok: bool, now: float, try_timeout: float) -> None:
        """A copy went to ``node`` (ok) or the send was refused locally (not ok)."""
        self.node = node
        if ok:
            self.sent[node] = self.sent.get(node, 0) + 1
            self.in_flight = True
            self.round_connected = True
            self.try_deadline = now + try_timeout + self.extra_try
            if self.first_sent is None:
                self.first_sent = now

    def record_reply(self, node: int) -> None:
        self.answered[node] = self.answered.get(node, 0) + 1

    def miss(self, now: float, nodes: int, to: int | None) -> bool:
        """Plan the next try after a miss; False when a quick-fail exchange should give up."""
        self.in_flight = False
        self.misses += 1
        self.redirected = to
        self.node = to if to is not None else (self.node + 1) % nodes
        self.resend_at = now
        if self.misses % nodes == 0:  # a full round without an answer: back off
            if self.quick_fail and not self.round_connected:
                return False
            rounds = self.misses // nodes
            cap = BACKOFF_CAP if self.deadline is not None else BACKOFF_CAP_BACKGROUND
            self.resend_at = now + min(cap, BACKOFF_FIRST * 2 ** (rounds - 1))
            self.round_connected = False
        return True

    def await_redirect(self, now: float) -> bool:
        """A send to the redirect's node was refused locally: wait for it, once; True if so."""
        if self.redirected is None or self.redirected != self.node:
            return False
        self.redirected = None  # a node that stays unreachable is passed over next time
        self.in_flight = False
        self.resend_at = now + BACKOFF_FIRST
        return True

    def next_timer(self) -> float:
        """The earliest time this exchange needs attention."""
        due = self.try_deadline if self.in_flight else self.resend_at
        return due if self.deadline is None else min(due, self.deadline)
