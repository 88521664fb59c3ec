"""What a primary decided, counted per feature for the metrics' counters (issue 14).

The metrics (``zbroker.broker.metrics``) show checkouts, checkins and denials as
Prometheus counters per feature: ``("checkout", feature)``, ``("checkin", how,
feature)`` and ``("denied", reason, feature)``. A decision counts once it commits, on
the primary that decided it, as the report log's records go out (a proposal a
failover drops was never done).

A checkout (``grant``) and a denial (``answer`` with a denial: a checkout's names its
feature) say their feature in the delta. A checkin does not: ``release``, ``return``
and ``take`` name a grant, ``close`` and ``expire`` a session, and once applied (the
primary applies at once) the ledger no longer knows the grant. So ``decided`` reads
the features of the grants a delta checks in from the ledger before it applies,
``proposed`` files them under their log indexes, and ``committed`` counts them when
their entries commit. How a grant came back: ``release`` (checked in), ``close``
(its session closed), ``expire`` (its session's lease ran out), ``return`` (a borrow
returned early), ``timeout`` and ``removed`` (``take``: idle past TIMEOUT, or
``zbroker remove``). A lingering seat's end (``lapse``) is no checkin: the checkin
was counted when the application made it.

Pure: the loop that owns the core calls it; no clock, no I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from zbroker.broker.ledger import Ledger
from zbroker.peers.types import Entry

# Every way a grant comes back, as the counters label it (metrics list them all from
# the start: a series that appears at its first increment hides it from rate()).
CHECKIN_HOWS = ("release", "close", "expire", "return", "timeout", "removed")
_BY_KIND = {"release": "release", "close": "close", "expire": "expire", "return": "return"}
_BY_SESSION = frozenset({"close", "expire"})
Key = tuple[str, ...]


class Tallies:
    """The counts of one node's decisions as primary, since it started (``counts``)."""

    def __init__(self) -> None:
        self.counts: Counter[Key] = Counter()
        self._batch: list[tuple[int, list[Key]]] = []  # (position in the batch, checkins)
        self._proposed: dict[int, list[Key]] = {}  # log index -> checkins, until it commits

    def decided(self, position: int, delta: dict[str, Any], ledger: Ledger) -> None:
        """``delta``, the ``position``-th of the batch being decided, is about to apply:
        keep the features of the grants it checks in."""
        kind = delta["k"]
        how = delta.get("reason") if kind == "take" else _BY_KIND.get(kind)
        if how is None:
            return
        if kind in _BY_SESSION:
            session = ledger.session(str(delta.get("sid")))
            gids: Iterable[int] = session.grants if session is not None else ()
        else:
            gids = (delta.get("grant"),)  # type: ignore[assignment]
        keys: list[Key] = [
            ("checkin", str(how), g.feature) for gid in gids if (g := ledger.grant(gid))
        ]
        if keys:
            self._batch.append((position, keys))

    def proposed(self, indexes: list[int]) -> None:
        """The batch went out as the entries ``indexes`` (one per delta, in order)."""
        for position, keys in self._batch:
            self._proposed[indexes[position]] = keys
        self._batch.clear()

    def dropped(self) -> None:
        """The batch was not proposed (the node lost control): none of it happened."""
        self._batch.clear()

    def forget(self) -> None:
        """The node's role changed: what it proposed and has not seen commit is not its
        to count (a later primary commits it, or drops it)."""
        self._batch.clear()
        self._proposed.clear()

    def committed(self, entries: Iterable[Entry]) -> None:
        """Count the decisions of ``entries``, entries of this primary's own term."""
        counts, proposed = self.counts, self._proposed
        for e in entries:
            delta = e.delta
            if delta is None:
                continue
            kind = delta["k"]
            if kind == "grant":
                counts["checkout", str(delta.get("feature"))] += 1
            elif kind == "answer":
                reason = delta["reply"].get("reason")
                if reason is not None:  # a denial (no other reply has a reason)
                    counts["denied", str(reason), str(delta.get("feature", ""))] += 1
            elif proposed:
                keys = proposed.pop(e.index, None)
                if keys is not None:
                    counts.update(keys)
