"""What an options file decides: who may check out what, and how many.

Pure decisions over a parsed ``zbroker.broker.options.Options``, with no clock and no state
of their own: the ledger asks them on the primary with what it holds (the principals
holding seats of a feature) and records what it decided in its deltas.

Principal. A request is judged by its session's ``Principal``: user, host, display,
the client's IP address (the node sees it) and its project (the library sends
``ZBROKER_PROJECT``, as FlexNet's ``LM_PROJECT``). A line's principal matches as
FlexNet says: USER, DISPLAY and PROJECT by equal name; HOST by host name, or by the
address when the line's name is an IP pattern (``*`` matches within one part);
INTERNET by the address; GROUP by the user's membership, HOST_GROUP by the host's
(or address's) membership; ``GROUPCASEINSENSITIVE ON`` compares group members without
case.

Scope. A line names a feature and, with ``:VERSION=v``, one pool of it (the pool of
version v as ``zbroker.broker.seats`` groups lines); without it every pool of the feature.
The ``...ALL`` lines cover every feature.

Rules, in the order the ledger asks them (each has its reason in the protocol):

1. ``admits``: EXCLUDE/EXCLUDEALL first, then the include list (INCLUDE and
   INCLUDEALL lines together): with a list only those on it may check out, without
   one everyone may (FlexNet's "Rules of Precedence in Options Files"). Reasons
   ``excluded`` and ``not_included``.
2. ``room``: how many seats of one pool a principal may take now, and what holds it
   below the pool's free seats:

   - MAX caps what the line's principal holds of its scope (a GROUP's total, a HOST's
     total, ...). ``USER ALL_USERS`` caps each user and ``GROUP ALL_GROUPS`` each
     defined group, except a user or group that a MAX line of the same scope names
     itself: that line is its cap (FlexNet asks for the named line to come first in
     the file; here the order does not matter). Reason ``max_reached``.
   - RESERVE keeps seats of each pool in its scope for its principal (with several
     pools, each pool keeps the count, as FlexNet does). When a pool's reservations
     add up to more than its total, they are honoured in file order up to the total.
     Seats held by a reservation's principals fill it; a holder on several
     reservations fills them in whatever way fills the most (a maximum flow), so
     that no order of checkouts can leave a reservation's principal without its seat
     while its reserved seats sit idle. Others see unfilled reserved seats as taken.
     Reason ``reserved``.
3. ``timeout`` and ``linger``: seconds of a pool's idle timeout (TIMEOUT, else
   TIMEOUTALL, raised to ``min_timeout``) and of its linger (LINGER), or None. Of
   several lines the last in the file wins, a line with ``:VERSION=`` over one
   without.

Cost. ``admits`` looks at the lines of one feature. ``room`` returns at once when no
MAX or RESERVE line covers the pool (``counts`` tells the ledger it need not gather
holders at all); otherwise it reads each holding of the feature once per covering
line and solves a flow over the distinct sets of reservations the holders match
(a handful of nodes in practice): O(holdings x lines) plus a small flow.
"""

from __future__ import annotations

import datetime
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from zbroker.broker.model import Reason
from zbroker.broker.options import ALL_GROUPS, ALL_USERS, OptionLine, Options
from zbroker.broker.seats import Catalog, Choice, Denial, PoolKey, choose
from zbroker.clients.protocol import parse_version

__all__ = [
    "DEFAULT_MIN_TIMEOUT",
    "Holding",
    "Policy",
    "Principal",
    "Refusal",
    "Room",
    "choose_under",
]

Version = tuple[int, ...]
DEFAULT_MIN_TIMEOUT = 900.0  # seconds: FlexNet's common vendor floor (Autodesk's is 900)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who asks: what a session says of itself, and the address the node saw."""

    user: str
    host: str
    display: str = ""
    address: str = ""
    project: str = ""


# One grant as the policy counts it: who holds it, the pool's version, and its seats.
Holding = tuple[Principal, Version, int]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A denial of the options file: its protocol reason and a sentence for a person."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Room:
    """The seats a principal may take from one pool now (never more than are free), and
    the refusal that holds it below the free seats (None when nothing does)."""

    seats: int
    refusal: Refusal | None = None


