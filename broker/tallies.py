"""What a primary decided, counted per feature for the metrics' counters (issue 14).

The metrics (``zbroker.broker.metrics``) show checkouts, checkins and denials as
Prometheus counters per feature: ``("checkout", feature)``, ``("checkin", how,
feature)`` and ``("denied", reason, feature)``. A decision counts once it commits, on
the primary that decided it, as the report log's records go out (a proposal a
failover drops was never done).

A checkout (``grant``), a denial (``answer`` with a denial: a checkout's names its
feature) and a checkin (``release``: the ledger adds its grant's feature, report-only,
because this is the hot path) say their feature in the delta, and are counted from it
when they commit. The rarer checkins do not: ``return`` and ``take`` name a grant,
``close`` and ``expire`` a session, and once applied (the primary applies at once) the
ledger no longer knows the grant. So for those kinds (``CHECKINS``) ``decided`` reads
the features of the grants from the ledger before the delta applies, ``proposed`` files
them under their log indexes, and ``committed`` counts them when their entries commit.
Only the entries of the primary's own term count: whatever a primary proposed and did
not see commit before its role changed is another term's to commit or drop. How a grant
came back: ``release`` (checked in), ``close``
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
from zbroker.broker.model import Reason
from zbroker.peers.types import Entry

# Every way a grant comes back, as the counters label it (metrics list them all from
# the start: a series that appears at its first increment hides it from rate()).
CHECKIN_HOWS = ("release", "close", "expire", "return", "timeout", "removed")
# The kinds of delta that check grants in without naming their features: the core calls
# ``decided`` for these alone, so a checkout or a checkin costs no call here (their
# deltas name the feature; scripts/ab_instructions.py measured the calls).
CHECKINS = frozenset({"close", "expire", "return", "take"})
_BY_SESSION = frozenset({"close", "expire"})
# The feature label of every denial of a feature the license does not have (the report
# log keeps the name asked for).
UNKNOWN_FEATURE = "(unknown)"
Key = tuple[str, ...]


class Tallies:
    """The counts of one node's decisions as primary, since it started (``counts``)."""

    def __init__(self) -> None:
        self.counts: Counter[Key] = Counter()
        # (position in the batch, how, the features of the grants it checks in)
        self._batch: list[tuple[int, str, list[str]]] = []
        self._proposed: dict[int, tuple[str, list[str]]] = {}  # log index -> until it commits

    def decided(self, position: int, delta: dict[str, Any], ledger: Ledger) -> None:
        """``delta``, the ``position``-th of the batch being decided, of a kind in
        ``CHECKINS``, is about to apply: keep the features of the grants it checks in."""
        kind = delta["k"]
        if kind in _BY_SESSION:
            session = ledger.session(str(delta.get("sid")))
            gids: Iterable[int] = session.grants if session is not None else ()
            features = [g.feature for gid in gids if (g := ledger.grant(gid))]
        else:  # one grant: return, take
            g = ledger.grant(delta.get("grant"))  # type: ignore[arg-type]
            features = [g.feature] if g is not None else []
        if features:
            how = str(delta.get("reason")) if kind == "take" else kind
            self._batch.append((position, how, features))

    def proposed(self, indexes: list[int]) -> None:
        """The batch went out as the entries ``indexes`` (one per delta, in order)."""
        for position, how, features in self._batch:
            self._proposed[indexes[position]] = (how, features)
        self._batch.clear()

    def dropped(self) -> None:
        """The batch was not proposed (the node lost control): none of it happened."""
        self._batch.clear()

    def forget(self) -> None:
        """The node's role changed: what it proposed and has not seen commit is not its
        to count (a later primary commits it, or drops it)."""
        self._batch.clear()
        self._proposed.clear()

    def committed(self, entries: Iterable[Entry], term: int) -> None:
        """Count the decisions of ``entries`` of this primary's own ``term`` (another
        term's entries were decided, and counted, by the primary of that term)."""
        counts, proposed = self.counts, self._proposed
        for e in entries:
            delta = e.delta
            if delta is None or e.term != term:
                continue
            kind = delta["k"]
            if kind == "grant":
                counts["checkout", delta["feature"]] += 1  # every grant delta names it
            elif kind == "answer":
                reason = delta["reply"].get("reason")
                if reason is not None:  # a denial (no other reply has a reason)
                    # A name the license lacks is the client's to choose: one label for
                    # all of them, or a client's typos grow every counter without bound.
                    feature = (
                        UNKNOWN_FEATURE
                        if reason == Reason.NO_SUCH_FEATURE
                        else str(delta.get("feature", ""))
                    )
                    counts["denied", str(reason), feature] += 1
            elif kind == "release":  # it names its grant's feature (ledger.handle)
                counts["checkin", "release", delta["feature"]] += 1
            elif proposed:
                checked_in = proposed.pop(e.index, None)
                if checked_in is not None:
                    how, features = checked_in
                    for feature in features:  # not Counter.update: a list costs an abc check
                        counts["checkin", how, feature] += 1
