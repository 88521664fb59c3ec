"""The figures of ``zbroker report``, from one pass over report records in log order.

``Report.add(record)`` takes each record once; memory grows with the features, the
users (hosts, projects, groups) named, the grants out at one time and the number of
time buckets, never with the number of records:

- Use over time is integrated exactly: between two events a feature's seats in use are
  constant, so the time-weighted average, the p95 (seconds spent at each level) and the
  time at 100 % ("out of licenses" windows) are sums over those intervals.
- The count: each interval is held against the count in force during it, its live lines'
  total on the day (a line counts through its ``expires`` date) as the last ``reread`` (or
  file header, or gap) before it set them; the first lines known hold for any time before
  them. An interval is cut where the count changes (a reread, a UTC midnight), so
  utilisation is seat-seconds over count-seconds (the time-weighted count), exact across
  a count lowered or raised, a feature added (count 0 before) or removed (0 after). A
  bucket in which the count changed holds its time-weighted count (``count_seconds``)
  for utilisation, and as its ``count`` the one in force at its end (within the window);
  ``total(name, t)`` is the count in force at ``t``. A reread checks the 100 % window
  at once: a count lowered to the seats in use is full from there. The lines of each
  reread are kept (memory grows with the rereads, not the records).
- Time buckets (for the table over time, the CSV and the charts) start at one second
  and widen along ``LADDER`` when more than ``MAX_BUCKETS`` would be needed; each width
  divides the next, so wider buckets are sums of narrower ones.
- Seat-hours by user, host, project or group are counted when seats return (an ``in``
  record carries ``since``) and, for grants still out, up to the end of the window.
  Per time bucket (the stacked chart) only the first ``STACK_KEYS`` keys of a bucket are
  told apart, the rest add up under ``OTHERS``.
- Queue waits go into a histogram of 5 % wide bins: p50 and p95 within 5 %.
- Lingering seats (LINGER) are in use until their ``linger`` record, and their time counts
  to the user who checked them in (as FlexNet charges it), and apart as linger hours;
  borrowed seats (BORROW) are in use from their ``borrow`` to their ``return`` record.
- Seats held while idle: from an ``idle`` record of a session to its ``busy`` record (or
  to each grant's return, or the end of the window), the seats its grants held, by
  feature and user. A session idle before the window's first record is not known idle.

Time: a record's ``at`` when it has one; records without (the checkins, denials,
expiries and rereads of logs written before their deltas carried ``at``:
docs/reportlog.md) take the last time seen before them, and ``estimated`` counts them
(not ``term`` records: an older log's no-op carries no time, and changes no figure).
Times never go back: a record earlier than the one before it (two primaries' clocks, or
a ``queued`` record, which says when its wait began) counts at the later time.

Pure: no I/O.
"""

from __future__ import annotations

import bisect
import datetime
import heapq
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from zbroker.broker.reportlog import Record

LADDER = (1, 5, 10, 60, 300, 600, 3600, 21600, 86400, 604800, 2419200)  # each divides the next
MAX_BUCKETS = 500
WAIT_BIN = math.log(1.05)
LONGEST = 10  # "out of licenses" windows kept (the longest)
BY = ("user", "host", "project", "group")
NO_GROUP = "(no group)"
UNKNOWN = "(not recorded)"
OTHERS = "(others)"
STACK_KEYS = 12
MAX_IDLE = 100_000  # idle sessions kept before those holding nothing are forgotten
DAY = 86400  # a line's expiry changes the count at a UTC midnight


class ReportSpanError(ValueError):
    """The records span more time than the widest time buckets can hold."""


@dataclass
class Bucket:
    seat_seconds: float = 0.0
    peak: int = 0
    denials: int = 0
    count_seconds: float = 0.0  # the count over the bucket's time: utilisation's denominator
    count: int | None = None  # the count in force at its end (None: no time observed yet)

    def utilisation(self) -> float | None:
        return self.seat_seconds / self.count_seconds if self.count_seconds > 0 else None


@dataclass(slots=True)
class _Out:
    """A grant out (or a seat lingering) whose time is not counted yet."""

    feature: str
    count: int
    since: float
    key: tuple[str, ...]
    sid: str
    user: str
    lingering: bool = False