@lru_cache(maxsize=4096)
def _ip_regex(pattern: str) -> re.Pattern[str] | None:
    """An IP pattern (``10.1.*.*``) as a regex; None when ``pattern`` is no IP pattern."""
    if not re.fullmatch(r"[0-9A-Fa-f:.*]*[0-9*][0-9A-Fa-f:.*]*", pattern):
        return None
    if not ("." in pattern or ":" in pattern or pattern == "*"):
        return None  # a bare word of hex digits is a host name ("cafe"), not an address
    parts = [re.escape(p) for p in pattern.split("*")]
    return re.compile("[0-9A-Fa-f]*".join(parts), re.IGNORECASE)


def _ip_match(pattern: str, address: str) -> bool:
    rx = _ip_regex(pattern)
    return rx is not None and bool(address) and rx.fullmatch(address) is not None


class Policy:
    """The decisions of one ``Options`` (see the module docstring)."""

    def __init__(self, options: Options, *, min_timeout: float = DEFAULT_MIN_TIMEOUT) -> None:
        if not min_timeout >= 0:
            raise ValueError(f"min_timeout must be >= 0 seconds, not {min_timeout!r}")
        self.options = options
        self.min_timeout = min_timeout
        fold = self._fold = str.casefold if options.case_insensitive else _same
        self._groups = {name: frozenset(map(fold, m)) for name, m in options.groups}
        self._host_groups = {name: frozenset(map(fold, m)) for name, m in options.host_groups}
        # (name, IP patterns) of host groups that hold any: matched against the address
        self._host_group_ips = {
            name: tuple(p for p in m if _ip_regex(p) is not None) for name, m in options.host_groups
        }
        # Lines by (feature, keyword), in file order: a checkout reads only its feature's.
        self._by_feature: dict[tuple[str, str], list[OptionLine]] = {}
        self._all: dict[str, list[OptionLine]] = {}  # INCLUDEALL, EXCLUDEALL, TIMEOUTALL
        for ln in options.lines:
            if ln.feature is None:
                self._all.setdefault(ln.keyword, []).append(ln)
            else:
                self._by_feature.setdefault((ln.feature, ln.keyword), []).append(ln)
        self._counting = {f for f, keyword in self._by_feature if keyword in _COUNTS}

    # ------------------------------------------------------------ matching

    def matches(self, ln: OptionLine, who: Principal) -> bool:
        """True when the principal of ``ln`` names ``who`` (ALL_USERS/ALL_GROUPS: see room)."""
        kind, name = ln.kind, ln.name
        if name is None:
            return False
        if kind == "USER":
            return who.user == name
        if kind == "HOST":
            return who.host == name or _ip_match(name, who.address)
        if kind == "DISPLAY":
            return who.display == name
        if kind == "INTERNET":
            return _ip_match(name, who.address)
        if kind == "PROJECT":
            return who.project == name
        if kind == "GROUP":
            return self._fold(who.user) in self._groups.get(name, ())
        if kind == "HOST_GROUP":
            if self._fold(who.host) in self._host_groups.get(name, ()):
                return True
            return any(_ip_match(p, who.address) for p in self._host_group_ips.get(name, ()))
        return False

    def _lines(self, feature: str, version: Version, keyword: str) -> list[OptionLine]:
        """The lines of ``keyword`` whose scope covers the pool (feature, version)."""
        return [ln for ln in self._by_feature.get((feature, keyword), ()) if _covers(ln, version)]

    def lines_of(self, feature: str, version: Version, keyword: str) -> list[OptionLine]:
        """``_lines`` for the rules kept elsewhere (broker/borrow.py): file order."""
        return self._lines(feature, version, keyword)

    # ------------------------------------------------------------ 1. admission

    def admits(self, who: Principal, feature: str, version: Version) -> Refusal | None:
        """None when ``who`` may use the pool (feature, version); else why not."""
        path = self.options.path
        excludes = self._lines(feature, version, "EXCLUDE") + self._all.get("EXCLUDEALL", [])
        for ln in excludes:
            if self.matches(ln, who):
                return Refusal(
                    Reason.EXCLUDED,
                    f"{_describe(who, ln)} may not use {feature}: {ln.where(path)}",
                )
        includes = self._lines(feature, version, "INCLUDE") + self._all.get("INCLUDEALL", [])
        if includes and not any(self.matches(ln, who) for ln in includes):
            return Refusal(
                Reason.NOT_INCLUDED,
                f"user {who.user!r:.80} on host {who.host!r:.80} is not on the INCLUDE list "
                f"of {feature} ({path} {line_numbers(includes)})",
            )
        return None

    # ------------------------------------------------------------ 2. counts

    def counts(self, feature: str) -> bool:
        """True when a MAX or RESERVE line names ``feature``: ``room`` needs its holdings."""
        return feature in self._counting

    def room(
        self,
        who: Principal,
        feature: str,
        version: Version,
        total: int,
        used: int,
        holdings: Sequence[Holding],
    ) -> Room:
        """The seats ``who`` may take from the pool (feature, version) now.

        ``total`` is the pool's seats today and ``used`` its seats held; ``holdings``
        every grant of the feature (all its pools: a MAX without VERSION= counts them
        all), one ``(principal, version, seats)`` each. Unneeded (may be empty) when
        ``counts(feature)`` is False.
        """
        free = max(0, total - used)
        if feature not in self._counting:
            return Room(free)
        capped = self._max_room(who, feature, version, holdings)
        kept = self._reserve_room(who, feature, version, total, holdings)
        seats = min(free, capped[0], kept[0])
        if seats >= free:
            return Room(free)
        if capped[0] <= kept[0]:
            return Room(seats, capped[1])
        detail = (
            f"{free - seats} of the {free} free seats of {feature} are reserved for others: "
            f"{kept[1].detail if kept[1] is not None else ''}"
        )
        return Room(seats, Refusal(Reason.RESERVED, detail))

    def most(self, who: Principal, feature: str, version: Version, total: int) -> Room:
        """The most seats ``who`` could ever take at once from the pool (feature, version)
        of ``total`` seats, whatever is released: its ``room`` with nothing of the feature
        held, since holdings only ever take room away (a MAX counts them, a RESERVE
        fills with them or keeps seats from them). The refusal names the lines that keep
        it below ``total`` (None: none do)."""
        if feature not in self._counting:
            return Room(total)
        capped = self._max_room(who, feature, version, (), ever=True)
        kept = self._reserve_room(who, feature, version, total, ())
        seats = min(total, capped[0], kept[0])
        if seats >= total:
            return Room(total)
        if capped[0] <= kept[0]:
            return Room(seats, capped[1])
        lines = kept[1].detail if kept[1] is not None else ""
        detail = f"{total - seats} of its {total} seats are reserved for others ({lines})"
        return Room(seats, Refusal(Reason.RESERVED, detail))

    def _max_room(
        self,
        who: Principal,
        feature: str,
        version: Version,
        holdings: Sequence[Holding],
        ever: bool = False,
    ) -> tuple[int, Refusal | None]:
        """``ever``: the detail says what the cap is, not what is held (``most``)."""
        lines = self._lines(feature, version, "MAX")
        if not lines:
            return _UNLIMITED
        path = self.options.path
        named_users = {(ln.version, ln.name) for ln in lines if ln.kind == "USER"}
        named_groups = {(ln.version, ln.name) for ln in lines if ln.kind == "GROUP"}
        best: tuple[int, Refusal | None] = _UNLIMITED
        for ln in lines:
            cap = ln.number or 0
            # The principals this line caps, as lines of their own
            if ln.kind == "USER" and ln.name == ALL_USERS:
                if (ln.version, who.user) in named_users:
                    continue  # a line names this user: that one is the cap
                targets = [_with(ln, "USER", who.user)]
            elif ln.kind == "GROUP" and ln.name == ALL_GROUPS:
                targets = [
                    _with(ln, "GROUP", g)
                    for g in self._groups
                    if (ln.version, g) not in named_groups
                    and self._fold(who.user) in self._groups[g]
                ]
            elif self.matches(ln, who):
                targets = [ln]
            else:
                continue
            for target in targets:
                held = sum(
                    n
                    for p, v, n in holdings
                    if (ln.version is None or v == _version(ln.version)) and self.matches(target, p)
                )
                left = max(0, cap - held)
                if left < best[0]:
                    whose = f"{target.kind} {target.name}".lower().replace("_", " ")
                    detail = f"{whose} holds {held} of {feature}, the most {ln.where(path)} allows"
                    if ever:
                        detail = f"{whose} may hold at most {cap} of {feature}: {ln.where(path)}"
                    best = (left, Refusal(Reason.MAX_REACHED, detail))
        return best

    def _reserve_room(
        self,
        who: Principal,
        feature: str,
        version: Version,
        total: int,
        holdings: Sequence[Holding],
    ) -> tuple[int, Refusal | None]:
        kept = self._kept(feature, version, total)
        if not kept:
            return _UNLIMITED
        reserved = sum(n for _, n in kept)
        supply, held = self._supply(kept, version, holdings)
        mine = tuple(i for i, (ln, _) in enumerate(kept) if self.matches(ln, who))
        flow = _Flow([n for _, n in kept])
        for sig, n in supply.items():
            flow.add(sig, n)
        filled = flow.run()
        outside = held - filled  # seats held by no reservation's principal
        slack = total - reserved  # seats no reservation keeps
        extra = 0
        if mine:
            flow.add(mine, total)
            extra = flow.run()
        room = extra + max(0, slack - outside)
        named = ", ".join(ln.where(self.options.path) for ln, _ in kept[:3])
        named += ", ..." if len(kept) > 3 else ""
        return room, Refusal(Reason.RESERVED, named)

    def _kept(self, feature: str, version: Version, total: int) -> list[tuple[OptionLine, int]]:
        """The RESERVE lines covering the pool that keep seats of it, and how many each
        keeps: in file order, up to the pool's ``total``."""
        kept: list[tuple[OptionLine, int]] = []
        left = total
        for ln in self._lines(feature, version, "RESERVE"):
            n = min(ln.number or 0, left)
            if n > 0:
                kept.append((ln, n))
                left -= n
        return kept

    def _supply(
        self, kept: list[tuple[OptionLine, int]], version: Version, holdings: Sequence[Holding]
    ) -> tuple[dict[tuple[int, ...], int], int]:
        """Seats held in the pool by the set of reservations their holders match, and
        all seats held in the pool."""
        supply: dict[tuple[int, ...], int] = {}
        held = 0
        for p, v, n in holdings:
            if v != version:
                continue
            held += n
            sig = tuple(i for i, (ln, _) in enumerate(kept) if self.matches(ln, p))
            if sig:
                supply[sig] = supply.get(sig, 0) + n
        return supply, held

    def reserved(
        self, feature: str, version: Version, total: int, holdings: Sequence[Holding]
    ) -> list[tuple[OptionLine, int, int]]:
        """Each RESERVE line that keeps seats of the pool (feature, version) now: the line,
        the seats it keeps, and how many of them its principals fill (the maximum flow
        ``room`` decides by, so status shows what checkouts are refused by). For status
        and metrics; ``holdings`` as for ``room``."""
        kept = self._kept(feature, version, total)
        if not kept:
            return []
        flow = _Flow([n for _, n in kept])
        for sig, n in self._supply(kept, version, holdings)[0].items():
            flow.add(sig, n)
        flow.run()
        return [(ln, n, n - flow.left(i)) for i, (ln, n) in enumerate(kept)]

    # ------------------------------------------------------------ 3. timeouts

    def timeout(self, feature: str, version: Version) -> float | None:
        """Seconds a grant of the pool may sit idle before it is checked in, or None."""
        ln = self._last(self._lines(feature, version, "TIMEOUT")) or self._last(
            self._all.get("TIMEOUTALL", [])
        )
        return None if ln is None else max(float(ln.number or 0), self.min_timeout)

    def linger(self, feature: str, version: Version) -> float | None:
        """Seconds a checked-in grant of the pool stays in use, or None."""
        ln = self._last(self._lines(feature, version, "LINGER"))
        return None if ln is None else float(ln.number or 0)

    @staticmethod
    def _last(lines: list[OptionLine]) -> OptionLine | None:
        if not lines:
            return None
        qualified = [ln for ln in lines if ln.version is not None]
        return (qualified or lines)[-1]


