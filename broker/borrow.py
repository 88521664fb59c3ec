"""Borrowing: the primary's decision on a borrow, and the token it signs (issue 15).

A borrow is a checkout for days: a grant made in a *borrow hold* (broker/ledger.py: a
session record of its own that no lease expires, ended by a ``lapse`` at its ``until``
or by a ``return``), counted against the feature, MAX and RESERVE like any grant until
its end. The library keeps the signed token and serves checkouts of the feature from it
first, asking no server, connected or not (``zbroker.clients.borrow``).

Rules, in the order ``decide`` asks them (each denial has its own reason):

1. One borrow of a feature per user and host at a time (FlexNet): ``already_borrowed``.
2. Only pools with a live ``BORROW[=hours]`` line (at a version >= the one asked for)
   can be borrowed from: ``not_borrowable``. The license's other answers (no such
   feature, version too high, expired, USERS=/HOSTS=) come first, as for a checkout.
3. ``EXCLUDE_BORROW`` then ``INCLUDE_BORROW``, with INCLUDE/EXCLUDE's principals and
   precedence (``zbroker.broker.policy``): ``excluded`` / ``not_included``.
4. Seats: a pool lends at most the seats of its BORROW lines less ``BORROW_LOWWATER``
   (n seats of each pool in the line's scope are never lent), less what it has lent;
   and then only seats that a checkout by the same principal could take now (free, not
   kept by another's RESERVE, within MAX). A borrow never waits in a queue:
   ``lowwater`` when the lending limit alone stops it, else the checkout's reason.
5. The end: the longest borrow is the line's BORROW hours, shortened by
   ``MAX_BORROW_HOURS`` (the smallest that covers the pool), and never past the end of
   the last expiry day of the pool's BORROW lines. The end asked for is
   ``until`` (wall seconds), or ``hours`` from the primary's now, or else the longest.
   An end at or before the primary's now, or past the longest, is refused
   (``borrow_end``) naming the server's time: the client's clock may be off, and the
   token carries the server's times, never the client's.

``return`` (early) is refused ``no_early_return`` when the pool's lines carry
NO_EARLY_RETURN, ``not_borrowed`` when the user and host hold no borrow of the feature.

Pure: no clock, no key file; ``sign`` takes the key the node loaded.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from zbroker.broker.model import Reason
from zbroker.broker.options import OptionLine
from zbroker.broker.policy import Holding, Policy, Principal, Refusal, choose_under, line_numbers
from zbroker.broker.seats import (
    Catalog,
    Choice,
    Denial,
    Grant,
    LedgerError,
    Pool,
    PoolKey,
    Session,
    busy_detail,
    choose,
    field_wall,
    parse_version,
)
from zbroker.broker.signing import LicenseKeyError, load_private_key, write_keypair
from zbroker.clients.borrow import Token, when

__all__ = [
    "BORROW_KEY_NAME",
    "BorrowReason",
    "Lent",
    "borrow_key_hex",
    "decide",
    "load_borrow_key",
    "sign",
    "write_borrow_key",
]

HOUR = 3600.0
BORROW_KEY_NAME = "borrow"  # keys/borrow.key and keys/borrow.pub, made by zbroker init


class BorrowReason:
    """Denials of a borrow or a return, besides the checkout's own (docs/protocol.md)."""

    NOT_BORROWABLE = "not_borrowable"
    BORROW_END = "borrow_end"
    ALREADY_BORROWED = "already_borrowed"
    LOWWATER = "lowwater"
    NO_EARLY_RETURN = "no_early_return"
    NOT_BORROWED = "not_borrowed"


@dataclass(frozen=True, slots=True)
class Lent:
    """The borrow can be granted from ``pool`` until ``until`` (wall seconds)."""

    pool: Pool
    until: float


# ---------------------------------------------------------------- the options' rules


def _lines(policy: Policy | None, feature: str, key: tuple[int, ...], kw: str) -> list[OptionLine]:
    return [] if policy is None else policy.lines_of(feature, key, kw)


