"""The ledger's values: seat pools, the checkout decision, grants and sessions.

``zbroker.broker.ledger`` is the state machine; this module holds what it is made of, so
that the machine reads in one sitting: how a license's lines add up into pools,
which pool serves a checkout, and the grant and session records with their
msgpack-able forms (shared by deltas and snapshots, validated on the way in).

Pools
-----
A *pool* is every FEATURE/INCREMENT line of one feature at one version *as parsed*
(``2`` and ``2.0`` are the same pool). Its total on a given day is the sum of the
counts of its lines that have not expired on that day, which is how INCREMENT lines
add seats. A pool shows the version as written on its first line in license order.

USERS=/HOSTS= restrict a line; a pool admits a session when at least one of its live
lines admits it. Seats inside a pool are not told apart by line (a grant records the
pool, not the line), so a pool mixing restricted and open lines shares all its seats
among everyone it admits: per-line accounting would need the line in every grant and
is left out on purpose.

``choose`` is the whole checkout decision, a pure function of the catalog, the
request, the session's user/host, the day and the seats in use. The reasons are
tried in this order, each one narrower than the last, so the client hears the most
useful one: no line at all -> no line with a high enough version -> all of those
expired -> none admits this session -> the request is larger than any pool could
ever hold -> no pool has enough free seats right now. Only the last is *busy*: it
may succeed later, so only it may wait in a queue.

Nothing here mutates anything; ``used`` is passed in so that a caller can layer
tentative grants on top of the ledger's counts.

Records
-------
Every reader of a record from outside (a delta, a snapshot) checks each field's type
and range and raises ``LedgerError`` naming the record and field, before the ledger
changes anything.
"""

from __future__ import annotations

import copy
import datetime
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from zbroker.broker.based import restrict
from zbroker.broker.model import Entitlement, Now, Reason, Reply, reply_ok
from zbroker.broker.model import parse_version as _parse_version
from zbroker.broker.options import Options
from zbroker.clients.protocol import parse_dup_mask

Version = tuple[int, ...]
PoolKey = tuple[str, Version]  # (feature, parsed version)

# A license has a handful of versions and every grant names one: parse each once.
# Bounded, so that versions from hostile requests cannot grow it (errors are not kept).
parse_version = functools.lru_cache(maxsize=1024)(_parse_version)


class LedgerError(Exception):
    """A delta or snapshot that does not fit the ledger; the message says what and why."""