# ---------------------------------------------------------------- the checkout


def choose_under(
    policy: Policy | None,
    catalog: Catalog,
    feature: str,
    version: str | None,
    count: int,
    who: Principal,
    day: datetime.date,
    used: Callable[[PoolKey], int],
    holdings: Callable[[], Sequence[Holding]],
) -> Choice | Denial:
    """``seats.choose`` under the options file: the checkout decision the ledger asks.

    The license decides first, as without options (no such feature, version, expiry,
    USERS=/HOSTS=, a count no pool could hold); then a pool serves only whom the policy
    admits and only the seats ``room`` leaves it. When no pool can serve, the denial
    says why: the admission refusal when every pool refused admission (EXCLUDE before
    INCLUDE); else, when no release could ever make room for ``count`` (``Policy.most``
    of every pool it may use), the rule that stands in its way, not busy; else
    ``reserved`` (busy: it may wait) when reservations held a pool back, else
    ``max_reached``, else the license's own busy ``no_seats``. ``holdings`` (every
    grant of the feature) is asked at most once, and only when a MAX or RESERVE line
    names the feature.
    """
    if policy is None:
        return choose(catalog, feature, version, count, who.user, who.host, day, used)
    refusals: dict[PoolKey, Refusal] = {}
    asked: set[PoolKey] = set()
    held: list[Sequence[Holding]] = []

    def room_used(key: PoolKey) -> int:
        # As many seats "used" as leave exactly the room the policy gives.
        asked.add(key)
        base = used(key)
        pool = catalog.pool(key[0], key[1])
        total = 0 if pool is None else pool.total(day)
        refusal = policy.admits(who, key[0], key[1])
        if refusal is not None:
            refusals[key] = refusal
            return max(base, total)
        if not policy.counts(key[0]):
            return base
        if not held:
            held.append(holdings())
        room = policy.room(who, key[0], key[1], total, base, held[0])
        if room.refusal is not None:
            refusals[key] = room.refusal
        return total - room.seats

    choice = choose(catalog, feature, version, count, who.user, who.host, day, room_used)
    if isinstance(choice, Choice) or not choice.busy:
        return choice
    admission = [r for r in refusals.values() if r.reason in _ADMISSION]
    if refusals and len(admission) == len(asked):
        first = min(admission, key=lambda r: r.reason != Reason.EXCLUDED)
        return Denial(first.reason, first.detail)
    # Busy means "a release may serve it": a count no release can ever make room for
    # would hold a queue place (and the client) to its deadline for nothing.
    open_to = [k for k in sorted(asked) if k not in refusals or refusals[k] not in admission]
    never = _never(policy, catalog, feature, count, who, day, open_to)
    if never is not None:
        return never
    if not refusals:
        return choice
    for reason in (Reason.RESERVED, Reason.MAX_REACHED):
        found = [r for r in refusals.values() if r.reason == reason]
        if found:
            return Denial(reason, found[0].detail, busy=reason == Reason.RESERVED)
    return choice


