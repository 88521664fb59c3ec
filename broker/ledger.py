"""The ledger: who holds which seats, as a pure, replicated state machine.

Theory of operation
-------------------
State comes in two kinds.

*Replicated* (the same on every node, in every snapshot): the entitlements and the
options file (``broker/options.py``), the sessions (user, host, display, client
version, the address it opened from and its project, opening time, ``ack`` and the
replies recorded under their request ids), the grants, and the counter ``next_grant``.
Only ``apply(delta)`` changes it, and ``apply`` decides nothing: a delta carries every
decision (the grant id, the pool, the wall time), so the same deltas applied in the
same order to the same snapshot give the same ledger everywhere. Deltas also carry, for
the report log alone (docs/reportlog.md), facts ``apply`` ignores: every delta's wall
time, what a denied checkout asked for, how long a queued one ``waited``; a delta
without them (an older log's) applies alike. ``apply`` checks that a delta fits before
touching anything and raises ``LedgerError`` otherwise, so a bad delta leaves the state
as it was.

*Volatile* (the primary's alone, never replicated, empty after a failover): the
lease deadline of each session and the wait queue of each feature. A node
whose role changes calls ``forget_volatile()`` so that it never acts on leases or
waiters from an earlier term (a queued client re-sends to the new primary).

Decisions are made on the primary by ``handle(request, now)`` and ``tick(now)``,
which read the replicated state, may change the volatile state and return deltas,
each with the reply its client gets once it commits (``Decided``); the node applies
them at once, in order, and answers clients once they commit. Rules worth keeping in
mind:

- Exactly once: a request whose reply is recorded gets that reply again, with no
  delta. Every session delta carries the client's ``ack``; replies below it are
  forgotten, and a request below it is stale.
- Leases: every request of a known session renews its lease. ``tick`` first gives a
  fresh lease to each session without one (just opened, or every session after a
  failover) and only then expires those whose lease has passed.
- Queue (RLM's EXPRESS rule): a checkout that can be served now is, with ``wait`` or
  without; one with ``wait`` that finds too few free seats waits in its feature's
  queue, in arrival order. ``tick`` asks each waiter in order and grants every one
  that fits, counting the seats granted before it; one that does not fit keeps its
  place and holds back no one (so a large request can be overtaken by smaller ones:
  its ``wait`` bounds that). It denies waiters whose deadline passed. A checkout that
  no release could ever serve (``Denial.busy`` is False) is denied, never queued.
- Grant ids are consecutive: a call that returns several grants numbers them from
  ``next_grant`` in order, and tentative seat counts keep them from sharing a seat.
- ``reload`` replaces the entitlements and the options file; grants stay even if a
  pool is now over its count or a rule now refuses them (as FlexLM does); new
  checkouts see the new counts and rules. It also carries the signed lines the
  entitlements came from (``license_lines``), which ``apply`` keeps and never checks:
  whether this node can vouch for them is the node's call (broker/served.py).
- Options (``broker/policy.py``, docs/admin.md): a checkout is decided by
  ``choose_under``, the license's choice under the options file's EXCLUDE/INCLUDE,
  MAX and RESERVE lines, given the grants of the feature (``_by_feature``) and, in a
  tick, the grants decided earlier in it. A ``reserved`` denial may wait like
  ``no_seats`` (unless the count is more than the reservations and MAX lines could
  ever leave it); the others are answered at once.
- Limits (``broker/limits.py``): opening a session beyond ``max_sessions`` or
  ``max_sessions_per_host``, queueing beyond ``max_queue``, or a request that records a
  reply in a session already holding ``max_unacked`` unacknowledged ones gets an
  ``error`` with code ``limit``; nothing is recorded. They are decisions, so ``apply``
  never checks them: a backup with other limits still applies what the primary decided.

- Taken grants: a ``take`` (``zbroker remove``, broker/removal.py; an idle TIMEOUT)
  frees a grant's seat without its session, which remembers the last ``TAKEN_KEPT``
  taken ids and why (``Session.taken``); every heartbeat reply lists them.
- Duplicate groups (``broker/dup.py``): grants of one group key in one pool share
  seats; ``_used`` counts a group's largest count once (``_groups``), which the
  over-allocation check of ``apply`` sees exactly as the primary did.

Invariants checked by ``apply``: a grant id is exactly ``next_grant``; a grant never
takes a pool past its total on the day of its ``at`` (a group's seats counted once);
every grant belongs to a live session; a request id is answered at most once.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import datetime
import heapq
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from mypy_extensions import mypyc_attr

from zbroker.broker import borrow
from zbroker.broker.dup import Groups, key_for, masks_of
from zbroker.broker.holds import HoldIndex, IdleIndex, hold_sid, least_timeout
from zbroker.broker.limits import Limits
from zbroker.broker.model import (
    Entitlement,
    ErrorCode,
    Now,
    Reason,
    Reply,
    Request,
    parse_version,
    reply_denied,
    reply_error,
    reply_ok,
)
from zbroker.broker.options import Options, OptionsError
from zbroker.broker.policy import DEFAULT_MIN_TIMEOUT, Holding, Policy, Principal, choose_under
from zbroker.broker.seats import (
    HOLD_PREFIX,
    SESSION_NAMES,
    TAKE_REASONS,
    TAKEN_KEPT,
    Catalog,
    Choice,
    Denial,
    Grant,
    LedgerError,
    PoolKey,
    Session,
    choose,
    day_of,
    entitlement_to_map,
    entitlements_from,
    field_int,
    field_str,
    field_wall,
    grant_from,
    session_from,
    session_from_snapshot,
)

Delta = dict[str, Any]
SNAPSHOT_VERSION = 1
_OPS = frozenset(
    {"open", "close", "checkout", "checkin", "heartbeat", "status", "idle", "borrow", "return"}
)
# ops whose reply is recorded
_RECORDING = frozenset({"open", "checkout", "checkin", "idle", "borrow", "return"})
HOLDERS_SCAN = 20_000  # grants one page of ``holders`` may look at: about 3 ms at most


# A delta and the reply its client gets once it commits (None: no client waits for it,
# as for ``expire`` and ``reload``). Made where the delta is decided, never rebuilt.
Decided = tuple[Delta, Reply | None]


# Not frozen: one is made per request, and a frozen dataclass's __init__ sets each field
# through object.__setattr__ (scripts/ab_instructions.py counts it). No one changes them.
@dataclass(slots=True)
class Outcome:
    """What ``handle`` decided: deltas to commit, or a reply to send now, or neither (queued)."""

    decided: list[Decided]
    reply: Reply | None


@dataclass(slots=True)
class Ticked:
    """Everything one ``tick`` decided: deltas in order, and the waiters it dropped because
    their session ended (no answer will ever come for those ``(sid, req)``)."""

    decided: list[Decided]
    ended: list[tuple[str, int]]


@dataclass(slots=True)
class _Waiter:
    request: Request
    deadline: float  # monotonic
    # The catalog, day and ``_released`` count of its feature under which it was last
    # found waiting for seats alone: until one of them changes (or a tick frees seats of
    # the feature) nothing can serve or deny it, so a tick need not ask it again (10,000
    # waiters cost each tick ~57 ms when they all were).
    catalog: Catalog | None = None
    day: datetime.date | None = None
    released: int = 0
    since: float = 0.0  # wall time it joined the queue, for status (``queue``)
    arrived: float = 0.0  # monotonic time it joined: the report log's ``waited``


# A grant delta with any of these goes through ``apply`` even on the primary that made it.
_GRANT_EXTRAS = frozenset({"borrow", "token", "reclaims", "dup"})


class Maps(NamedTuple):
    """How many maps, and the maps, made as they are read."""

    total: int
    maps: Iterator[dict[str, Any]]


# Subclassed by tests and tools in plain Python, which a compiled class refuses unless
# it allows it (the compiled build: setup.py). A no-op when interpreted.
@mypyc_attr(allow_interpreted_subclasses=True)
class Ledger:
    """Sessions and grants against a license's entitlements (see the module docstring)."""

    def __init__(
        self,
        entitlements: Sequence[Entitlement],
        *,
        lease: float,
        heartbeat: float,
        limits: Limits | None = None,
        options: Options | None = None,
        min_timeout: float = DEFAULT_MIN_TIMEOUT,
    ) -> None:
        if not (lease > 0 and heartbeat > 0):
            raise ValueError(f"lease ({lease}) and heartbeat ({heartbeat}) must be > 0")
        self.lease = lease
        self.heartbeat = heartbeat
        self.limits = limits if limits is not None else Limits()
        # The floor of TIMEOUT lines (a node setting): the primary's decision, so a backup
        # with another floor still applies what the primary took.
        self.min_timeout = min_timeout
        self._per_host: dict[str, int] = {}  # open sessions by host, derived from _sessions
        self._catalog = Catalog(entitlements, options)
        # The signed lines the entitlements came from, as the reload carried them (None: it
        # carried none, an older node's): each node verifies them (broker/served.py).
        self._license: tuple[str, ...] | None = None
        # The options file's policy (broker/policy.py), replicated with the entitlements.
        self._options = options
        self._policy = None if options is None else Policy(options, min_timeout=min_timeout)
        # Holds (LINGER, BORROW) and idle sessions by deadline (broker/holds.py).
        self._holds = HoldIndex()
        self._lingering = self._holds.lingering  # the same dict, one lookup less per checkout
        self._idle = IdleIndex()
        self._idle.least = least_timeout(options, min_timeout)
        self._by_feature: dict[str, set[int]] = {}  # grant ids by feature, for the policy
        self._sessions: dict[str, Session] = {}
        # Each session's recorded reqs as a min-heap: forgetting the replies below a new
        # ``ack`` pops the oldest instead of scanning all (up to max_unacked of them).
        self._unacked: dict[str, list[int]] = {}
        self._replies = 0  # the replies of every session's table: for max_replies
        self._grants: dict[int, Grant] = {}  # ascending id: ids only grow
        self._used: dict[PoolKey, int] = {}  # derived from _grants, kept for speed
        # ``_used`` summed by feature: every report record asks (``in_use``), on every
        # node, and a license of hundreds of features made the sum cost 10 µs a record.
        self._used_of_feature: dict[str, int] = {}
        self._groups = Groups()  # duplicate groups of the grants (broker/dup.py)
        self._dup_masks = masks_of(entitlements)  # DUP_GROUP= masks by feature
        self._ids: list[int] | None = []  # sorted ids of _grants for ``holders``; None: stale
        self._next_grant = 1
        # Lease deadlines in deadline order (renewing moves a session to the end; the
        # clock only goes forward), so ``tick`` reads only the lapsed ones at the front
        # instead of every session every 50 ms.
        self._leases: dict[str, float] = {}
        self._lease_max = -math.inf  # the last deadline set; an earlier one breaks the order
        self._leases_ordered = True
        self._unleased: set[str] = set()  # sessions that get a fresh lease at the next tick
        self._queues: dict[str, deque[_Waiter]] = {}
        self._queued: set[tuple[str, int]] = set()
        # Per feature, how often a grant of it went or a duplicate group of it grew: the
        # only changes (besides the catalog and the day) that can make room for a waiter.
        self._released: dict[str, int] = {}

    # ------------------------------------------------------------ replicated state

    def apply(self, delta: object) -> None:
        """Apply one delta; LedgerError (and no change at all) when it does not fit."""
        # `object`, not Delta: the compiled build checks a parameter's declared type on
        # entry, and a log's or a peer's non-map must be a LedgerError in both builds.
        if not isinstance(delta, dict):
            raise LedgerError(f"a delta must be a map, got {type(delta).__name__}")
        kind = delta.get("k")
        if kind == "open":
            self._apply_open(delta)
        elif kind == "grant":
            self._apply_grant(delta)
        elif kind == "release":
            session, req, ack = self._answerable(delta)
            gid = field_int(delta, "grant", 1)
            if gid not in session.grants:
                raise LedgerError(f"release delta: session {session.sid} holds no grant {gid}")
            if "linger" in delta:  # the seat stays in use, held by a linger hold
                self._hold(gid, "linger", field_wall(delta, "linger"), session, field_wall(delta))
            else:
                self._drop_grant(gid)
            self._record(session, req, ack, reply_ok())
        elif kind == "answer":
            session, req, ack = self._answerable(delta)
            reply = delta.get("reply")
            if not isinstance(reply, dict) or reply.get("status") not in ("ok", "denied"):
                raise LedgerError("answer delta: 'reply' must be an ok or denied reply map")
            self._record(session, req, ack, copy.deepcopy(reply))  # the log keeps the delta
        elif kind == "close":
            session, _, _ = self._answerable(delta)
            self._end(session, _lingers(delta, session))
        elif kind == "expire":
            session = self._known(delta, field_str(delta, "sid"))
            self._end(session, _lingers(delta, session))
        elif kind == "idle":
            self._apply_idle(delta)
        elif kind == "lapse":
            gid = field_int(delta, "grant", 1)
            if gid not in self._holds.by_grant:
                raise LedgerError(f"lapse delta: grant {gid} is not held by a hold")
            self._drop_grant(gid)  # and its hold with it
        elif kind == "reload":
            options = _options_from(delta.get("options"), "reload delta")
            catalog = Catalog(entitlements_from(delta.get("entitlements"), "reload delta"), options)
            signed = _license_from(delta.get("license"), "reload delta")
            self._catalog = catalog
            self._license = signed
            self._dup_masks = masks_of(catalog.entitlements)
            self._options = options
            self._policy = (
                None if options is None else Policy(options, min_timeout=self.min_timeout)
            )
            self._idle.rebuild(least_timeout(options, self.min_timeout))
            if delta.get("rehome") is True:  # a reload of this version's primaries (_rehome)
                self._rehome()
        elif kind == "term":
            pass  # a new primary's no-op naming it, for the report log (docs/reportlog.md)
        elif kind == "return":  # a borrow checked in before its end (broker/borrow.py)
            session, req, ack = self._answerable(delta)
            gid = field_int(delta, "grant", 1)
            hold = self._holds.by_grant.get(gid)
            if hold is None or hold.hold != "borrow" or hold.user != session.user:
                raise LedgerError(f"return delta: grant {gid} is no borrow of {session.user!r:.40}")
            self._drop_grant(gid)  # and its hold with it
            self._record(session, req, ack, reply_ok(grant=gid))
        elif kind == "take":
            self._apply_take(delta)
        else:
            raise LedgerError(f"unknown delta kind {kind!r}")

    def apply_decided(self, delta: Delta) -> None:
        """Apply a delta this ledger's own ``handle`` or ``tick`` just decided.

        Its fields and its fit were checked when it was decided, on this very state, so
        the plain grant and release (the checkout and checkin of the hot path) skip those
        checks; every other kind, and every delta from the log (a backup's, a new
        primary's adopted ones), goes through ``apply``, which checks everything."""
        kind = delta["k"]
        if kind == "grant" and not _GRANT_EXTRAS.intersection(delta):
            session = self._sessions[delta["sid"]]
            g = Grant(delta["grant"], session.sid, delta["feature"], delta["version"],
                      delta["count"], delta["at"])  # fmt: skip
            self._next_grant += 1
            self._add_grant(g)
            if session.idle_since is not None:
                self._idle.went_idle(session)  # a grant that may time out: watch it again
            self._record(session, delta["req"], delta["ack"], g.reply())
        elif kind == "release" and "linger" not in delta:
            session = self._sessions[delta["sid"]]
            self._drop_grant(delta["grant"])
            self._record(session, delta["req"], delta["ack"], reply_ok())
        else:
            self.apply(delta)

    def _apply_open(self, d: Delta) -> None:
        session, req, ack = session_from(d), field_int(d, "req", 0), field_int(d, "ack", 0)
        if session.sid in self._sessions:
            raise LedgerError(f"open delta: session {session.sid} is already open")
        if req < ack:
            raise LedgerError(f"open delta: req {req} is below its own ack {ack}")
        self._add_session(session)
        self._record(session, req, ack, self._open_reply())

    def _apply_grant(self, d: Delta) -> None:
        session, req, ack = self._answerable(d)
        g = grant_from(d)
        # checked before anything changes; a plain grant (the hot path) makes no call
        lent = borrow.borrowed(d, session) if "borrow" in d or "token" in d else None
        if g.id != self._next_grant:
            raise LedgerError(f"grant delta: id {g.id} is not next_grant {self._next_grant}")
        key = g.pool_key
        pool = self._catalog.pool(g.feature, key[1])
        if pool is None:
            raise LedgerError(f"grant delta: the license has no pool {g.feature} {g.version}")
        used, total = self._used.get(key, 0), pool.total(day_of(g.at))
        reclaims = None
        if "reclaims" in d:  # the lingering seat it takes back is freed in the same step
            reclaims = d["reclaims"]
            hold = self._holds.by_grant.get(reclaims) if type(reclaims) is int else None
            if hold is None or hold.hold != "linger":
                why = f"reclaims {reclaims!r:.40}, which is no lingering seat"
                raise LedgerError(f"grant delta {g.id}: {why}")
            if self._grants[reclaims].pool_key == key:
                used -= self._grants[reclaims].count
        cost = self._groups.cost(g) if g.dup else g.count  # a group's seats count once
        if used + cost > total:
            raise LedgerError(
                f"grant delta {g.id}: {cost} more seats would over-allocate "
                f"{g.feature} {g.version} ({used} of {total} in use)"
            )
        if reclaims is not None:
            self._drop_grant(reclaims)
        self._next_grant += 1
        self._add_grant(g)
        if session.idle_since is not None:
            self._idle.went_idle(session)  # a grant that may time out: watch it again
        reply = g.reply()
        if lent is not None:  # made in a borrow hold; the borrower's reply carries the token
            self._hold(g.id, "borrow", lent[0], session, g.at)
            reply["token"] = copy.deepcopy(lent[1])
        self._record(session, req, ack, reply)

    def _apply_idle(self, d: Delta) -> None:
        session, req, ack = self._answerable(d)
        idle = d.get("idle")
        if not isinstance(idle, bool):
            raise LedgerError("idle delta: field 'idle' must be true or false")
        at = field_wall(d)
        if not idle:
            session.idle_since = None
            self._idle.busy(session.sid)
        elif session.idle_since is None:  # idle again while idle: still idle since then
            session.idle_since = at
            self._idle.went_idle(session)
        self._record(session, req, ack, reply_ok())

    def _hold(self, gid: int, kind: str, until: float, source: Session, at: float) -> Session:
        """Move grant ``gid`` of ``source`` into a new hold of ``kind`` until ``until``
        (wall): its seat stays in use, with no lease, after ``source`` lets it go."""
        hold = Session(
            hold_sid(gid), source.user, source.host, source.display, source.client_version,
            at, source.address, source.project, hold=kind, until=until,
        )  # fmt: skip
        grant = dataclasses.replace(self._grants[gid], sid=hold.sid)
        source.grants.discard(gid)
        self._sessions[hold.sid] = hold
        hold.grants.add(gid)
        self._grants[gid] = grant
        self._holds.add(hold, grant)
        return hold

    def _apply_take(self, d: Delta) -> None:
        """The triad took a grant from its session (removed, timed out): the seat is free
        and the session remembers why, for the library (docs/protocol.md, heartbeat)."""
        gid, reason = field_int(d, "grant", 1), d.get("reason")
        if not isinstance(reason, str) or reason not in TAKE_REASONS:
            known = ", ".join(sorted(TAKE_REASONS))
            raise LedgerError(f"take delta: reason {reason!r:.40} is not one of {known}")
        grant = self._grants.get(gid)
        if grant is None:
            raise LedgerError(f"take delta: grant {gid} is not out")
        session = self._sessions[grant.sid]
        self._drop_grant(gid)
        taken = session.taken
        taken[gid] = reason
        if len(taken) > TAKEN_KEPT:
            del taken[next(iter(taken))]  # the oldest: the library heard of it long since

    def _known(self, d: Delta, sid: str) -> Session:
        session = self._sessions.get(sid)
        if session is None or session.hold:  # a hold is no client's: no request speaks for it
            raise LedgerError(f"{d.get('k')} delta: session {sid} is not open")
        return session

    def _answerable(self, d: Delta) -> tuple[Session, int, int]:
        """The session, req and ack of a session delta that may be answered now."""
        session = self._known(d, field_str(d, "sid"))
        req, ack = field_int(d, "req", 0), field_int(d, "ack", 0)
        if req < max(ack, session.ack):
            raise LedgerError(f"{d['k']} delta: req {req} is below ack {max(ack, session.ack)}")
        if req in session.replies:
            raise LedgerError(f"{d['k']} delta: request {session.sid}/{req} is already answered")
        return session, req, ack

    def _record(self, session: Session, req: int, ack: int, reply: Reply) -> None:
        """Record ``reply``, a map of the ledger's own that nothing else holds (no copy)."""
        unacked = self._unacked[session.sid]
        if ack > session.ack:
            session.ack = ack
            # The client promised never to retry these: forgetting them bounds memory.
            while unacked and unacked[0] < ack:
                del session.replies[heapq.heappop(unacked)]
                self._replies -= 1
        session.replies[req] = reply
        heapq.heappush(unacked, req)
        self._replies += 1

    def _kept(self, session: Session, ack: int) -> int:
        """How many replies of a full table stay once ``ack`` applies, without a scan.

        A hostile session can keep its table full and send request after request: a count
        of its replies for each (up to max_unacked of them) held the loop 0.3 ms a request
        at the default 10,000, and seconds per cycle at the allowed 1,000,000.
        """
        unacked = self._unacked[session.sid]
        if not unacked or unacked[0] >= ack:
            return len(unacked)  # ack forgets none: every recorded req is >= session.ack
        if len(unacked) <= self.limits.max_unacked:
            return len(unacked) - 1  # at least the oldest goes, which is under the limit
        return sum(1 for r in unacked if r >= ack)  # only after max_unacked was lowered

    def _add_grant(self, g: Grant) -> None:
        self._grants[g.id] = g
        self._ids = None
        session = self._sessions[g.sid]
        session.grants.add(g.id)
        if session.hold:
            self._holds.add(session, g)
        of_feature = self._by_feature.get(g.feature)
        if of_feature is None:  # not setdefault: that makes and drops a set every grant
            of_feature = self._by_feature[g.feature] = set()
        of_feature.add(g.id)
        key = g.pool_key
        seats = self._groups.add(g) if g.dup else g.count
        if g.dup:  # a larger group asks less of its members that wait
            self._released[g.feature] = self._released.get(g.feature, 0) + 1
        self._used[key] = self._used.get(key, 0) + seats
        self._used_of_feature[g.feature] = self._used_of_feature.get(g.feature, 0) + seats

    def _rehome(self) -> None:
        """Count each grant whose pool the license no longer has in the pool that serves
        its version now: the lowest at or above it, else the feature's highest. Left
        where it was, it counted in no pool, and a new license's pool of another version
        (a vendor's upgrade from 2.0 to 3.0) lent its seats again: 18 of 10 (SPEC §5,
        invariant 1). A feature the license no longer has keeps its grants uncounted, as
        a count lowered to 0. In grant order, so that every node does the same; and only
        for a reload that says so (``rehome``): the log, not the code a node runs, decides,
        so that a triad in a rolling upgrade (an older primary, whose reload has no such
        field and whose ledger does not move its grants) stays one ledger."""
        pools_of = self._catalog.pools
        served = {p.pool_key for f in self._catalog.features() for p in pools_of(f)}
        orphans = [
            gid
            for gid, g in self._grants.items()
            if g.pool_key not in served and pools_of(g.feature)
        ]
        for gid in sorted(orphans):
            g = self._grants[gid]
            pools = pools_of(g.feature)
            version = g.pool_key[1]
            home = next((p for p in pools if p.key >= version), pools[-1])
            seats = self._groups.drop(g) if g.dup else g.count
            self._used[g.pool_key] -= seats
            if not self._used[g.pool_key]:
                del self._used[g.pool_key]
            moved = dataclasses.replace(g, version=home.version)
            self._grants[gid] = moved
            seats = self._groups.add(moved) if moved.dup else moved.count
            self._used[moved.pool_key] = self._used.get(moved.pool_key, 0) + seats

    def _drop_grant(self, gid: int) -> None:
        grant = self._grants.pop(gid)
        self._ids = None
        session = self._sessions[grant.sid]
        session.grants.discard(gid)
        if session.hold:  # a hold holds its one grant: it ends with it
            self._holds.remove(grant)
            del self._sessions[session.sid]
        of_feature = self._by_feature[grant.feature]
        of_feature.discard(gid)
        if not of_feature:
            del self._by_feature[grant.feature]
        seats = self._groups.drop(grant) if grant.dup else grant.count
        self._released[grant.feature] = self._released.get(grant.feature, 0) + 1
        self._used[grant.pool_key] -= seats
        self._used_of_feature[grant.feature] -= seats

    def _add_session(self, session: Session) -> None:
        self._sessions[session.sid] = session
        if session.hold:
            return  # no lease, no replies, not counted by any limit; its grant indexes it
        if session.idle_since is not None:
            self._idle.went_idle(session)
        self._unacked[session.sid] = sorted(session.replies)  # a sorted list is a heap
        self._replies += len(session.replies)
        if session.sid not in self._leases:
            self._unleased.add(session.sid)  # a backup's, or one adopted by a new primary
        self._per_host[session.host] = self._per_host.get(session.host, 0) + 1

    def _end(self, session: Session, lingers: Sequence[tuple[int, float, float]] = ()) -> None:
        """End a client's session; ``lingers`` (grant, until, at) move into linger holds."""
        for gid, until, at in lingers:
            self._hold(gid, "linger", until, session, at)
        for gid in sorted(session.grants):
            self._drop_grant(gid)
        if session.idle_since is not None:
            self._idle.busy(session.sid)
        del self._sessions[session.sid]
        self._replies -= len(self._unacked.pop(session.sid))
        self._leases.pop(session.sid, None)  # volatile, but moot once the session is gone
        self._unleased.discard(session.sid)
        left = self._per_host[session.host] - 1
        if left:
            self._per_host[session.host] = left
        else:
            del self._per_host[session.host]

    def snapshot(self) -> dict[str, Any]:
        """The replicated state as a msgpack-able map, in a deterministic order."""
        head, sessions, grants = self.snapshot_parts()
        return {**head, "sessions": list(sessions.maps), "grants": list(grants.maps)}

    def snapshot_parts(self) -> tuple[dict[str, Any], Maps, Maps]:
        """``snapshot()`` without its sessions and grants, and those as maps made one at a
        time: an image is written from them (broker/image.py) without a million maps held
        at once. The ledger must not change while they are read."""
        head = {
            "v": SNAPSHOT_VERSION,
            "next_grant": self._next_grant,
            "entitlements": [entitlement_to_map(e) for e in self._catalog.entitlements],
            "options": None if self._options is None else self._options.to_map(),
            "license": None if self._license is None else list(self._license),
        }
        sessions = self._sessions
        sids = sorted(sessions)
        return (
            head,
            Maps(len(sids), (sessions[sid].to_map() for sid in sids)),
            # ascending id: ids only grow
            Maps(len(self._grants), (g.to_map() for g in self._grants.values())),
        )

    @classmethod
    def from_snapshot(
        cls,
        snap: dict[str, Any],
        *,
        lease: float,
        heartbeat: float,
        limits: Limits | None = None,
        min_timeout: float = DEFAULT_MIN_TIMEOUT,
    ) -> Ledger:
        """A ledger from ``snapshot()``; LedgerError when the snapshot is malformed."""
        builder = LedgerBuilder(
            snap, lease=lease, heartbeat=heartbeat, limits=limits, min_timeout=min_timeout
        )
        sessions, grants = snap.get("sessions"), snap.get("grants")
        if not isinstance(sessions, list) or not isinstance(grants, list):
            raise LedgerError("snapshot: 'sessions' and 'grants' must be lists")
        builder.sessions(sessions)
        builder.grants(grants)
        return builder.done()

    def reload_delta(
        self,
        entitlements: Sequence[Entitlement],
        options: Options | None = None,
        now: Now | None = None,
        license_lines: Sequence[str] | None = None,
    ) -> Delta:
        """Replace the entitlements and the options file's policy, in one delta; ``now``
        gives it the wall time the report log's ``reread`` record shows, ``license_lines``
        the signed lines they came from (``License.signed``)."""
        delta: Delta = {
            "k": "reload",
            "entitlements": [entitlement_to_map(e) for e in entitlements],
            "options": None if options is None else options.to_map(),
            "rehome": True,
        }
        if license_lines is not None:
            delta["license"] = list(license_lines)
        if now is not None:
            delta["at"] = now.wall
        return delta

    # ------------------------------------------------------------ decisions (primary)

    def handle(self, request: Request, now: Now) -> Outcome:
        """Decide one client request. ``status`` is the node's: it gets ``bad_request``."""
        sid, req = request.sid, request.req
        if request.op not in _OPS or request.op == "status":
            why = "status is answered by the node" if request.op == "status" else "unknown op"
            return Outcome([], reply_error(ErrorCode.BAD_REQUEST, f"{why}: {request.op!r}"))
        if not sid or req < 0 or request.ack < 0:
            return Outcome([], reply_error(ErrorCode.BAD_REQUEST, "sid, req or ack is invalid"))
        session = self._sessions.get(sid)
        if session is None or session.hold:
            if sid.startswith(HOLD_PREFIX):  # the triad's own records: no client speaks for one
                why = f"session ids starting {HOLD_PREFIX!r} are the triad's own (holds)"
                return Outcome([], reply_error(ErrorCode.BAD_REQUEST, why))
            if request.op == "close":
                return Outcome([], reply_ok())
            if request.op != "open":
                return Outcome([], reply_error(ErrorCode.UNKNOWN_SESSION, _unknown(sid)))
            if req < request.ack:
                return Outcome([], _stale(req, request.ack))
            refusal = self.limits.refuse_open(
                self.session_count, self._per_host.get(request.host, 0), request.host
            )
            if refusal is not None:
                return Outcome([], refusal)
            self._renew(sid, now.mono + self.lease)
            opened = {"k": "open", **_ids(request, 0), **_names(request), "at": now.wall}
            opened["address"], opened["project"] = request.address, request.project
            return Outcome([(opened, self._open_reply())], None)
        self._renew(sid, now.mono + self.lease)
        recorded = self.recorded(sid, req)
        if recorded is not None:
            return Outcome([], recorded)
        ack = max(session.ack, request.ack)
        if req < ack:
            return Outcome([], _stale(req, ack))
        if request.op in _RECORDING and len(session.replies) >= self.limits.max_unacked:
            refusal = self.limits.refuse_unacked(sid, self._kept(session, ack))
            if refusal is not None:
                return Outcome([], refusal)
        if request.op in _RECORDING and self._replies >= self.limits.max_replies:
            # Exact, unlike _kept's shortcut: an ack that forgets many must count. A scan
            # only when the ack forgets some, which shrinks the tables it scans.
            unacked = self._unacked[sid]
            kept = len(unacked)
            if unacked and unacked[0] < ack:
                kept = sum(1 for r in unacked if r >= ack)
            refusal = self.limits.refuse_replies(sid, kept, self._replies, self.session_count)
            if refusal is not None:
                return Outcome([], refusal)
        ids = _ids(request, ack)
        if request.op == "heartbeat":
            if session.taken:  # the library reports these grants lost, once each
                taken = [{"grant": g, "reason": why} for g, why in session.taken.items()]
                return Outcome([], reply_ok(lease=self.lease, taken=taken))
            return Outcome([], reply_ok(lease=self.lease))
        if request.op == "open":
            return Outcome([_answer(ids, self._open_reply(), now.wall)], None)
        if request.op == "close":
            closed: Delta = {"k": "close", **ids, "at": now.wall}
            lingers = self._lingers_of(session, now.wall)
            if lingers:  # FlexNet lingers after the process exits too
                closed["linger"] = lingers
            return Outcome([(closed, reply_ok())], None)
        if request.op == "checkin":
            if request.grant in session.grants:
                released = {"k": "release", **ids, "grant": request.grant, "at": now.wall}
                # Report-only: the metrics count a checkin per feature from the committed
                # delta, the grant being gone by then (broker/tallies.py).
                released["feature"] = self._grants[request.grant].feature
                if self._policy is not None:  # without options nothing lingers: the hot path
                    linger = self._linger(request.grant)
                    if linger is not None:
                        released["linger"] = now.wall + linger
                return Outcome([(released, reply_ok())], None)
            why = f"grant {request.grant} is not held by session {sid}"
            return Outcome([_answer(ids, reply_denied(Reason.NOT_HELD, why), now.wall)], None)
        if request.op in ("borrow", "return"):  # broker/borrow.py
            return self._borrow(request, session, ids, now)
        if request.op == "idle":  # the application says so (TIMEOUT); heartbeats never do
            marked = {"k": "idle", **ids, "idle": request.idle, "at": now.wall}
            return Outcome([(marked, reply_ok())], None)
        return self._checkout(request, session, ids, now)

    def _linger(self, gid: int) -> float | None:
        """Seconds grant ``gid`` lingers once let go (LINGER), None: it does not."""
        if self._policy is None:
            return None
        g = self._grants[gid]
        if g.dup:
            return None  # a shared seat never lingers: its group holds it (broker/dup.py)
        seconds = self._policy.linger(g.feature, g.pool_key[1])
        return seconds if seconds is not None and seconds > 0 else None

    def _borrow(self, request: Request, session: Session, ids: Delta, now: Now) -> Outcome:
        """A borrow (a grant in a borrow hold, with the token's facts for the node to sign)
        or an early return of one: broker/borrow.py decides. O(grants of the feature), as
        a checkout under MAX or RESERVE lines."""
        mine: list[int] = []  # this user's and host's borrows of the feature
        lent: dict[PoolKey, int] = {}  # seats the feature's pools lend now
        for gid in self._by_feature.get(request.feature, ()):
            h = self._holds.by_grant.get(gid)
            if h is not None and h.hold == "borrow":
                g = self._grants[gid]
                lent[g.pool_key] = lent.get(g.pool_key, 0) + g.count
                if (h.user, h.host) == (session.user, session.host):
                    mine.append(gid)
        if request.op == "return":
            refusal = borrow.refuse_return(self._catalog, request.feature, mine, self._grants)
            if refusal is not None:
                denied = reply_denied(refusal.reason, refusal.detail)
                return Outcome([_answer(ids, denied, now.wall, _asked(request))], None)
            returned = {"k": "return", **ids, "grant": min(mine), "at": now.wall}
            return Outcome([(returned, reply_ok(grant=min(mine)))], None)
        if request.count < 1 or (request.until is not None and request.hours is not None):
            why = "count out of range, or both until and hours given"
            return Outcome([], reply_error(ErrorCode.BAD_REQUEST, why))
        try:
            decided = borrow.decide(
                self._catalog, self._policy, feature=request.feature, version=request.version,
                count=request.count, until=request.until, hours=request.hours,
                who=_principal(session), now=now.wall, day=day_of(now.wall),
                used=lambda key: self._used.get(key, 0), lent=lambda key: lent.get(key, 0),
                holdings=lambda: self._holdings(request.feature, frozenset(), ()),
                already=bool(mine),
            )  # fmt: skip
        except ValueError as exc:  # an unparsable version
            return Outcome([], reply_error(ErrorCode.BAD_REQUEST, str(exc)))
        if isinstance(decided, Denial):
            denied = reply_denied(decided.reason, decided.detail)
            return Outcome([_answer(ids, denied, now.wall, _asked(request))], None)
        delta, reply = self._grant_delta(ids, request, Choice(decided.pool), self._next_grant, now)
        delta["borrow"] = decided.until
        granted = dict(reply) if reply is not None else reply_ok()  # never None: a grant's
        # Unsigned: the primary's node signs it (NodeCore._decide) in both places.
        delta["token"] = granted["token"] = borrow.facts(delta, session)
        return Outcome([(delta, granted)], None)

    def _lingers_of(self, session: Session, wall: float) -> list[list[float]]:
        """[grant, until] of each grant of ``session`` that lingers if it ends at ``wall``."""
        if self._policy is None or not session.grants:
            return []
        out: list[list[float]] = []
        for gid in sorted(session.grants):
            seconds = self._linger(gid)
            if seconds is not None:
                out.append([gid, wall + seconds])
        return out

    def _reclaim(self, request: Request, session: Session, ids: Delta, now: Now) -> Outcome | None:
        """A checkout by the user and host of a lingering seat of the feature takes that
        seat back (a ``grant`` that ``reclaims`` it), if the seat's pool serves it."""
        lingering = self._lingering.get((session.user, session.host, request.feature))
        if not lingering:
            return None
        day = day_of(now.wall)
        for gid in sorted(lingering):
            g = self._grants[gid]
            # Only the lingering seat's pool may serve, with that seat free.
            extra = {p.pool_key: _FULL for p in self._catalog.pools(g.feature)}
            extra[g.pool_key] = -g.count
            choice = self._choose(request, session, day, extra, frozenset({gid}))
            if isinstance(choice, Choice):
                delta, reply = self._grant_delta(ids, request, choice, self._next_grant, now)
                delta["reclaims"] = gid
                return Outcome([(delta, reply)], None)
        return None

    def _checkout(self, request: Request, session: Session, ids: Delta, now: Now) -> Outcome:
        if request.count < 1 or (request.wait is not None and not request.wait >= 0):
            return Outcome([], reply_error(ErrorCode.BAD_REQUEST, "count or wait out of range"))
        if (request.sid, request.req) in self._queued:
            return Outcome([], None)  # a duplicate of a waiter: it is already in line
        try:
            if self._lingering:  # (user, host, feature) of lingering seats: mostly empty
                reclaimed = self._reclaim(request, session, ids, now)
                if reclaimed is not None:
                    return reclaimed  # its own seat: never behind the queue
            # DUP_GROUP's group, if any: no call on the hot path without one anywhere
            dup = self._dup_key(request, session) if self._dup_masks or request.dup else None
            choice = self._choose(request, session, day_of(now.wall), {}, dup=dup)
        except ValueError as exc:  # an unparsable version
            return Outcome([], reply_error(ErrorCode.BAD_REQUEST, str(exc)))
        wait = request.wait or 0.0
        if isinstance(choice, Choice):  # whoever waits: they wait for seats it does not take
            grant = self._grant_delta(ids, request, choice, self._next_grant, now, dup=dup)
            return Outcome([grant], None)
        if not (choice.busy and wait > 0):
            denied = reply_denied(choice.reason, choice.detail)
            return Outcome([_answer(ids, denied, now.wall, _asked(request))], None)
        refusal = self.limits.refuse_queue(
            request.feature, len(self._queues.get(request.feature, ()))
        )
        if refusal is not None:
            return Outcome([], refusal)
        # Judged just now: only seats keep it waiting, until some of the feature free.
        waiter = _Waiter(
            request, now.mono + wait, self._catalog, day_of(now.wall),
            self._released.get(request.feature, 0), now.wall, now.mono,
        )  # fmt: skip
        self._queues.setdefault(request.feature, deque()).append(waiter)
        self._queued.add((request.sid, request.req))
        return Outcome([], None)

    def _choose(
        self,
        request: Request,
        session: Session,
        day: datetime.date,
        extra: dict[PoolKey, int],
        gone: frozenset[int] = frozenset(),
        pending: Sequence[tuple[str, Holding]] = (),
        dup: str | None = None,
    ) -> Choice | Denial:
        """The license's and the options file's decision; ``extra``, ``gone`` (grants
        being let go) and ``pending`` (feature, holding) are decisions not yet applied.
        ``dup``: the checkout's duplicate group (broker/dup.py), whose seats are its own."""
        used = self._used
        shared = None if dup is None else self._groups.seats_by_pool(request.feature, dup)

        def taken(key: PoolKey) -> int:  # seats of the pool, this tick's decisions counted
            return used.get(key, 0) + extra.get(key, 0)

        if shared:  # as if the group's seats were free: it asks only what it lacks

            def taken(key: PoolKey) -> int:
                return used.get(key, 0) + extra.get(key, 0) - shared.get(key[1], 0)

        if self._policy is None:  # the license's choice alone, without the policy's
            # Principal and holdings: a checkout is the hot path (scripts/ab_instructions.py)
            return choose(
                self._catalog,
                request.feature,
                request.version,
                request.count,
                session.user,
                session.host,
                day,
                taken,
            )
        return choose_under(
            self._policy,
            self._catalog,
            request.feature,
            request.version,
            request.count,
            _principal(session),
            day,
            taken,
            lambda: self._holdings(request.feature, gone, pending, dup if shared else None),
        )

    def _shared(self, feature: str, dup: str | None) -> dict[tuple[int, ...], int]:
        """Seats of each pool's duplicate group ``dup`` of ``feature`` (empty: none)."""
        return {} if dup is None else self._groups.seats_by_pool(feature, dup)

    def _dup_key(self, request: Request, session: Session) -> str | None:
        """The duplicate group a checkout joins (broker/dup.py), None: none."""
        return key_for(
            self._dup_masks, request.feature, request.dup, session, request.vendor_string
        )

    def _holdings(
        self,
        feature: str,
        gone: frozenset[int],
        pending: Sequence[tuple[str, Holding]],
        mine: str | None = None,
    ) -> list[Holding]:
        """Every grant of ``feature`` as the policy counts it: O(grants of the feature).
        A duplicate group counts once, as its oldest member's; ``mine`` (the asking
        checkout's group) not at all: its seats are the checkout's own (broker/dup.py)."""
        out: list[Holding] = []
        groups = self._groups
        counted: set[tuple[str, tuple[int, ...]]] = set()  # the groups already in ``out``
        for gid in self._by_feature.get(feature, ()):
            g = self._grants[gid]
            if gid in gone:
                continue
            if not g.dup:
                out.append((_principal(self._sessions[g.sid]), g.pool_key[1], g.count))
            elif g.dup != mine and (g.dup, g.pool_key[1]) not in counted:
                counted.add((g.dup, g.pool_key[1]))
                owner = groups.owner(g)
                holder = g if owner in gone else self._grants[owner]
                seats = groups.seats_of(g)  # as applied: never short while members go
                out.append((_principal(self._sessions[holder.sid]), g.pool_key[1], seats))
        out += [h for f, h in pending if f == feature]
        return out

    def _grant_delta(
        self,
        ids: Delta,
        request: Request,
        choice: Choice,
        gid: int,
        now: Now,
        waited: float | None = None,
        dup: str | None = None,
    ) -> Decided:
        """``waited``: seconds the checkout queued (the report log's, ``apply`` ignores it);
        ``dup``: the duplicate group the grant joins (broker/dup.py)."""
        pool = choice.pool
        delta: Delta = {
            "k": "grant",
            **ids,
            "grant": gid,
            "feature": pool.feature,
            "version": pool.version,
            "count": request.count,
            "at": now.wall,
        }
        if waited is not None:
            delta["waited"] = waited
        if dup is not None:
            delta["dup"] = dup
        grant = {"id": gid, "feature": pool.feature, "version": pool.version,
                 "count": request.count}  # fmt: skip
        return delta, reply_ok(grant=grant)

    def tick(self, now: Now) -> Ticked:
        """Expire lapsed leases, then serve and time out waiters, all decided in order."""
        deltas: list[Decided] = []
        ended: list[tuple[str, int]] = []
        for sid in self._unleased:
            if sid not in self._leases:
                self._renew(sid, now.mono + self.lease)  # fresh lease first
        self._unleased.clear()
        if not self._leases_ordered:  # the clock went back (only a test's clock does)
            self._leases = dict(sorted(self._leases.items(), key=lambda kv: kv[1]))
            self._leases_ordered = True
        gone: list[str] = []
        for sid, deadline in self._leases.items():
            if now.mono <= deadline:
                break  # every later lease ends later
            gone.append(sid)
        for sid in [sid for sid in gone if sid not in self._sessions]:
            gone.remove(sid)  # leased by an open that was never applied: moot
            del self._leases[sid]
        kept: set[int] = set()  # grants of expiring sessions that linger: their seats stay
        for sid in sorted(gone):
            expired: Delta = {"k": "expire", "sid": sid, "at": now.wall}
            lingers = self._lingers_of(self._sessions[sid], now.wall)
            if lingers:
                expired["linger"] = lingers
                kept.update(int(gid) for gid, _ in lingers)
            deltas.append((expired, None))
        # Seats as they will be once the deltas above and below are applied in order.
        extra: dict[PoolKey, int] = {}
        leaving = [gid for sid in gone for gid in self._sessions[sid].grants - kept]
        for key, n in self._seats_freed(leaving).items():
            extra[key] = extra.get(key, 0) - n
        gid = self._next_grant
        day = day_of(now.wall)
        pending: list[tuple[str, Holding]] = []  # grants decided below, for the policy
        freed = _NO_GRANTS
        if self._holds.by_grant or self._idle.idle:  # else nothing can be due: a tick a checkin
            freed = self._lapses_and_timeouts(now, frozenset(gone), deltas, extra)
        expiring = (
            frozenset(gid for sid in gone for gid in self._sessions[sid].grants if gid not in kept)
            | freed
            if gone
            else freed
        )
        # Features this tick frees seats of (or changes the holders of): their waiters
        # are asked again even if nothing was applied since they were last asked.
        freeing = {self._grants[g].feature for sid in gone for g in self._sessions[sid].grants}
        freeing.update(self._grants[g].feature for g in freed)
        for feature in sorted(self._queues):
            keep: deque[_Waiter] = deque()
            released = self._released.get(feature, 0)
            settled = feature not in freeing
            most = self._most_free(feature, day, extra)
            for w in self._queues[feature]:
                r = w.request
                session = None if r.sid in gone else self._sessions.get(r.sid)
                if session is None or r.req < session.ack or r.req in session.replies:
                    self._queued.discard((r.sid, r.req))  # its session ended or it was answered
                    if session is None:
                        ended.append((r.sid, r.req))
                    continue
                # Judged under this catalog and day, only seats keep it waiting: while
                # none of the feature's free (or no pool has as many free as it asks),
                # asking again would only say so again.
                judged = w.catalog is self._catalog and w.day == day and now.mono < w.deadline
                if judged and settled and w.released == released:
                    keep.append(w)
                    continue
                ids = _ids(r, max(session.ack, r.ack))
                dup = self._dup_key(r, session) if self._dup_masks or r.dup else None
                if judged and dup is None and r.count > most:
                    w.released = released
                    keep.append(w)
                    continue
                if dup is not None and expiring:
                    # Groups shrink as these grants go: judged at the next tick on what
                    # is applied, so that a group's seats are never counted short. It
                    # keeps its place; those behind it are served by their own needs.
                    keep.append(w)
                    continue
                # Every waiter that can be served now is (RLM's EXPRESS rule): one that
                # cannot keeps its place without holding back those behind it, whose
                # choice counts the seats granted before them in this tick (``extra``).
                choice = self._choose(r, session, day, extra, expiring, pending, dup)
                if isinstance(choice, Choice):
                    grant = self._grant_delta(ids, r, choice, gid, now, now.mono - w.arrived, dup)
                    deltas.append(grant)
                    gid += 1
                    # Never short: the group as applied, without this tick's members (dup.py)
                    cost = r.count - self._shared(r.feature, dup).get(choice.pool.key, 0)
                    key = choice.pool.pool_key
                    extra[key] = extra.get(key, 0) + max(0, cost)
                    pending.append((r.feature, (_principal(session), key[1], max(0, cost))))
                    most = self._most_free(feature, day, extra)
                elif not choice.busy:
                    denied = reply_denied(choice.reason, choice.detail)
                    deltas.append(_answer(ids, denied, now.wall, _asked(r, now.mono - w.arrived)))
                elif now.mono >= w.deadline:
                    detail = f"{choice.detail}; gave up after waiting {r.wait:g} s"
                    denied = reply_denied(choice.reason, detail)
                    deltas.append(_answer(ids, denied, now.wall, _asked(r, now.mono - w.arrived)))
                else:
                    # Seats granted later in this tick only take room: still waiting then.
                    w.catalog, w.day, w.released = self._catalog, day, released
                    keep.append(w)
                    continue
                self._queued.discard((r.sid, r.req))
            if keep:
                self._queues[feature] = keep
            else:
                del self._queues[feature]
        return Ticked(deltas, ended)

    def _most_free(self, feature: str, day: datetime.date, extra: dict[PoolKey, int]) -> int:
        """The most seats free in one pool of ``feature`` with ``extra`` counted: whoever
        asks for more, in no duplicate group, cannot be served (the options file only
        ever gives less)."""
        used = self._used
        return max(
            (p.total(day) - used.get(p.pool_key, 0) - extra.get(p.pool_key, 0)
             for p in self._catalog.pools(feature)),
            default=0,
        )  # fmt: skip

    def _lapses_and_timeouts(
        self, now: Now, gone: frozenset[str], deltas: list[Decided], extra: dict[PoolKey, int]
    ) -> frozenset[int]:
        """Holds whose end passed (``lapse``), and grants of sessions idle longer than their
        TIMEOUT (``take``, reason ``timeout``; never lingers): appended to ``deltas``, their
        seats taken off ``extra``. Reads only what is due (broker/holds.py)."""
        freed: list[int] = []
        for gid in self._holds.due(now.wall):
            deltas.append(({"k": "lapse", "grant": gid, "at": now.wall}, None))
            freed.append(gid)
        policy = self._policy
        if policy is not None and self._idle.least is not None:
            for session in self._idle.due(now.wall):
                since = session.idle_since
                if since is None or session.sid in gone:
                    continue  # its expire ends it
                watch = math.inf
                for gid in sorted(session.grants):
                    g = self._grants[gid]
                    timeout = policy.timeout(g.feature, g.pool_key[1])
                    if timeout is None:
                        continue
                    watch = min(watch, since + timeout)
                    if since + timeout <= now.wall:
                        take = {"k": "take", "grant": gid, "reason": "timeout", "at": now.wall}
                        deltas.append((take, None))
                        freed.append(gid)
                if watch < math.inf:  # looked at again once the take applied, or when due
                    self._idle.watch(session, watch)
        for key, n in self._seats_freed(freed).items():
            extra[key] = extra.get(key, 0) - n
        return frozenset(freed)

    def _seats_freed(self, gids: Sequence[int]) -> dict[PoolKey, int]:
        """Seats each pool frees once grants ``gids`` are gone: a duplicate group's only
        as it shrinks. Asked in parts, it never adds up to more than at once (dup.py)."""
        out: dict[PoolKey, int] = {}
        grouped: list[Grant] = []
        for gid in gids:
            g = self._grants[gid]
            if g.dup:
                grouped.append(g)
            else:
                out[g.pool_key] = out.get(g.pool_key, 0) + g.count
        for key, n in self._groups.freed_if_gone(grouped).items():
            out[key] = out.get(key, 0) + n
        return out

    def _renew(self, sid: str, deadline: float) -> None:
        self._leases.pop(sid, None)  # re-inserted at the end: deadline order
        self._leases[sid] = deadline
        if deadline < self._lease_max:
            self._leases_ordered = False
        self._lease_max = max(self._lease_max, deadline)

    def forget_volatile(self) -> None:
        """Drop leases and waiters: call on losing or gaining the primary role."""
        self._leases.clear()
        self._lease_max, self._leases_ordered = -math.inf, True
        self._unleased = {sid for sid, s in self._sessions.items() if not s.hold}
        self._queues.clear()
        self._queued.clear()

    # ------------------------------------------------------------ reading

    def recorded(self, sid: str, req: int) -> Reply | None:
        session = self._sessions.get(sid)
        reply = session.replies.get(req) if session is not None else None
        return copy.deepcopy(reply) if reply is not None else None

    @property
    def next_grant(self) -> int:
        return self._next_grant

    @property
    def entitlements(self) -> tuple[Entitlement, ...]:
        return self._catalog.entitlements

    @property
    def license_lines(self) -> tuple[str, ...] | None:
        """The signed lines of the license in force (None: its reload carried none)."""
        return self._license

    @property
    def options(self) -> Options | None:
        """The options file in force (replicated with the entitlements), None: none."""
        return self._options

    @property
    def policy(self) -> Policy | None:
        """The decisions of ``options`` (None: no options file); read-only for status."""
        return self._policy

    def holdings(self, feature: str) -> list[Holding]:
        """Every grant of ``feature`` as the policy counts it (status shows reservations
        with them: broker/reserved.py). O(grants of the feature)."""
        return self._holdings(feature, frozenset(), ())

    def sessions(self) -> list[str]:
        """The client sessions open (holds are not sessions: see ``holds``)."""
        return sorted(sid for sid, s in self._sessions.items() if not s.hold)

    @property
    def session_count(self) -> int:
        """Client sessions open, holds not counted (O(1): for the limits and the metrics)."""
        return len(self._sessions) - len(self._holds)

    def holds(self) -> list[Session]:
        """The holds (lingering, borrowed seats), by grant id; read-only."""
        return [self._holds.by_grant[gid] for gid in sorted(self._holds.by_grant)]

    def session(self, sid: str) -> Session | None:
        """The session's record; callers must treat it as read-only."""
        return self._sessions.get(sid)

    def grant(self, gid: int) -> Grant | None:
        """Grant ``gid`` if it is out (the report log reads it before a release applies)."""
        return self._grants.get(gid)

    def grants(self) -> list[Grant]:
        return list(self._grants.values())

    def in_use(self, feature: str, version: str | None = None) -> int:
        """Seats of ``feature`` held, in the pool of ``version`` or in all of them."""
        if version is None:
            return self._used_of_feature.get(feature, 0)
        return self._used.get((feature, parse_version(version)), 0)

    def queued(self, feature: str) -> int:
        """Requests waiting for ``feature``."""
        return len(self._queues.get(feature, ()))

    def queue(self, feature: str, limit: int) -> list[dict[str, Any]]:
        """The first ``limit`` waiters for ``feature``, first in line first: one entry each
        of a status reply's ``queue`` (docs/protocol.md). O(limit), whatever waits."""
        out: list[dict[str, Any]] = []
        for w in self._queues.get(feature, ()):
            if len(out) >= limit:
                break
            r = w.request
            session = self._sessions.get(r.sid)
            if session is None:
                continue  # its session ended: the next tick drops it
            # The handle is no number: one would read as a grant id to whoever runs
            # ``zbroker remove --grant`` from lmstat's line (where FlexNet has handles).
            out.append(
                {"user": session.user, "host": session.host, "display": session.display,
                 "version": r.version, "count": r.count, "handle": f"q{r.req}",
                 "since": w.since}
            )  # fmt: skip
        return out

    def lease_of(self, sid: str) -> float | None:
        return self._leases.get(sid)

    def status(self, now: Now | None = None) -> list[dict[str, Any]]:
        """The ``features`` of a status reply; ``now`` drops expired lines (None: keep all).

        A summary: its cost grows with the license's lines, never with grants or sessions
        (the holders are ``holders``' pages).
        """
        day = now.date if now is not None else None
        in_use: dict[str, int] = {}
        for (feature, _), n in self._used.items():
            if n:
                in_use[feature] = in_use.get(feature, 0) + n
        out = []
        for name in sorted(set(self._catalog.features()) | set(in_use)):
            pools = self._catalog.pools(name)
            out.append(
                {
                    "name": name,
                    "total": sum(p.total(day) for p in pools),
                    "in_use": in_use.get(name, 0),
                    "queued": self.queued(name),
                    # seats of in_use that holds keep (LINGER, BORROW)
                    "lingering": self._holds.seats("linger", name),
                    "borrowed": self._holds.seats("borrow", name),
                    "versions": [p.status(day, self._used.get(p.pool_key, 0)) for p in pools],
                }
            )
        return out

    def holders(
        self, feature: str | None, after: int, limit: int, scan: int = HOLDERS_SCAN
    ) -> tuple[list[dict[str, Any]], int | None]:
        """A page of holders: grants with id > ``after``, ascending, of ``feature`` if given.

        At most ``limit`` holders, and at most ``scan`` grants looked at (a rare feature
        in a large ledger must not cost a scan of every grant). Returns the holders and
        the cursor of the next page (the last grant looked at), None when none are left.
        """
        if limit < 1 or scan < 1:
            raise ValueError(f"a page needs limit ({limit}) and scan ({scan}) of at least 1")
        ids = self._ids
        if ids is None:
            # Built once after the grants change, then each page is a bisect and a slice.
            ids = self._ids = sorted(self._grants)
        at = bisect.bisect_right(ids, after)
        end = min(len(ids), at + scan)
        out: list[dict[str, Any]] = []
        while at < end and len(out) < limit:
            g = self._grants[ids[at]]
            at += 1
            if feature is None or g.feature == feature:
                holder = g.holder(self._sessions[g.sid])
                holder["feature"] = g.feature
                if g.dup:  # the grants sharing its seat(s), oldest first (broker/dup.py)
                    holder["sharers"] = self._groups.sharers(g)
                out.append(holder)
        return out, (ids[at - 1] if at < len(ids) else None)

    def _open_reply(self) -> Reply:
        return reply_ok(lease=self.lease, heartbeat=self.heartbeat)