@dataclass(frozen=True)
class Pool:
    """The lines of one feature at one parsed version."""

    feature: str
    key: Version
    version: str  # as written on the pool's first line
    lines: tuple[Entitlement, ...]
    # (live lines, their total) by day: every checkout and grant asks, the answer
    # changes once a day at most
    _by_day: dict[datetime.date | None, tuple[tuple[Entitlement, ...], int]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def _on(self, day: datetime.date | None) -> tuple[tuple[Entitlement, ...], int]:
        got = self._by_day.get(day)
        if got is None:
            live = tuple(e for e in self.lines if day is None or not e.expired_on(day))
            got = (live, sum(e.count for e in live))
            if len(self._by_day) >= 8:
                self._by_day.clear()  # days go by: keep the cache small
            self._by_day[day] = got
        return got

    def live(self, day: datetime.date | None) -> list[Entitlement]:
        """Lines that still grant on ``day`` (None: ignore expiry)."""
        return list(self._on(day)[0])

    def total(self, day: datetime.date | None) -> int:
        return self._on(day)[1]

    def admits(self, user: str, host: str, day: datetime.date | None) -> bool:
        return any(_admits(e, user, host) for e in self._on(day)[0])

    def expires(self, day: datetime.date | None) -> str | None:
        """The next date on which some of its live seats lapse, ISO; None: all permanent."""
        dates = [e.expires for e in self.live(day) if e.expires is not None]
        return min(dates).isoformat() if dates else None

    @property
    def pool_key(self) -> PoolKey:
        return (self.feature, self.key)

    def status(self, day: datetime.date | None, in_use: int) -> dict[str, Any]:
        """One entry of a status reply's ``versions``; ``lines`` has each of its license
        lines, expired ones too, with the days left to its expiry (None: permanent, or
        no ``day``; 0: its last day; below 0: expired and granting nothing new)."""
        lines = [
            {"count": e.count, "expires": None if e.expires is None else e.expires.isoformat(),
             "days": None if e.expires is None or day is None else (e.expires - day).days,
             "source": e.source}
            for e in self.lines
        ]  # fmt: skip
        return {"version": self.version, "total": self.total(day), "in_use": in_use,
                "expires": self.expires(day), "lines": lines}  # fmt: skip


def _admits(line: Entitlement, user: str, host: str) -> bool:
    return (line.users is None or user in line.users) and (line.hosts is None or host in line.hosts)


class Catalog:
    """The license's lines grouped into pools, lowest version first within a feature."""

    def __init__(self, entitlements: Sequence[Entitlement], options: Options | None = None) -> None:
        self.entitlements: tuple[Entitlement, ...] = tuple(entitlements)
        # USER_BASED/HOST_BASED lines admit only whom the options file names (based.py);
        # ``entitlements`` stays as the license says, for comparing and replicating.
        pooled, _ = restrict(self.entitlements, options)  # the node logs the warnings
        grouped: dict[str, dict[Version, list[Entitlement]]] = {}
        for line in pooled:
            by_version = grouped.setdefault(line.feature, {})
            by_version.setdefault(parse_version(line.version), []).append(line)
        self._pools: dict[str, list[Pool]] = {
            feature: [
                Pool(feature, key, lines[0].version, tuple(lines))
                for key, lines in sorted(by_version.items())
            ]
            for feature, by_version in grouped.items()
        }

    def features(self) -> list[str]:
        return sorted(self._pools)

    def pools(self, feature: str) -> list[Pool]:
        return self._pools.get(feature, [])

    def pool(self, feature: str, version: Version) -> Pool | None:
        for p in self.pools(feature):
            if p.key == version:
                return p
        return None


# Choice, Denial and Grant are not frozen: one is made per checkout, and a frozen
# dataclass's __init__ sets each field through object.__setattr__ (scripts/
# ab_instructions.py counts it). No one changes them once made.
@dataclass(slots=True)
class Choice:
    """The checkout can be served now from ``pool``."""

    pool: Pool


@dataclass(slots=True)
class Denial:
    """The checkout cannot be served now; ``busy`` means only for lack of free seats."""

    reason: str
    detail: str
    busy: bool = False


def choose(
    catalog: Catalog,
    feature: str,
    version: str | None,
    count: int,
    user: str,
    host: str,
    day: datetime.date,
    used: Callable[[PoolKey], int],
) -> Choice | Denial:
    """Decide one checkout: the lowest version pool >= ``version`` with ``count`` free seats."""
    pools = catalog.pools(feature)
    if not pools:
        return Denial(Reason.NO_SUCH_FEATURE, f"the license has no line for feature {feature!r}")
    floor = parse_version(version) if version is not None else None
    what = feature if version is None else f"{feature} >= {version}"
    high = [p for p in pools if floor is None or p.key >= floor]
    if not high:
        return Denial(
            Reason.VERSION_TOO_HIGH,
            f"no line of {feature} has a version >= {version} (the highest is {pools[-1].version})",
        )
    live = [p for p in high if p._on(day)[0]]
    if not live:
        last = max(e.expires for p in high for e in p.lines if e.expires is not None)
        return Denial(Reason.EXPIRED, f"every line of {what} has expired, the last on {last}")
    admitted = [p for p in live if p.admits(user, host, day)]
    if not admitted and any(
        e.user_based is not None or e.host_based is not None for p in live for e in p.live(day)
    ):
        return Denial(
            Reason.NOT_INCLUDED,
            f"{what} is licensed USER_BASED/HOST_BASED: only the users and hosts the options "
            f"file's INCLUDE lines name may use it, and user {user!r} on host {host!r} is "
            "not one of them",
        )
    if not admitted:
        return Denial(
            Reason.NOT_ALLOWED,
            f"no line of {what} admits user {user!r} on host {host!r} (USERS=/HOSTS=)",
        )
    largest = max(admitted, key=lambda p: p.total(day))
    if count > largest.total(day):
        return Denial(
            Reason.NO_SEATS,
            f"{count} seats of {what} asked for, but the largest pool "
            f"({feature} {largest.version}) has {largest.total(day)}",
        )
    for p in admitted:
        if used(p.pool_key) + count <= p.total(day):
            return Choice(p)
    return Denial(Reason.NO_SEATS, busy_detail(admitted, count, day, used), busy=True)


def busy_detail(
    pools: Sequence[Pool], count: int, day: datetime.date, used: Callable[[PoolKey], int]
) -> str:
    """'cad 2.0: 10 of 10 seats in use' for every pool that could have served."""
    parts = [
        f"{p.feature} {p.version}: {used(p.pool_key)} of {p.total(day)} seats in use" for p in pools
    ]
    wanted = f" ({count} asked for)" if count > 1 else ""
    return "; ".join(parts) + wanted


def entitlement_to_map(line: Entitlement) -> dict[str, Any]:
    """A line as a msgpack-able map, for ``reload`` deltas and snapshots."""
    return {
        "feature": line.feature,
        "version": line.version,
        "count": line.count,
        "expires": line.expires.isoformat() if line.expires is not None else None,
        "users": sorted(line.users) if line.users is not None else None,
        "hosts": sorted(line.hosts) if line.hosts is not None else None,
        "source": line.source,
        # only when set: the maps of every other line stay as they were
        **({"borrow": line.borrow} if line.borrow is not None else {}),
        **({"early_return": False} if not line.early_return else {}),
        **({"user_based": line.user_based} if line.user_based is not None else {}),
        **({"host_based": line.host_based} if line.host_based is not None else {}),
        **({"dup_group": line.dup_group} if line.dup_group is not None else {}),
    }


def entitlement_from_map(m: object) -> Entitlement:
    """The inverse of ``entitlement_to_map``; LedgerError names the first field that is wrong."""
    if not isinstance(m, dict):
        raise LedgerError(f"an entitlement must be a map, got {type(m).__name__}")
    feature, version, count = m.get("feature"), m.get("version"), m.get("count")
    if not isinstance(feature, str) or not feature:
        raise LedgerError("entitlement field 'feature' must be a non-empty str")
    if not isinstance(version, str):
        raise LedgerError(f"entitlement {feature}: field 'version' must be a str")
    _version(version, f"entitlement {feature}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise LedgerError(f"entitlement {feature}: field 'count' must be an int >= 0")
    expires = m.get("expires")
    if expires is not None and not isinstance(expires, str):
        raise LedgerError(f"entitlement {feature}: field 'expires' must be an ISO date or nil")
    source = m.get("source", "")
    if not isinstance(source, str):
        raise LedgerError(f"entitlement {feature}: field 'source' must be a str")
    try:
        expiry = datetime.date.fromisoformat(expires) if expires is not None else None
    except ValueError:
        raise LedgerError(f"entitlement {feature}: 'expires' {expires!r} is no ISO date") from None
    borrow, early_return = m.get("borrow"), m.get("early_return", True)
    if borrow is not None and not (
        isinstance(borrow, int | float) and not isinstance(borrow, bool) and 0 < borrow < math.inf
    ):
        raise LedgerError(f"entitlement {feature}: field 'borrow' must be hours > 0 or nil")
    if not isinstance(early_return, bool):
        raise LedgerError(f"entitlement {feature}: field 'early_return' must be a bool")
    return Entitlement(
        feature=feature,
        version=version,
        count=count,
        expires=expiry,
        users=_name_set(m.get("users"), feature, "users"),
        hosts=_name_set(m.get("hosts"), feature, "hosts"),
        source=source,
        borrow=None if borrow is None else float(borrow),
        early_return=early_return,
        user_based=_based(m, feature, "user_based"),
        host_based=_based(m, feature, "host_based"),
        dup_group=_dup_group(m.get("dup_group"), feature),
    )


def _dup_group(value: object, feature: str) -> str | None:
    if value is None:
        return None
    try:
        if isinstance(value, str) and parse_dup_mask(value) == value:
            return value
    except ValueError:
        pass
    raise LedgerError(f"entitlement {feature}: field 'dup_group' {value!r:.20} is no mask")


def _based(m: dict[str, Any], feature: str, name: str) -> int | None:
    value = m.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise LedgerError(f"entitlement {feature}: field {name!r} must be an int >= 1 or nil")
    return value


def _name_set(value: object, feature: str, name: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LedgerError(f"entitlement {feature}: field {name!r} must be a list of str or nil")
    return frozenset(value)


def entitlements_from(raw: object, where: str) -> list[Entitlement]:
    if not isinstance(raw, list):
        raise LedgerError(f"{where}: 'entitlements' must be a list")
    return [entitlement_from_map(m) for m in raw]


@dataclass(slots=True)  # not frozen: see Choice
class Grant:
    id: int
    sid: str
    feature: str
    version: str  # as written on the pool's first line when granted
    count: int
    at: float  # wall time of the grant ("since")
    # The duplicate group it shares a seat with (broker/dup.py), "" for none: members of
    # one group in one pool hold the largest count any of them asked for, once.
    dup: str = ""

    @property
    def pool_key(self) -> PoolKey:
        return (self.feature, parse_version(self.version))

    def to_map(self) -> dict[str, Any]:
        """The fields a grant delta and a snapshot's grant share."""
        out = {"grant": self.id, "sid": self.sid, "feature": self.feature,
               "version": self.version, "count": self.count, "at": self.at}  # fmt: skip
        if self.dup:
            out["dup"] = self.dup
        return out

    def holder(self, s: Session) -> dict[str, Any]:
        """One entry of a status reply's ``holders``; a hold's adds ``hold`` and ``until``."""
        out = {"grant": self.id, "user": s.user, "host": s.host, "display": s.display,
               "count": self.count, "version": self.version, "since": self.at}  # fmt: skip
        if s.hold:
            out["hold"], out["until"] = s.hold, s.until
        return out

    def reply(self) -> Reply:
        return reply_ok(
            grant={"id": self.id, "feature": self.feature, "version": self.version,
                   "count": self.count}
        )  # fmt: skip


def grant_from(d: dict[str, Any]) -> Grant:
    """A grant from a grant delta or a snapshot entry (they share these fields)."""
    g = Grant(
        field_int(d, "grant", 1), field_str(d, "sid"), field_str(d, "feature"),
        field_str(d, "version"), field_int(d, "count", 1), field_wall(d),
        field_str(d, "dup") if "dup" in d else "",
    )  # fmt: skip
    _version(g.version, str(d.get("k", "grant")))
    return g


HOLD_PREFIX = "hold:"  # the sid of a hold is this and its grant's id
HOLD_KINDS = frozenset({"linger", "borrow"})
SESSION_NAMES = ("user", "host", "display", "client_version")
# What the node saw and the client may send, absent from deltas and snapshots written
# before they were kept: read as "" when missing.
SESSION_EXTRAS = ("address", "project")


@dataclass(slots=True)
class Session:
    sid: str
    user: str
    host: str
    display: str
    client_version: str
    at: float  # wall time it opened
    address: str = ""  # the connection's Peer-Address when it opened ("" unknown)
    project: str = ""  # the project the client sent (``ZBROKER_PROJECT``), may be empty
    ack: int = 0  # the client has every reply below this one
    replies: dict[int, Reply] = field(default_factory=dict)  # recorded, by req; never mutated
    grants: set[int] = field(default_factory=set)
    # A hold (docs/admin.md, LINGER; BORROW): a record of its own, sid ``hold:<grant id>``,
    # that keeps one grant after the session that took it checked it in or ended, until
    # the wall time ``until``. "" for a client's session.
    hold: str = ""
    until: float = 0.0
    idle_since: float | None = None  # wall time the application said it went idle
    # Grants the triad took from this session (``take``: removed, timed out) and why,
    # oldest first, the last TAKEN_KEPT only: heartbeat replies tell the library.
    taken: dict[int, str] = field(default_factory=dict)

    def to_map(self) -> dict[str, Any]:
        """The session as a snapshot holds it (its grants are listed apart)."""
        fields = {
            k: getattr(self, k) for k in ("sid", *SESSION_NAMES, *SESSION_EXTRAS, "at", "ack")
        }
        # Only when set: a snapshot without them reads as before.
        if self.hold:
            fields["hold"], fields["until"] = self.hold, self.until
        if self.idle_since is not None:
            fields["idle_since"] = self.idle_since
        if self.taken:
            fields["taken"] = [[gid, why] for gid, why in self.taken.items()]
        # Shared, not copied: a recorded reply is never changed once recorded (the ledger
        # hands out copies), and copying 10,000 of them held the loop ~100 ms a snapshot.
        replies = [[r, self.replies[r]] for r in sorted(self.replies)]
        return {**fields, "replies": replies}


def session_from(d: dict[str, Any]) -> Session:
    """A session from an open delta or a snapshot entry (they share these fields)."""
    user, host, display, client = (field_str(d, k, empty=True) for k in SESSION_NAMES)
    address, project = (field_str(d, k, empty=True) if k in d else "" for k in SESSION_EXTRAS)
    return Session(
        field_str(d, "sid"), user, host, display, client, field_wall(d), address, project
    )


def session_from_snapshot(s: object) -> Session:
    if not isinstance(s, dict) or not isinstance(s.get("replies"), list):
        raise LedgerError("snapshot: a session must be a map with a 'replies' list")
    session = session_from(s)
    session.ack = field_int(s, "ack", 0)
    if "hold" in s:
        if s["hold"] not in HOLD_KINDS or not session.sid.startswith(HOLD_PREFIX):
            raise LedgerError(f"snapshot: session {session.sid} has a bad hold {s['hold']!r}")
        session.hold, session.until = s["hold"], field_wall(s, "until")
    if "idle_since" in s:
        session.idle_since = field_wall(s, "idle_since")
    session.taken = taken_from(s.get("taken", []), session.sid)
    for pair in s["replies"]:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], dict)):
            raise LedgerError(f"snapshot: session {session.sid} has a malformed reply")
        req = pair[0]
        if not isinstance(req, int) or isinstance(req, bool) or req < session.ack:
            raise LedgerError(f"snapshot: session {session.sid} records a bad req {req!r}")
        session.replies[req] = copy.deepcopy(pair[1])
    return session