def admits(
    policy: Policy | None, who: Principal, feature: str, key: tuple[int, ...]
) -> Refusal | None:
    """EXCLUDE_BORROW first, then the INCLUDE_BORROW list, as INCLUDE/EXCLUDE decide."""
    if policy is None:
        return None
    path = policy.options.path
    for ln in _lines(policy, feature, key, "EXCLUDE_BORROW"):
        if policy.matches(ln, who):
            return Refusal(
                Reason.EXCLUDED,
                f"user {who.user!r:.80} on host {who.host!r:.80} may not borrow {feature}: "
                f"{ln.where(path)}",
            )
    includes = _lines(policy, feature, key, "INCLUDE_BORROW")
    if includes and not any(policy.matches(ln, who) for ln in includes):
        return Refusal(
            Reason.NOT_INCLUDED,
            f"user {who.user!r:.80} on host {who.host!r:.80} is not on the INCLUDE_BORROW "
            f"list of {feature} ({path} {line_numbers(includes)})",
        )
    return None


def lowwater(policy: Policy | None, feature: str, key: tuple[int, ...]) -> int:
    """Seats of the pool that can never be borrowed: the largest BORROW_LOWWATER covering it."""
    return max(
        (ln.number or 0 for ln in _lines(policy, feature, key, "BORROW_LOWWATER")), default=0
    )


def max_hours(policy: Policy | None, feature: str, key: tuple[int, ...]) -> OptionLine | None:
    """The MAX_BORROW_HOURS line that shortens borrows of the pool most, or None."""
    lines = _lines(policy, feature, key, "MAX_BORROW_HOURS")
    return min(lines, key=lambda ln: ln.number or 0) if lines else None


def lendable(pool: Pool, day: datetime.date) -> int:
    """Seats of the pool's live BORROW lines: the most it may ever lend at once."""
    return sum(e.count for e in pool.live(day) if e.borrow is not None)


def line_hours(pool: Pool, day: datetime.date) -> float:
    """The longest borrow any live BORROW line of the pool allows (0: none is one)."""
    return max((e.borrow or 0.0 for e in pool.live(day)), default=0.0)


def license_end(pool: Pool, day: datetime.date) -> float | None:
    """When the last live BORROW line of the pool stops granting (the end of its expiry
    day, UTC, wall seconds), None when one is permanent."""
    dates = [e.expires for e in pool.live(day) if e.borrow is not None]
    if not dates or None in dates:
        return None
    last = max(d for d in dates if d is not None) + datetime.timedelta(days=1)
    return datetime.datetime(last.year, last.month, last.day, tzinfo=datetime.UTC).timestamp()


def early_return(pool: Pool, day: datetime.date | None) -> bool:
    """False when a line of the pool forbids returning a borrow early (NO_EARLY_RETURN)."""
    return all(e.early_return for e in pool.live(day) if e.borrow is not None)


# ---------------------------------------------------------------- the decision