@dataclass
class Feature:
    """One feature's figures (see the module docstring)."""

    name: str
    in_use: int = 0
    since: float | None = None  # when in_use took its value (None: no time seen yet)
    peak: int = 0
    peak_at: float | None = None
    seconds: float = 0.0  # time observed inside the window
    seat_seconds: float = 0.0
    count_seconds: float = 0.0  # the count in force, over the same time
    at_level: dict[int, float] = field(default_factory=dict)  # seconds at each level
    full_seconds: float = 0.0
    full_since: float | None = None  # an open window at 100 %
    full_windows: int = 0
    longest: list[tuple[float, float, float]] = field(default_factory=list)  # heap of windows
    checkouts: int = 0
    checkins: Counter[str] = field(default_factory=Counter)  # by reason
    denials: Counter[str] = field(default_factory=Counter)  # by reason
    denied_users: Counter[str] = field(default_factory=Counter)
    hours: dict[str, float] = field(default_factory=dict)  # seat-seconds by the --by key
    waits: Counter[int] = field(default_factory=Counter)  # histogram bin -> count
    waits_n: int = 0
    timeouts: int = 0
    queued: int = 0  # checkouts that waited in the queue (``queued`` records)
    borrows: int = 0
    returns: Counter[str] = field(default_factory=Counter)  # borrowed seats back, by reason
    linger_ends: Counter[str] = field(default_factory=Counter)  # lapsed, reclaimed
    linger_seconds: float = 0.0  # seat-seconds of lingering seats
    idle: dict[str, float] = field(default_factory=dict)  # seat-seconds held while idle, by user

    def average(self) -> float:
        return self.seat_seconds / self.seconds if self.seconds > 0 else float(self.in_use)

    def count_average(self) -> float | None:
        """The time-weighted count over the time observed (None: no time observed)."""
        return self.count_seconds / self.seconds if self.seconds > 0 else None

    def utilisation(self) -> float | None:
        """Seats in use against the count in force at the time (None: no count then)."""
        return self.seat_seconds / self.count_seconds if self.count_seconds > 0 else None

    def p95(self) -> int:
        return _quantile_levels(self.at_level, 0.95, self.in_use)

    def wait_quantile(self, q: float) -> float | None:
        if not self.waits_n:
            return None
        rank, seen = q * self.waits_n, 0
        for b in sorted(self.waits):
            seen += self.waits[b]
            if seen >= rank:
                return math.exp(b * WAIT_BIN)
        return None


def _quantile_levels(at_level: dict[int, float], q: float, default: int) -> int:
    total = sum(at_level.values())
    if total <= 0:
        return default
    seen = 0.0
    for level in sorted(at_level):
        seen += at_level[level]
        if seen >= q * total:
            return level
    return max(at_level)


