"""The ledger as it follows the replicated log: which deltas it holds, and whether the
log still vouches for them.

The ledger on a backup holds exactly the committed deltas; on the primary it also holds
the uncommitted ones it proposed (applied when decided, so that the next decision sees
them). ``AppliedLedger`` knows the index and term of the last delta its ledger applied;
a log that no longer holds that term there has replaced what the ledger holds
(``follows``): the node then rebuilds from what is certain, or, when even that fails,
cannot trust its state (``Unappliable``).

Pure: no sockets, no clock, no disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zbroker.broker.config import Config
from zbroker.broker.ledger import Ledger
from zbroker.broker.seats import LedgerError
from zbroker.peers.log import Log
from zbroker.peers.types import Entry


class Unappliable(Exception):
    """The ledger refused a committed delta or snapshot: this node's state is not to be trusted.

    Raised inside the core and caught at its entry points, so that nothing more of that
    cycle is decided or sent: the cycle's ``Ready`` then says ``start_over``.
    """

    def __init__(self, index: int, term: int, what: str) -> None:
        super().__init__(f"index {index} (term {term}): {what}")
        self.index = index
        self.term = term


class AppliedLedger:
    """A ledger and the (index, term) of the last log entry it applied.

    Built from a snapshot taken at ``index`` of ``term`` (None: the empty ledger at 0);
    LedgerError when the snapshot makes no ledger.
    """

    def __init__(self, config: Config, snapshot: dict[str, Any] | None, index: int, term: int):
        self._lease = config.lease
        self._limits = config.limits
        self._min_timeout = config.min_timeout
        self.ledger = self._ledger_from(snapshot)
        self.index = index  # the ledger holds every delta up to here
        self.term = term  # and the log's term there (``follows``)

    def _ledger_from(self, snap: dict[str, Any] | None) -> Ledger:
        if snap is None:
            # Entitlements arrive as a replicated `reload` delta from the primary, so every
            # node's ledger is built from the log alone.
            return Ledger(
                (),
                lease=self._lease,
                heartbeat=self._lease / 3,
                limits=self._limits,
                min_timeout=self._min_timeout,
            )
        return Ledger.from_snapshot(
            snap,
            lease=self._lease,
            heartbeat=self._lease / 3,
            limits=self._limits,
            min_timeout=self._min_timeout,
        )

    def follows(self, log: Log) -> bool:
        """Whether the log still holds, where the ledger's history ends, the entry applied
        there. Entries are identical up to an index where two logs have the same term, so
        then the ledger holds exactly the log's deltas up to ``index``."""
        term = log.term_at(self.index)
        return term is None or term == self.term  # None: compacted past it

    def proposed(self, index: int, term: int) -> None:
        """A primary's proposals, applied when decided, now sit in the log up to ``index``."""
        self.index, self.term = index, term

    def apply(self, entries: Sequence[Entry], log: Log) -> None:
        """Apply the entries past ``index``, in order; Unappliable when they do not fit."""
        if entries and entries[-1].index > self.index and not self.follows(log):
            raise Unappliable(self.index, self.term, "the log lost this delta")
        for entry in entries:
            # A backup applies what commits; a new primary applies what it adopted from
            # the previous term; its own proposals it applied when it made them.
            if entry.index > self.index:
                if entry.index != self.index + 1:
                    raise Unappliable(entry.index, entry.term, f"only {self.index} applied")
                if entry.delta is not None:
                    try:
                        self.ledger.apply(entry.delta)
                    except LedgerError as exc:
                        raise Unappliable(entry.index, entry.term, str(exc)) from None
                self.index, self.term = entry.index, entry.term

    def install(self, snapshot: dict[str, Any] | None, index: int, term: int) -> None:
        """Replace the ledger with ``snapshot``, taken at ``index`` of ``term``."""
        try:
            self.ledger = self._ledger_from(snapshot)
        except LedgerError as exc:
            raise Unappliable(index, term, f"snapshot: {exc}") from None
        self.index, self.term = index, term

    def rebuild(self, log: Log, upto: int) -> None:
        """Start again from the log's snapshot and apply its entries up to ``upto``."""
        self.install(log.snapshot, log.snap_index, log.snap_term)
        self.apply(log.slice(log.snap_index + 1, upto), log)