TAKEN_KEPT = 64  # grants taken from a session that it remembers (Session.taken)
TAKE_REASONS = frozenset({"removed", "timeout"})


def taken_from(raw: object, sid: str) -> dict[int, str]:
    """A snapshot session's ``taken`` pairs; LedgerError when malformed."""
    if not isinstance(raw, list) or len(raw) > TAKEN_KEPT:
        raise LedgerError(f"snapshot: session {sid}: 'taken' must be a list of <= {TAKEN_KEPT}")
    out: dict[int, str] = {}
    for pair in raw:
        ok = isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], str)
        ok = ok and pair[1] in TAKE_REASONS
        if not ok or not isinstance(pair[0], int) or isinstance(pair[0], bool) or pair[0] < 1:
            raise LedgerError(f"snapshot: session {sid} records a bad taken grant {pair!r:.60}")
        out[pair[0]] = pair[1]
    return out


def field_str(d: dict[str, Any], name: str, *, empty: bool = False) -> str:
    value = d.get(name)
    if not isinstance(value, str) or not (empty or value):
        what = "a str" if empty else "a non-empty str"
        raise LedgerError(f"{d.get('k', 'record')}: field {name!r} must be {what}")
    return value


def field_int(d: dict[str, Any], name: str, low: int) -> int:
    value = d.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise LedgerError(f"{d.get('k', 'record')}: field {name!r} must be an int >= {low}")
    return value


