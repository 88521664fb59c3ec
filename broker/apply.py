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
from dataclasses import dataclass

from zbroker.broker.config import Config
from zbroker.broker.image import ImageLoader
from zbroker.broker.ledger import Ledger
from zbroker.broker.limits import Limits
from zbroker.broker.seats import LedgerError
from zbroker.peers.log import Log
from zbroker.peers.types import Entry, Image


class Unappliable(Exception):
    """The ledger refused a committed delta or snapshot: this node's state is not to be trusted.

    Raised inside the core and caught at its entry points, so that nothing more of that
    cycle is decided or sent: the cycle's ``Ready`` then says ``start_over``.
    """

    def __init__(self, index: int, term: int, what: str) -> None:
        super().__init__(f"index {index} (term {term}): {what}")
        self.index = index
        self.term = term


@dataclass(frozen=True)
class LedgerSettings:
    """What a node's ledgers are built with, from its config: the node's own, and the one
    its snapshot taker keeps (broker/taker.py)."""

    lease: float
    limits: Limits
    min_timeout: float

    @classmethod
    def of(cls, config: Config) -> LedgerSettings:
        return cls(config.lease, config.limits, config.min_timeout)

    def empty(self) -> Ledger:
        # Entitlements arrive as a replicated `reload` delta from the primary, so every
        # node's ledger is built from the log alone.
        return Ledger(
            (),
            lease=self.lease,
            heartbeat=self.lease / 3,
            limits=self.limits,
            min_timeout=self.min_timeout,
        )

    def loader(self, image: Image) -> ImageLoader:
        return ImageLoader(
            image,
            lease=self.lease,
            heartbeat=self.lease / 3,
            limits=self.limits,
            min_timeout=self.min_timeout,
        )


class AppliedLedger:
    """A ledger and the (index, term) of the last log entry it applied.

    Built from a snapshot image (None: the empty ledger at 0), all at once: a node's start.
    LedgerError when the image makes no ledger. A snapshot from a peer, or the node's own
    once it must rebuild, is installed in steps instead (``start_install``,
    ``install_step``): a 1,000,000-grant image takes seconds to load, and the loop must
    answer peers and clients meanwhile. Until the last step the ledger is the one before.
    """

    def __init__(self, config: Config, snapshot: Image | None):
        self._settings = settings = LedgerSettings.of(config)
        self.ledger = settings.empty() if snapshot is None else settings.loader(snapshot).finish()
        self.index = 0 if snapshot is None else snapshot.index  # the ledger holds up to here
        self.term = 0 if snapshot is None else snapshot.term  # and the log's term there
        self._installing: tuple[ImageLoader, Image] | None = None

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

    # --- installing a snapshot, in steps

    @property
    def installing(self) -> Image | None:
        """The image being installed, if one is."""
        return None if self._installing is None else self._installing[1]

    def start_install(self, image: Image | None) -> None:
        """Replace the ledger with ``image``'s (None: the empty ledger at 0) once the steps
        are done; an install under way is dropped for it."""
        if image is None:
            self._installing = None
            self.ledger, self.index, self.term = self._settings.empty(), 0, 0
            return
        self._installing = (self._settings.loader(image), image)

    def install_step(self) -> bool:
        """One step of the install under way; True when the ledger is the image's."""
        if self._installing is None:
            return True
        loader, image = self._installing
        try:
            ledger = loader.step()
        except LedgerError as exc:
            self._installing = None
            raise Unappliable(image.index, image.term, f"snapshot: {exc}") from None
        if ledger is None:
            return False
        self._installing = None
        self.ledger, self.index, self.term = ledger, image.index, image.term
        return True

    def finish_install(self) -> None:
        """Every step left, at once: only where a decision needs the ledger now."""
        while not self.install_step():
            pass

    def rebuild(self, log: Log, upto: int) -> None:
        """Start again from the log's snapshot and apply its entries up to ``upto``, at once."""
        self.start_install(log.snapshot)
        self.finish_install()
        self.apply(log.slice(self.index + 1, upto), log)