def _never(
    policy: Policy,
    catalog: Catalog,
    feature: str,
    count: int,
    who: Principal,
    day: datetime.date,
    keys: Sequence[PoolKey],
) -> Denial | None:
    """The denial of a checkout of ``count`` that none of the pools ``keys`` could ever
    serve ``who``, whatever is released (the options file's MAX and RESERVE lines below
    the pools' seats); None when one could."""
    best: tuple[int, Refusal | None, str] = (-1, None, "")
    for key in keys:
        pool = catalog.pool(key[0], key[1])
        if pool is None:
            continue
        most = policy.most(who, feature, key[1], pool.total(day))
        if count <= most.seats:
            return None
        if most.seats > best[0]:
            best = (most.seats, most.refusal, pool.version)
    seats, refusal, version = best
    if seats < 0:
        return None
    asked = f"{count} seat{'s' if count > 1 else ''} of {feature} asked for"
    if refusal is None:  # a larger pool is there, but not for this principal (EXCLUDE)
        return Denial(
            Reason.NO_SEATS,
            f"{asked}, but the largest pool user {who.user!r:.80} may use "
            f"({feature} {version}) has {seats}",
        )
    return Denial(
        refusal.reason,
        f"{asked}, but at most {seats} of {feature} {version} can ever be free for user "
        f"{who.user!r:.80}: {refusal.detail}",
    )