class LedgerBuilder:
    """A ledger built from the maps of ``Ledger.snapshot()``: its head (the map without
    ``sessions`` and ``grants``), then its sessions, then its grants, in as many calls as
    the caller likes (``broker/image.py`` loads a snapshot in steps with it). The one way a
    ledger is built from a snapshot; LedgerError when the maps are malformed, and the
    builder is then of no further use.
    """

    def __init__(
        self,
        head: dict[str, Any],
        *,
        lease: float,
        heartbeat: float,
        limits: Limits | None = None,
        min_timeout: float = DEFAULT_MIN_TIMEOUT,
    ) -> None:
        if not isinstance(head, dict) or head.get("v") != SNAPSHOT_VERSION:
            raise LedgerError(f"snapshot must be a map with v={SNAPSHOT_VERSION}")
        ledger = Ledger(
            entitlements_from(head.get("entitlements"), "snapshot"),
            lease=lease,
            heartbeat=heartbeat,
            limits=limits,
            options=_options_from(head.get("options"), "snapshot"),
            min_timeout=min_timeout,
        )
        ledger._license = _license_from(head.get("license"), "snapshot")
        ledger._next_grant = field_int(head, "next_grant", 1)
        self._ledger = ledger
        self._granting = False  # grants started: a session now would come too late
        # One str object per distinct name: unpacked maps hold a new one per field, which
        # at 1,000,000 grants cost a quarter of the ledger's heap (its sid, feature and
        # version, and each session's user, host and the like).
        self._names: dict[str, str] = {}

    def sessions(self, maps: Sequence[object]) -> None:
        ledger, names = self._ledger, self._names
        if self._granting:
            raise LedgerError("snapshot: sessions must come before the grants")
        for s in maps:
            session = session_from_snapshot(s)
            if session.sid in ledger._sessions:
                raise LedgerError(f"snapshot: session {session.sid} appears twice")
            session.user = names.setdefault(session.user, session.user)
            session.host = names.setdefault(session.host, session.host)
            session.display = names.setdefault(session.display, session.display)
            session.client_version = names.setdefault(
                session.client_version, session.client_version
            )
            session.address = names.setdefault(session.address, session.address)
            session.project = names.setdefault(session.project, session.project)
            ledger._add_session(session)

    def grants(self, maps: Sequence[object]) -> None:
        ledger, names = self._ledger, self._names
        self._granting = True
        for g in maps:
            if not isinstance(g, dict):
                raise LedgerError("snapshot: a grant must be a map")
            grant = grant_from(g)
            session = ledger._sessions.get(grant.sid)
            if session is None or grant.id in ledger._grants or grant.id >= ledger._next_grant:
                raise LedgerError(f"snapshot: grant {grant.id} is duplicated, orphaned or too new")
            grant.sid = session.sid
            grant.feature = names.setdefault(grant.feature, grant.feature)
            grant.version = names.setdefault(grant.version, grant.version)
            ledger._add_grant(grant)

    def done(self) -> Ledger:
        return self._ledger