def field_wall(d: dict[str, Any], name: str = "at") -> float:
    """A wall-time field (``at`` unless named): seconds that a date can be taken from."""
    at = d.get(name)
    if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
        raise LedgerError(f"{d.get('k', 'record')}: field {name!r} must be a finite number")
    try:
        day_of(at)
    except (OverflowError, OSError, ValueError):
        raise LedgerError(f"{d.get('k', 'record')}: {name!r} {at} is not a usable time") from None
    return float(at)


_DAY = 86_400.0
# (lo, hi, date): every wall time strictly between lo and hi falls on date (UTC)
_day_cache: tuple[float, float, datetime.date | None] = (math.inf, -math.inf, None)


def day_of(at: float) -> datetime.date:
    """The UTC date of wall time ``at``, as ``Now.date`` gives it; raises as it does.

    Every grant delta asks (on every node), so the date of the current day is kept:
    away from midnight by a second, floor division and ``fromtimestamp`` agree.
    """
    global _day_cache
    lo, hi, date = _day_cache
    if date is not None and lo < at < hi:
        return date
    exact = Now(mono=0.0, wall=at).date
    start = math.floor(at / _DAY) * _DAY
    _day_cache = (start + 1.0, start + _DAY - 1.0, Now(mono=0.0, wall=start + _DAY / 2).date)
    return exact


def _version(text: str, where: str) -> None:
    try:
        parse_version(text)
    except ValueError as exc:
        raise LedgerError(f"{where}: {exc}") from None