def decide(
    catalog: Catalog,
    policy: Policy | None,
    *,
    feature: str,
    version: str | None,
    count: int,
    until: float | None,
    hours: float | None,
    who: Principal,
    now: float,
    day: datetime.date,
    used: Callable[[PoolKey], int],
    lent: Callable[[PoolKey], int],
    holdings: Callable[[], Sequence[Holding]],
    already: bool,
) -> Lent | Denial:
    """Decide one borrow (the module docstring's rules); ``lent(pool)``: seats the pool
    has lent now, ``already``: this user and host hold a borrow of the feature."""
    if already:
        return Denial(
            BorrowReason.ALREADY_BORROWED,
            f"user {who.user!r:.80} on host {who.host!r:.80} already borrows {feature}: "
            "return it first, or wait for its end",
        )
    # The license's own answers first, as for a checkout: any pool, ignoring seats.
    plain = choose(catalog, feature, version, count, who.user, who.host, day, lambda _: 0)
    if isinstance(plain, Denial) and not plain.busy:
        return plain
    floor = parse_version(version) if version is not None else None
    pools = [
        p
        for p in catalog.pools(feature)
        if (floor is None or p.key >= floor) and p.admits(who.user, who.host, day)
    ]
    borrowable = [p for p in pools if lendable(p, day) > 0]
    what = feature if version is None else f"{feature} >= {version}"
    if not borrowable:
        return Denial(
            BorrowReason.NOT_BORROWABLE, f"no line of {what} allows borrowing (BORROW on the line)"
        )
    refusals = [admits(policy, who, feature, p.key) for p in borrowable]
    if all(r is not None for r in refusals):
        first = min(
            (r for r in refusals if r is not None), key=lambda r: r.reason != Reason.EXCLUDED
        )
        return Denial(first.reason, first.detail)
    open_pools = {p.pool_key for p, r in zip(borrowable, refusals, strict=True) if r is None}
    # Why each pool lends too few, once per pool: the checkout asks a pool's room more
    # than once (to choose, then to word its busy denial).
    short: dict[PoolKey, str] = {}

    def room_used(key: PoolKey) -> int:
        # A pool that may not lend looks full; one that may looks as full as its limit.
        pool = catalog.pool(*key)
        total = 0 if pool is None else pool.total(day)
        if pool is None or key not in open_pools:
            return total
        limit = lendable(pool, day) - lowwater(policy, *key) - lent(key)
        if limit < count and used(key) + count <= total:
            short[key] = (
                f"{feature} {pool.version} lends at most {lendable(pool, day)} seats, "
                f"{lowwater(policy, *key)} kept by BORROW_LOWWATER, {lent(key)} lent now"
            )
        return max(used(key), total - max(0, limit))

    choice = choose_under(policy, catalog, feature, version, count, who, day, room_used, holdings)
    if isinstance(choice, Denial):
        if choice.busy and short and choice.reason == Reason.NO_SEATS:
            return Denial(BorrowReason.LOWWATER, "; ".join(short.values()))
        if choice.busy and choice.reason == Reason.NO_SEATS:  # name the lending pools only
            lenders = [p for p in borrowable if p.pool_key in open_pools]
            return Denial(Reason.NO_SEATS, busy_detail(lenders, count, day, used))
        return Denial(choice.reason, choice.detail)  # never busy: a borrow does not queue
    return _end(choice, policy, until, hours, now, day)


def _end(
    choice: Choice,
    policy: Policy | None,
    until: float | None,
    hours: float | None,
    now: float,
    day: datetime.date,
) -> Lent | Denial:
    pool = choice.pool
    limit = line_hours(pool, day)
    why = f"BORROW={limit:g} on {pool.feature} {pool.version}"
    shorter = max_hours(policy, pool.feature, pool.key)
    if shorter is not None and (shorter.number or 0) < limit:
        limit = float(shorter.number or 0)
        why = shorter.where(policy.options.path if policy is not None else "")
    longest = now + limit * HOUR
    lapses = license_end(pool, day)
    if lapses is not None and lapses < longest:  # no borrow outlives the license (FlexNet)
        longest, why = lapses, f"the {pool.feature} {pool.version} lines expire"
        limit = max(0.0, (lapses - now) / HOUR)
    end = until if until is not None else now + hours * HOUR if hours is not None else longest
    if end <= now:
        return Denial(
            BorrowReason.BORROW_END,
            f"the borrow would end at {when(end)}, not after the server's time {when(now)}: "
            "is this computer's clock right?",
        )
    if end > longest:
        return Denial(
            BorrowReason.BORROW_END,
            f"the borrow would end at {when(end)}, after the longest borrow of {limit:g} "
            f"hours ({why}) ends at {when(longest)} by the server's clock",
        )
    return Lent(pool, end)


# ---------------------------------------------------------------- the key and the token


