"""The options file's reservations as status shows them: seats kept, and how many unused.

A status reply's feature lists ``reservations``: one entry per RESERVE line that keeps
seats of it, ``{"count", "kind", "name", "unused"}`` (docs/protocol.md). ``count`` is
the seats the line keeps (in each pool it covers, as the policy honours reservations:
file order, up to the pool's count), ``unused`` those of them its principals do not
fill now: the seats nobody else may take. lmstat prints them as FlexNet's
``RESERVATIONs`` lines and the metrics as ``zbroker_feature_seats_reserved_unused``.

They are the policy's own figures (``zbroker.broker.policy.Policy.reserved``, the maximum
flow a checkout is judged by), so status never tells a person a seat is free that a
checkout would be refused. Reading a feature's holdings costs O(its grants), so
``Reservations`` keeps each feature's entries until its grants, the options file or
the day change: a flood of status requests reads them once.

Pure: the ledger and the day are arguments.
"""

from __future__ import annotations

import datetime
from typing import Any

from zbroker.broker.ledger import Ledger
from zbroker.broker.policy import Policy
from zbroker.clients.protocol import parse_version

# (the policy, the day, the ledger's next grant id, the feature's seats in use): grants
# only ever get new ids, so an unchanged next id and seat count mean no grant came or went.
# The policy itself, not its id: a reload's new policy must never pass for the old one.
_Key = tuple[Policy, datetime.date | None, int, int]


def reservations(policy: Policy, feature: dict[str, Any], ledger: Ledger) -> list[dict[str, Any]]:
    """The ``reservations`` of one status feature (its ``versions`` give the pools)."""
    name = feature["name"]
    if not policy.counts(name):
        return []
    holdings = ledger.holdings(name)
    out: dict[int, dict[str, Any]] = {}  # by the RESERVE line's number, in file order
    for pool in feature.get("versions", ()):
        version = parse_version(str(pool["version"]))
        for ln, kept, filled in policy.reserved(name, version, int(pool["total"]), holdings):
            entry = out.setdefault(
                ln.line, {"count": 0, "kind": ln.kind, "name": ln.name, "unused": 0}
            )
            entry["count"] += kept
            entry["unused"] += kept - filled
    return [out[line] for line in sorted(out)]


class Reservations:
    """Adds ``reservations`` to a status's features, each feature's kept while it holds."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[_Key, list[dict[str, Any]]]] = {}

    def add_to(
        self, features: list[dict[str, Any]], ledger: Ledger, day: datetime.date | None
    ) -> None:
        """Give each of ``features`` (``Ledger.status``'s) its ``reservations``, in place."""
        policy = ledger.policy
        if policy is None:
            self._kept.clear()
            return
        kept: dict[str, tuple[_Key, list[dict[str, Any]]]] = {}
        for feature in features:
            name = feature["name"]
            if not policy.counts(name):
                continue
            key = (policy, day, ledger.next_grant, int(feature["in_use"]))
            found = self._kept.get(name)
            entries = found[1] if found is not None and found[0] == key else None
            if entries is None:
                entries = reservations(policy, feature, ledger)
            kept[name] = (key, entries)
            if entries:
                feature["reservations"] = [dict(e) for e in entries]
        self._kept = kept
