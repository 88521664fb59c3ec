"""Duplicate grouping (FlexNet's DUP_GROUP): checkouts that share one seat.

Theory of operation
-------------------
A *mask* says which of a checkout's names must match for two checkouts to be the
same use of the feature: ``U`` user, ``H`` host, ``D`` display, ``V`` the vendor
string the application sent, any of them together (``UHD`` is FlexNet's usual one),
or ``SITE``: every checkout of the site. ``NONE`` (or no mask) groups nothing. The
mask comes from the license line (``DUP_GROUP=``, signed with it; the first line of
the feature in license order that has one), else from the checkout request (``dup``).

Checkouts whose *key* (the mask and the names it selects) is the same, in the same
pool, form a *group*: its members are ordinary grants with their own ids and sessions,
but the pool counts the group's seats once, and the group holds the largest count any
present member asked for. A member asking for more than the group holds takes only the
difference (if it fits, else it is refused or waits like any checkout); a member
leaving (checkin, session end, removal) frees seats only when the group shrinks, and
the last one frees them all. A group lives in one pool: a checkout that the license
serves from another version pool starts a group there.

The options file counts a group once as well: MAX and RESERVE see one holding of the
group's seats, held by the principal of its oldest member. Lingering and borrowed
seats are never in a group.

``Groups`` is the bookkeeping the ledger keeps in step with its grants (derived, never
replicated on its own: a grant carries its key). Pure, no clock.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable

from zbroker.broker.model import Entitlement
from zbroker.broker.seats import Grant, LedgerError, PoolKey, Session, Version

SITE = "SITE"
NONE = "NONE"


def masks_of(entitlements: Iterable[Entitlement]) -> dict[str, str]:
    """Each feature's DUP_GROUP= mask: the first of its lines in license order that has one."""
    out: dict[str, str] = {}
    for line in entitlements:
        if line.dup_group is not None and line.feature not in out:
            out[line.feature] = line.dup_group
    return out


def key_for(
    masks: dict[str, str], feature: str, asked: str | None, who: Session, vendor_string: str
) -> str | None:
    """The group key of a checkout of ``feature`` by session ``who``, under the license's
    mask, else the one it ``asked`` for; None: it joins no group."""
    mask = masks.get(feature) if masks else None
    if mask is None:
        mask = asked
    if mask is None or mask == NONE:
        return None
    return key_of(mask, who.user, who.host, who.display, vendor_string)


def key_of(mask: str, user: str, host: str, display: str, vendor_string: str) -> str:
    """The group key of a checkout under ``mask`` (SITE or letters of UHDV)."""
    if mask == SITE:
        return SITE
    names = {"U": user, "H": host, "D": display, "V": vendor_string}
    return mask + json.dumps([names[ch] for ch in mask], separators=(",", ":"))


class _Group:
    __slots__ = ("counts", "members")

    def __init__(self) -> None:
        self.members: dict[int, int] = {}  # grant id -> count, oldest first
        self.counts: Counter[int] = Counter()  # count -> members asking it

    @property
    def seats(self) -> int:
        return max(self.counts) if self.counts else 0


class Groups:
    """Every duplicate group of a ledger: (feature, key) -> pool version -> members."""

    def __init__(self) -> None:
        self._groups: dict[tuple[str, str], dict[Version, _Group]] = {}

    def seats_by_pool(self, feature: str, key: str) -> dict[Version, int]:
        """The seats each pool's group of ``key`` holds (empty: no such group)."""
        pools = self._groups.get((feature, key))
        return {} if pools is None else {v: g.seats for v, g in pools.items()}

    def cost(self, g: Grant) -> int:
        """Seats the pool gains when ``g`` (not yet a member) joins its group."""
        group = self._groups.get((g.feature, g.dup), {}).get(g.pool_key[1])
        return g.count if group is None else max(0, g.count - group.seats)

    def add(self, g: Grant) -> int:
        """Make ``g`` a member; the seats its pool gains."""
        pools = self._groups.setdefault((g.feature, g.dup), {})
        group = pools.get(g.pool_key[1])
        if group is None:
            group = pools[g.pool_key[1]] = _Group()
        if g.id in group.members:
            raise LedgerError(f"grant {g.id} is already in duplicate group {g.dup}")
        before = group.seats
        group.members[g.id] = g.count
        group.counts[g.count] += 1
        return group.seats - before

    def drop(self, g: Grant) -> int:
        """``g`` leaves its group; the seats its pool frees."""
        pools = self._groups[(g.feature, g.dup)]
        version = g.pool_key[1]
        group = pools[version]
        before = group.seats
        count = group.members.pop(g.id)
        group.counts[count] -= 1
        if not group.counts[count]:
            del group.counts[count]
        if not group.members:
            del pools[version]
            if not pools:
                del self._groups[(g.feature, g.dup)]
        return before - group.seats

    def sharers(self, g: Grant) -> list[int]:
        """The ids of every member of ``g``'s group, oldest first (``g`` among them)."""
        return list(self._groups[(g.feature, g.dup)][g.pool_key[1]].members)

    def owner(self, g: Grant) -> int:
        """The group's oldest member: the options file counts the group as its."""
        return next(iter(self._groups[(g.feature, g.dup)][g.pool_key[1]].members))

    def seats_of(self, g: Grant) -> int:
        """The seats of the group ``g`` is a member of."""
        return self._groups[(g.feature, g.dup)][g.pool_key[1]].seats

    def freed_if_gone(self, grants: Iterable[Grant]) -> dict[PoolKey, int]:
        """Seats each pool frees when all of ``grants`` (members of groups) leave."""
        leaving: dict[tuple[str, str, Version], set[int]] = {}
        for g in grants:
            leaving.setdefault((g.feature, g.dup, g.pool_key[1]), set()).add(g.id)
        out: dict[PoolKey, int] = {}
        for (feature, key, version), ids in leaving.items():
            group = self._groups[(feature, key)][version]
            left = max((n for gid, n in group.members.items() if gid not in ids), default=0)
            freed = group.seats - left
            if freed:
                out[(feature, version)] = out.get((feature, version), 0) + freed
        return out