# ---------------------------------------------------------------- helpers


_FULL = 2**62  # seats that make a pool look full to ``choose``
_NO_GRANTS: frozenset[int] = frozenset()


def _lingers(d: Delta, session: Session) -> list[tuple[int, float, float]]:
    """The (grant, until, at) of a session end's ``linger`` pairs, each a grant of it."""
    raw = d.get("linger", [])
    if not isinstance(raw, list):
        raise LedgerError(f"{d['k']} delta: 'linger' must be a list of [grant, until] pairs")
    out: list[tuple[int, float, float]] = []
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise LedgerError(f"{d['k']} delta: 'linger' must be a list of [grant, until] pairs")
        entry = {"k": d["k"], "grant": pair[0], "until": pair[1]}
        gid, until = field_int(entry, "grant", 1), field_wall(entry, "until")
        if gid not in session.grants or any(gid == g for g, _, _ in out):
            raise LedgerError(f"{d['k']} delta: lingers grant {gid}, not held by {session.sid}")
        out.append((gid, until, field_wall(d)))
    return out


def _principal(session: Session) -> Principal:
    return Principal(session.user, session.host, session.display, session.address, session.project)


def _license_from(raw: object, where: str) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise LedgerError(f"{where}: 'license' must be a list of signed lines or nil")
    return tuple(raw)