# ---------------------------------------------------------------- helpers

_COUNTS = frozenset({"MAX", "RESERVE"})
_ADMISSION = frozenset({Reason.EXCLUDED, Reason.NOT_INCLUDED})
_UNLIMITED: tuple[int, Refusal | None] = (2**62, None)


def _same(text: str) -> str:
    return text


@lru_cache(maxsize=1024)
def _version(text: str) -> Version:
    return parse_version(text)


def _covers(ln: OptionLine, version: Version) -> bool:
    return ln.version is None or _version(ln.version) == version


def _with(ln: OptionLine, kind: str, name: str) -> OptionLine:
    return OptionLine(ln.keyword, ln.line, ln.feature, ln.version, kind, name, ln.number)


def line_numbers(lines: Sequence[OptionLine]) -> str:
    """``line 4`` or ``lines 4, 9, ...``: where in the options file a refusal's list is."""
    listed = ", ".join(str(ln.line) for ln in lines[:5]) + (", ..." if len(lines) > 5 else "")
    return f"line {listed}" if len(lines) == 1 else f"lines {listed}"


def _describe(who: Principal, ln: OptionLine) -> str:
    kind = (ln.kind or "").lower().replace("_", " ")
    seen = {
        "user": who.user,
        "host": who.host,
        "display": who.display,
        "internet": who.address,
        "project": who.project,
        "group": who.user,
        "host group": who.host,
    }.get(kind, who.user)
    noun = {"group": "user", "host group": "host", "internet": "address"}.get(kind, kind)
    if noun == "host" and who.address:  # a HOST line may have matched the address instead
        return f"host {seen!r:.80} (address {who.address})"
    return f"{noun} {seen!r:.80}"