class Report:
    """Everything ``zbroker report`` prints, fed one record at a time in log order.

    ``start``/``end``: the window (wall seconds; None: unbounded). ``features``: only
    these (None: all). ``by``: what hours are counted by. ``groups``: user -> the groups
    it belongs to (``by == "group"``).
    """

    def __init__(
        self,
        *,
        start: float | None = None,
        end: float | None = None,
        features: frozenset[str] | None = None,
        by: str = "user",
        groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        if by not in BY:
            raise ValueError(f"--by must be one of {', '.join(BY)}, not {by!r}")
        self.start = -math.inf if start is None else start
        self.end = math.inf if end is None else end
        self.only = features
        self.by = by
        self.groups = groups or {}
        self.features: dict[str, Feature] = {}
        self.lines: list[dict[str, Any]] = []  # in force now
        # Every set of lines and from when it held (the first from -inf): the count of a
        # time before the last reread is its era's. One entry a reread, not a record.
        self._eras: list[list[dict[str, Any]]] = []
        self._era_at: list[float] = []
        self._totals: dict[tuple[int, str, int], int] = {}  # (era, feature, UTC day) -> count
        self.clock: float | None = None  # the last time seen
        self.first_at: float | None = None
        self.records = 0
        self.estimated = 0  # records that carried no time of their own
        self.terms = 0
        self.rereads = 0
        self.unknown: Counter[str] = Counter()
        self.bucket = LADDER[0]
        self.buckets: dict[int, dict[str, Bucket]] = {}  # bucket start // width -> feature
        self._lo_t, self._hi_t = math.inf, -math.inf  # the times the buckets cover
        # Seat-seconds per bucket by the --by key, all features together (the stacked
        # chart): at most STACK_KEYS keys a bucket, the rest under OTHERS, so that a site
        # of 10,000 users costs no more than one of ten.
        self.stack: dict[int, dict[str, float]] = {}
        self._open: dict[int, _Out] = {}  # grants out, by id
        self._idle: dict[str, float] = {}  # sessions marked idle: since when
        self._grants_of: dict[str, set[int]] = {}  # session -> its grants in _open
        self.primaries: Counter[str] = Counter()  # terms begun, by the primary named
        self.denied_users: Counter[str] = Counter()
        self.denials: Counter[str] = Counter()

    # --- feeding ------------------------------------------------------------------

    def header(self, record: Record) -> None:
        """A file header or gap: the entitlements and seats in use at that point."""
        lines = record.get("lines")
        if isinstance(lines, list) and lines:
            self._set_lines(lines, self.clock)
        for name, n in (record.get("in_use") or {}).items():
            if self._wanted(name) and isinstance(n, int):
                self._move(self._feature(name), n, self.clock)

    def add(self, record: Record) -> None:
        """One record; records come in log order (index, n)."""
        self.records += 1
        at = record.get("at")
        if isinstance(at, int | float) and math.isfinite(at):
            t = float(at) if self.clock is None else max(self.clock, float(at))
            if self.first_at is None:
                self.first_at = t
                for f in self.features.values():  # what headers said holds from here
                    f.since = t
            self.clock = t
        elif record.get("ev") != "term":  # a term's time changes no figure
            self.estimated += 1
        t_now = self.clock
        ev = record.get("ev")
        if ev == "out" or ev == "borrow":
            self._out(record, t_now)
        elif ev == "in" or ev == "linger" or ev == "return":
            self._in(record, t_now)
        elif ev == "deny":
            self._deny(record, t_now)
        elif ev == "dequeued":
            self._dequeued(record, t_now)
        elif ev == "queued":
            name = str(record.get("feature", UNKNOWN))
            if self._inside(t_now) and (self._wanted(name) or name == UNKNOWN):
                self._feature(name).queued += 1
        elif ev == "idle" or ev == "busy":
            self._idleness(record, ev == "idle", t_now)
        elif ev == "reread":
            self.rereads += 1
            self._set_lines(record.get("lines") or [], t_now)
        elif ev == "term":
            self.terms += 1
            if record.get("primary"):
                self.primaries[str(record["primary"])] += 1
        elif ev in ("file", "gap"):
            self.header(record)
        else:
            self.unknown[str(record.get("k", ev))] += 1

    def _wanted(self, feature: str) -> bool:
        return self.only is None or feature in self.only

    def _inside(self, t: float | None) -> bool:
        return t is not None and self.start <= t <= self.end

    def _key(self, record: Record) -> tuple[str, ...]:
        if self.by == "group":
            return tuple(self.groups.get(str(record.get("user")), ())) or (NO_GROUP,)
        value = record.get(self.by)
        return (str(value) if value else UNKNOWN,)

    def _out(self, r: Record, t: float | None) -> None:
        name = str(r["feature"])
        if not self._wanted(name):
            return
        f = self._feature(name)
        if self._inside(t):
            if r["ev"] == "borrow":
                f.borrows += 1
            else:
                f.checkouts += 1
        since = float(r["at"]) if isinstance(r.get("at"), int | float) else t
        if since is not None:
            sid = "" if r["ev"] == "borrow" else str(r.get("sid"))  # a borrow is never idle
            out = _Out(name, int(r["count"]), since, self._key(r), sid, str(r.get("user")))
            self._opened(int(r["grant"]), out)
        self._move(f, int(r["in_use"]), t)

    def _in(self, r: Record, t: float | None) -> None:
        """An ``in``, or the end of a lingering seat (``linger``) or a borrowed one."""
        name = str(r["feature"])
        if not self._wanted(name):
            return
        f = self._feature(name)
        ev, gid, count = r["ev"], int(r["grant"]), int(r["count"])
        opened = self._closed(gid, t)
        if self._inside(t):
            reason = str(r.get("reason"))
            if ev == "linger":
                f.linger_ends[reason] += 1
            elif ev == "return":
                f.returns[reason] += 1
            else:
                f.checkins[reason] += 1
            if reason == "timeout":
                f.timeouts += 1
        since = r.get("since")
        if t is not None and isinstance(since, int | float):
            key = opened.key if opened is not None else self._key(r)
            self._held(f, key, count, float(since), t)
            if ev == "linger":
                f.linger_seconds += count * self._clip(float(since), t)
        if ev == "in" and t is not None and isinstance(r.get("linger"), int | float):
            # the seat stays in use, lingering, until its ``linger`` record
            key = opened.key if opened is not None else self._key(r)
            self._opened(gid, _Out(name, count, t, key, "", str(r.get("user")), lingering=True))
        self._move(f, int(r["in_use"]), t)

    def _clip(self, lo: float, hi: float) -> float:
        """Seconds of [lo, hi] inside the window."""
        return max(0.0, min(hi, self.end) - max(lo, self.start))

    def _opened(self, gid: int, out: _Out) -> None:
        self._open[gid] = out
        if out.sid:
            self._grants_of.setdefault(out.sid, set()).add(gid)

    def _closed(self, gid: int, t: float | None) -> _Out | None:
        """The grant is no longer out: the time its idle session held it counts."""
        out = self._open.pop(gid, None)
        if out is None or not out.sid:
            return out
        grants = self._grants_of.get(out.sid)
        if grants is not None:
            grants.discard(gid)
            if not grants:
                del self._grants_of[out.sid]
        idle_since = self._idle.get(out.sid)
        if idle_since is not None and t is not None:
            self._idle_held(out, idle_since, t)
        return out

    def _idle_held(self, out: _Out, idle_since: float, t: float) -> None:
        seconds = self._clip(max(idle_since, out.since), t)
        if seconds > 0 and self._wanted(out.feature):
            _add(self._feature(out.feature).idle, out.user, out.count * seconds)

    def _idleness(self, r: Record, idle: bool, t: float | None) -> None:
        sid = str(r.get("sid"))
        if t is None:
            return
        if idle:
            self._idle.setdefault(sid, t)
            if len(self._idle) > MAX_IDLE:  # sessions that ended idle and held nothing
                for gone in [s for s in self._idle if s not in self._grants_of]:
                    del self._idle[gone]
            return
        since = self._idle.pop(sid, None)
        if since is not None:
            for gid in self._grants_of.get(sid, ()):
                self._idle_held(self._open[gid], since, t)

    def _held(self, f: Feature, key: tuple[str, ...], count: int, since: float, t: float) -> None:
        lo, hi = max(since, self.start), min(t, self.end)
        if hi <= lo:
            return
        for k in key:
            _add(f.hours, k, count * (hi - lo))

        self._cover(lo, hi)
        width = self.bucket
        for b in range(int(lo // width), int(hi // width) + 1):
            seconds = min(hi, (b + 1) * width) - max(lo, b * width)
            if seconds > 0:
                row = self.stack.setdefault(b, {})
                for k in key:
                    _add(row, k if k in row or len(row) < STACK_KEYS else OTHERS, count * seconds)

    def _deny(self, r: Record, t: float | None) -> None:
        name = str(r.get("feature", UNKNOWN))
        if not self._wanted(name) and name != UNKNOWN:
            return
        if not self._inside(t):
            return
        f = self._feature(name)
        reason, user = str(r.get("reason")), str(r.get("user"))
        f.denials[reason] += 1
        f.denied_users[user] += 1
        self.denials[reason] += 1
        self.denied_users[user] += 1
        assert t is not None  # _inside
        self._cover(t, t)
        self._bucket_of(t, name).denials += 1

    def _dequeued(self, r: Record, t: float | None) -> None:
        name = str(r.get("feature", UNKNOWN))
        waited = r.get("waited")
        if not self._inside(t) or not isinstance(waited, int | float) or waited <= 0:
            return
        if not self._wanted(name) and name != UNKNOWN:
            return
        f = self._feature(name)
        f.waits[round(math.log(waited) / WAIT_BIN)] += 1
        f.waits_n += 1

    # --- use over time --------------------------------------------------------------

    def _feature(self, name: str) -> Feature:
        f = self.features.get(name)
        if f is None:
            f = self.features[name] = Feature(name, since=self.clock)
        return f

    def total(self, name: str, t: float | None) -> int:
        """The feature's count in force at ``t``: its lines of then, not expired on that
        day (None: the lines in force now, expiry ignored)."""
        era = len(self._eras) - 1 if t is None else max(0, bisect.bisect_right(self._era_at, t) - 1)
        day_no = -1 if t is None else int(t // DAY)
        got = self._totals.get((era, name, day_no))
        if got is None:
            day = _day(t) if t is not None else ""
            got = sum(
                int(line.get("count") or 0)
                for line in (self._eras[era] if self._eras else ())
                if line.get("feature") == name
                and (not day or line.get("expires") is None or str(line["expires"]) >= day)
            )
            if len(self._totals) > 10_000:
                self._totals.clear()
            self._totals[(era, name, day_no)] = got
        return got

    def _counts(self, name: str, lo: float, hi: float) -> list[tuple[float, float, int]]:
        """[lo, hi] cut where the feature's count changes (a reread; a UTC midnight, when
        a line may expire), each piece with the count in force during it."""
        if lo // DAY == hi // DAY and (not self._era_at or self._era_at[-1] <= lo):
            return [(lo, hi, self.total(name, lo))]  # the usual case: one day, one era
        pieces: list[tuple[float, float, int]] = []
        while lo < hi:
            cut = min(hi, (lo // DAY + 1) * DAY)
            later = bisect.bisect_right(self._era_at, lo)
            if later < len(self._era_at):
                cut = min(cut, self._era_at[later])
            count = self.total(name, lo)
            if pieces and pieces[-1][2] == count:
                pieces[-1] = (pieces[-1][0], cut, count)
            else:
                pieces.append((lo, cut, count))
            lo = cut
        return pieces

    def _set_lines(self, lines: list[dict[str, Any]], t: float | None) -> None:
        """The lines in force from ``t`` on (None: from before the first record)."""
        new = [line for line in lines if isinstance(line, dict)]
        if self._eras and new == self._eras[-1]:
            return  # a file header saying again what holds
        at = -math.inf if t is None else t
        if self._era_at and self._era_at[-1] >= at:  # the same moment: the later lines hold
            self._eras[-1] = new
        else:
            self._eras.append(new)
            self._era_at.append(at)
        self.lines = new
        self._totals.clear()
        for line in self.lines:  # a feature nobody used is still in the report
            name = str(line.get("feature"))
            if self._wanted(name):
                self._feature(name)
        for f in self.features.values():  # the time so far counts against the old count,
            self._move(f, f.in_use, t)  # and a count lowered to the seats in use is full

    def _move(self, f: Feature, in_use: int, t: float | None) -> None:
        """The feature's seats in use become ``in_use`` at ``t``."""
        self._advance(f, t)
        f.in_use = in_use
        if self._inside(t) and t is not None:
            if in_use > f.peak:
                f.peak, f.peak_at = in_use, t
            self._cover(t, t)
            b = self._bucket_of(t, f.name)
            b.peak = max(b.peak, in_use)
        total = self.total(f.name, t)
        full = total > 0 and in_use >= total
        if full and f.full_since is None and t is not None:
            f.full_since = t
        elif not full and f.full_since is not None and t is not None:
            self._close_window(f, t)

    def _advance(self, f: Feature, t: float | None) -> None:
        """Count the time from ``f.since`` to ``t`` at the level it held."""
        if t is None:
            return
        if f.since is None:
            f.since = t
            return
        lo, hi = max(f.since, self.start), min(t, self.end)
        f.since = t
        if hi <= lo:
            return
        span = hi - lo
        if f.in_use > f.peak:  # a level held into the window is in use in it: from its start
            f.peak, f.peak_at = f.in_use, lo
        f.seconds += span
        f.seat_seconds += f.in_use * span
        f.at_level[f.in_use] = f.at_level.get(f.in_use, 0.0) + span
        level = f.in_use
        for a, b, count in self._counts(f.name, lo, hi):
            f.count_seconds += count * (b - a)
            self._spread(f.name, a, b, _filler(level, count))

    def _close_window(self, f: Feature, t: float) -> None:
        start = f.full_since
        f.full_since = None
        if start is None:
            return
        lo, hi = max(start, self.start), min(t, self.end)
        if hi <= lo:
            return
        f.full_seconds += hi - lo
        f.full_windows += 1
        heapq.heappush(f.longest, (hi - lo, lo, hi))
        if len(f.longest) > LONGEST:
            heapq.heappop(f.longest)

    def _bucket_of(self, t: float, name: str) -> Bucket:
        row = self.buckets.setdefault(int(t // self.bucket), {})
        b = row.get(name)
        if b is None:
            b = row[name] = Bucket()
        return b

    def _spread(
        self, name: str, lo: float, hi: float, add: Callable[[Bucket, float], None]
    ) -> None:
        """Give each bucket between ``lo`` and ``hi`` its share."""
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return
        self._cover(lo, hi)
        width = self.bucket
        for k in range(int(lo // width), int(hi // width) + 1):
            s = min(hi, (k + 1) * width) - max(lo, k * width)
            if s > 0:
                add(self._bucket_of(k * width, name), s)

    def _cover(self, lo: float, hi: float) -> None:
        """Widen the buckets until the ones seen so far and [lo, hi] fit in MAX_BUCKETS."""
        self._lo_t = min(self._lo_t, lo)
        self._hi_t = max(self._hi_t, hi)
        while int(self._hi_t // self.bucket) - int(self._lo_t // self.bucket) >= MAX_BUCKETS:
            self._widen()

    def _widen(self) -> None:
        i = LADDER.index(self.bucket)
        if i + 1 >= len(LADDER):
            years = MAX_BUCKETS * LADDER[-1] / (365 * DAY)
            raise ReportSpanError(
                f"the records span more than {years:.0f} years, more than the report's time "
                "buckets hold: a wrong time in the log, or give a shorter --from/--to window"
            )
        old, self.bucket = self.bucket, LADDER[i + 1]
        merged: dict[int, dict[str, Bucket]] = {}
        for k, row in sorted(self.buckets.items()):  # in time order: the last count holds
            into = merged.setdefault(k * old // self.bucket, {})
            for name, b in row.items():
                m = into.setdefault(name, Bucket())
                m.seat_seconds += b.seat_seconds
                m.peak = max(m.peak, b.peak)
                m.denials += b.denials
                m.count_seconds += b.count_seconds
                if b.count is not None:
                    m.count = b.count
        self.buckets = merged
        stack: dict[int, dict[str, float]] = {}
        for k, shares in self.stack.items():
            into_shares = stack.setdefault(k * old // self.bucket, {})
            for who, v in shares.items():
                _add(into_shares, who, v)
        self.stack = {k: _capped(shares) for k, shares in stack.items()}

    # --- the end ----------------------------------------------------------------------

    def finish(self) -> None:
        """Close the window at its end (or the last time seen): grants still out count
        up to there, and an open window at 100 % closes."""
        t = self.clock if self.end == math.inf else self.end
        if t is None:
            return
        for out in self._open.values():
            if self._wanted(out.feature):
                f = self._feature(out.feature)
                self._held(f, out.key, out.count, out.since, t)
                if out.lingering:
                    f.linger_seconds += out.count * self._clip(out.since, t)
                idle_since = self._idle.get(out.sid)
                if idle_since is not None:
                    self._idle_held(out, idle_since, t)
        self._open.clear()
        self._grants_of.clear()
        self._idle.clear()
        for f in self.features.values():
            self._advance(f, t)
            if f.full_since is not None:
                self._close_window(f, t)
                f.full_since = None

    def outside_log(self) -> bool:
        """The window (given with --from or --to) holds no record of the log: it ends before
        the first record's time or starts after the last one's; or no record has a time."""
        if self.start == -math.inf and self.end == math.inf:
            return False
        if self.first_at is None or self.clock is None:
            return True
        return self.end < self.first_at or self.start > self.clock

    def window(self) -> tuple[float | None, float | None]:
        lo = self.first_at if self.start == -math.inf else self.start
        hi = self.clock if self.end == math.inf else self.end
        return lo, hi


def _capped(shares: dict[str, float]) -> dict[str, float]:
    if len(shares) <= STACK_KEYS:
        return shares
    ranked = sorted(shares.items(), key=lambda kv: (kv[0] == OTHERS, -kv[1]))
    kept = dict(ranked[: STACK_KEYS - 1])
    kept[OTHERS] = sum(v for _, v in ranked[STACK_KEYS - 1 :])
    return kept


def _add(d: dict[str, float], key: str, value: float) -> None:
    d[key] = d.get(key, 0.0) + value


def _filler(level: int, count: int) -> Callable[[Bucket, float], None]:
    """What a bucket gets for its seconds of an interval at ``level`` and ``count``."""

    def fill(b: Bucket, seconds: float) -> None:
        b.seat_seconds += level * seconds
        b.peak = max(b.peak, level)
        b.count_seconds += count * seconds
        b.count = count  # intervals come in time order: the last is the bucket's end

    return fill


def _day(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, tz=datetime.UTC).date().isoformat()