def _options_from(raw: object, where: str) -> Options | None:
    if raw is None:
        return None
    try:
        return Options.from_map(raw)
    except OptionsError as exc:
        raise LedgerError(f"{where}: {exc}") from None


def _ids(request: Request, ack: int) -> Delta:
    return {"sid": request.sid, "req": request.req, "ack": max(ack, request.ack)}


def _names(request: Request) -> Delta:
    return {k: getattr(request, k) for k in SESSION_NAMES}


def _answer(ids: Delta, reply: Reply, at: float, asked: Delta | None = None) -> Decided:
    # The log keeps the delta and ``apply`` records a copy: the client's reply may share it.
    # ``at`` and ``asked`` are for the report log only (docs/reportlog.md): ``apply``
    # ignores them, and a delta of an older node without them applies alike.
    delta = {"k": "answer", **ids, "reply": reply, "at": at}
    if asked is not None:
        delta.update(asked)
    return delta, reply


def _asked(request: Request, waited: float | None = None) -> Delta:
    """What a denied checkout asked for, and how long it waited in the queue (when it
    did): the report log names the feature of a denial and reports queue waits. A
    borrow's or return's also names its op (a checkout's stays as small as it was)."""
    asked: Delta = {"feature": request.feature, "count": request.count}
    if request.op in ("borrow", "return"):
        asked["op"] = request.op
    if request.version is not None:
        asked["version"] = request.version
    if waited is not None:
        asked["waited"] = waited
    return asked


def _unknown(sid: str) -> str:
    return f"session {sid} is not open: never opened, closed, or expired"


def _stale(req: int, ack: int) -> Reply:
    return reply_error(ErrorCode.STALE_REQUEST, f"request {req} is below the acknowledged {ack}")
