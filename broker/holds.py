"""Holds and idle sessions, indexed by their wall-clock deadlines, for the ledger.

A *hold* (docs/admin.md: LINGER; BORROW) is a session record of its own, sid
``hold:<grant id>``, that keeps exactly one grant after the session that took it checked
it in or ended, until a replicated wall time ``until``. No lease expires it and no
session limit counts it; the primary's ``tick`` ends it with a ``lapse`` delta once
``now.wall`` passes ``until`` (or a checkout reclaims a lingering one).

An *idle* session is one whose application said so (``idle`` delta, ``idle_since``);
under a TIMEOUT line the primary's tick takes its grants once it has been idle longer
than the line allows.

The ledger's replicated state (its sessions) is the truth; these indexes are derived
from it by every node, so that whichever node is primary finds what is due without
scanning every session every tick. Both are min-heaps with lazy deletion: an entry
whose hold or idleness ended is stale and dropped when it comes up; a heap that grows
to twice what is live (a backup never ticks) is rebuilt. Pure: no clock, no sockets.
"""

from __future__ import annotations

import heapq

from zbroker.broker.options import Options
from zbroker.broker.seats import HOLD_PREFIX, Grant, Session

__all__ = ["HoldIndex", "IdleIndex", "hold_sid", "least_timeout"]


def hold_sid(gid: int) -> str:
    return f"{HOLD_PREFIX}{gid}"


def least_timeout(options: Options | None, min_timeout: float) -> float | None:
    """The shortest idle timeout any TIMEOUT/TIMEOUTALL line gives (raised to the floor),
    or None when there is none: then no session is watched at all."""
    if options is None:
        return None
    seconds = [ln.number or 0 for ln in options.lines if ln.keyword in ("TIMEOUT", "TIMEOUTALL")]
    return max(float(min(seconds)), min_timeout) if seconds else None


class HoldIndex:
    """The holds by grant id, by ``until``, and the seats they keep by kind and feature."""

    def __init__(self) -> None:
        self.by_grant: dict[int, Session] = {}
        self._due: list[tuple[float, int]] = []  # (until, grant id), lazily deleted
        # Lingering grants by (user, host, feature): a checkout looks here to reclaim.
        self.lingering: dict[tuple[str, str, str], set[int]] = {}
        self._seats: dict[tuple[str, str], int] = {}  # (kind, feature) -> seats held

    def __len__(self) -> int:
        return len(self.by_grant)

    def add(self, hold: Session, grant: Grant) -> None:
        self.by_grant[grant.id] = hold
        heapq.heappush(self._due, (hold.until, grant.id))
        if hold.hold == "linger":
            self.lingering.setdefault((hold.user, hold.host, grant.feature), set()).add(grant.id)
        key = (hold.hold, grant.feature)
        self._seats[key] = self._seats.get(key, 0) + grant.count

    def remove(self, grant: Grant) -> None:
        hold = self.by_grant.pop(grant.id)
        if hold.hold == "linger":
            key3 = (hold.user, hold.host, grant.feature)
            ids = self.lingering[key3]
            ids.discard(grant.id)
            if not ids:
                del self.lingering[key3]
        key = (hold.hold, grant.feature)
        left = self._seats[key] - grant.count
        if left:
            self._seats[key] = left
        else:
            del self._seats[key]
        if len(self._due) > 2 * len(self.by_grant) + 64:
            self._due = [(h.until, gid) for gid, h in self.by_grant.items()]
            heapq.heapify(self._due)

    def seats(self, kind: str, feature: str) -> int:
        return self._seats.get((kind, feature), 0)

    def due(self, wall: float) -> list[int]:
        """Grant ids of the holds whose ``until`` is at or before ``wall``, earliest first.

        They stay indexed until their ``lapse`` applies (a tick whose deltas were never
        applied loses nothing): the entries are put back and come up again.
        """
        out: list[int] = []
        seen: set[int] = set()
        live: list[tuple[float, int]] = []
        while self._due and self._due[0][0] <= wall:
            until, gid = heapq.heappop(self._due)
            hold = self.by_grant.get(gid)
            if hold is not None and hold.until == until and gid not in seen:
                seen.add(gid)
                out.append(gid)
                live.append((until, gid))
        for entry in live:
            heapq.heappush(self._due, entry)
        return out


class IdleIndex:
    """Idle sessions, and when the tick should look at each next.

    ``least`` is the shortest timeout of the policy in force (None: no TIMEOUT line, and
    nothing is watched); a session that went idle at ``since`` is first due at
    ``since + least``, and the tick watches it again at the deadline of its grants'
    own timeouts.
    """

    def __init__(self) -> None:
        self.idle: dict[str, Session] = {}
        self.least: float | None = None
        self._due: list[tuple[float, str, float]] = []  # (due, sid, idle_since)

    def went_idle(self, session: Session) -> None:
        self.idle[session.sid] = session
        if self.least is not None and session.idle_since is not None:
            self.watch(session, session.idle_since + self.least)

    def busy(self, sid: str) -> None:
        self.idle.pop(sid, None)

    def watch(self, session: Session, due: float) -> None:
        if session.idle_since is None:
            return
        heapq.heappush(self._due, (due, session.sid, session.idle_since))
        if len(self._due) > 2 * len(self.idle) + 64:
            self.rebuild(self.least)

    def due(self, wall: float) -> list[Session]:
        """The idle sessions due at ``wall``, each once, earliest first. The caller
        watches each again while it holds a grant with a timeout (``watch``)."""
        out: list[Session] = []
        seen: set[str] = set()
        while self._due and self._due[0][0] <= wall:
            _, sid, since = heapq.heappop(self._due)
            session = self.idle.get(sid)
            if session is not None and session.idle_since == since and sid not in seen:
                seen.add(sid)
                out.append(session)
        return out

    def rebuild(self, least: float | None) -> None:
        """Watch every idle session afresh under the shortest timeout ``least`` (a reload
        changed the timeouts, or stale entries piled up)."""
        self.least = least
        self._due = (
            []
            if least is None
            else [
                (s.idle_since + least, s.sid, s.idle_since)
                for s in self.idle.values()
                if s.idle_since is not None
            ]
        )
        heapq.heapify(self._due)