class _Flow:
    """A maximum flow from holder classes to reservations (Edmonds-Karp), kept between
    runs so that more supply can be added and the flow grown from where it stood.

    Nodes: 0 the source, 1 the sink, then one per reservation, then one per class (a set
    of reservations some holders all match). A class's edge to each of its reservations
    is unbounded; a reservation's edge to the sink carries its kept seats.
    """

    def __init__(self, capacities: list[int]) -> None:
        self.cap: list[dict[int, int]] = [{}, {}]
        self.classes: dict[tuple[int, ...], int] = {}
        self.total = 0
        unbounded = sum(capacities) + 1
        self.unbounded = unbounded
        for c in capacities:
            node = self._node()
            self.cap[node][1] = c
            self.cap[1].setdefault(node, 0)

    def _node(self) -> int:
        self.cap.append({})
        return len(self.cap) - 1

    def add(self, sig: tuple[int, ...], supply: int) -> None:
        node = self.classes.get(sig)
        if node is None:
            node = self.classes[sig] = self._node()
            self.cap[0].setdefault(node, 0)
            self.cap[node].setdefault(0, 0)
            for i in sig:
                r = 2 + i
                self.cap[node][r] = self.unbounded
                self.cap[r].setdefault(node, 0)
        self.cap[0][node] += supply

    def left(self, reservation: int) -> int:
        """Seats of reservation number ``reservation`` that the flow does not fill."""
        return self.cap[2 + reservation][1]

    def run(self) -> int:
        """Grow the flow as far as it goes; the seats it grew by."""
        grown = 0
        while True:
            parent: dict[int, int] = {0: 0}
            queue = deque([0])
            while queue and 1 not in parent:
                u = queue.popleft()
                for v, c in self.cap[u].items():
                    if c > 0 and v not in parent:
                        parent[v] = u
                        queue.append(v)
            if 1 not in parent:
                self.total += grown
                return grown
            path = []
            v = 1
            while v != 0:
                path.append((parent[v], v))
                v = parent[v]
            push = min(self.cap[u][v] for u, v in path)
            for u, v in path:
                self.cap[u][v] -= push
                self.cap[v][u] = self.cap[v].get(u, 0) + push
            grown += push