def write_borrow_key(directory: Path) -> tuple[Path, Path]:
    """A fresh borrow key pair as ``directory/borrow.key`` (0600) and ``borrow.pub``."""
    return write_keypair(directory, name=BORROW_KEY_NAME)


def load_borrow_key(path: str | Path) -> Ed25519PrivateKey:
    """The triad's borrow key (PKCS8 PEM); LicenseKeyError saying what is wrong."""
    try:
        return load_private_key(path)
    except LicenseKeyError as exc:
        raise LicenseKeyError(path, f"borrow key: {exc.why}") from None


def borrow_key_hex(key: Ed25519PrivateKey) -> str:
    """The public half as 64 hex digits: ``BORROW_KEY=`` on the SERVER lines."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def sign(key: Ed25519PrivateKey, token: Token) -> Token:
    """``token`` named by ``key``'s public half and signed by it (Ed25519 is
    deterministic: the same facts always get the same signature)."""
    named = dataclasses.replace(token, triad=borrow_key_hex(key), sig="")
    return dataclasses.replace(named, sig=key.sign(named.payload()).hex())


def facts(delta: dict[str, Any], session: Session) -> dict[str, Any]:
    """The token's facts of a borrow's grant delta, unsigned (the node signs them:
    ``sign_facts``); ``start`` and ``end`` are the primary's wall times."""
    return {
        "feature": delta["feature"],
        "version": delta["version"],
        "count": delta["count"],
        "user": session.user,
        "host": session.host,
        "start": delta["at"],
        "end": delta["borrow"],
        "grant": delta["grant"],
    }


def borrowed(d: dict[str, Any], session: Session) -> tuple[float, dict[str, Any]] | None:
    """The end and token of a grant delta made as a borrow by ``session``; None for a
    plain grant. ``apply`` asks this before it changes anything: LedgerError names the
    field that is wrong. The token (the facts, signed or not) must be the grant's own:
    one that names other facts would serve a laptop what the triad does not count."""
    what = f"grant delta {d.get('grant')!r:.20}"
    if "borrow" not in d:
        if "token" in d:
            raise LedgerError(f"{what}: a token, but no 'borrow' end")
        return None
    until, at = field_wall(d, "borrow"), field_wall(d)
    if until <= at:
        raise LedgerError(f"{what}: borrow end {until} is not after the grant's time {at}")
    if "reclaims" in d or "dup" in d:
        raise LedgerError(f"{what}: a borrow neither reclaims a lingering seat nor shares one")
    token = d.get("token", {})
    if not isinstance(token, dict):
        raise LedgerError(f"{what}: field 'token' must be a map")
    if token:
        own = {**facts(d, session), "start": at, "end": until}
        wrong = [k for k, v in own.items() if token.get(k) != v]
        if wrong:
            raise LedgerError(f"{what}: the token's {', '.join(wrong)} differ from the borrow's")
    return until, token


def sign_facts(key: Ed25519PrivateKey, unsigned: dict[str, Any]) -> dict[str, Any]:
    """The signed token (its map) of ``facts``' output."""
    fields = {k: unsigned[k] for k in ("feature", "version", "count", "user", "host", "grant")}
    token = Token(**fields, start=float(unsigned["start"]), end=float(unsigned["end"]), triad="")
    return sign(key, token).to_map()


def refuse_return(
    catalog: Catalog, feature: str, mine: Sequence[int], grants: Mapping[int, Grant]
) -> Refusal | None:
    """Why the user and host may not return their borrow of ``feature`` now, or None."""
    if not mine:
        return Refusal(BorrowReason.NOT_BORROWED, f"this user and host borrow no {feature}")
    g = grants[min(mine)]
    pool = catalog.pool(g.feature, g.pool_key[1])
    if pool is not None and not early_return(pool, None):
        return Refusal(
            BorrowReason.NO_EARLY_RETURN,
            f"{feature} {g.version} may not be returned before its end (NO_EARLY_RETURN "
            "on the license line)",
        )
    return None
