"""The in-memory replicated log of one node: a snapshot, then a contiguous run of entries.

Shape::

    [ snapshot @ snap_index ]
    base_index < entries[0].index = base_index + 1 ... entries[-1].index = last

``base_index <= snap_index``: after a compaction the log keeps a tail of entries
that the snapshot already covers, so that a backup lagging by less than the tail
catches up from entries instead of a whole snapshot. The term of the entry at
``base_index`` is remembered (``base_term``) so that an append right after it can
still be checked.

The snapshot is an ``Image`` (bytes the shell wrote; ``snap_index`` and ``snap_term``
are its index and term). A compaction keeps more than the tail when an older image is
still being sent to a backup (``hold``): that backup will continue from the entry after
that image's index, so the log holds the entries after it until a later compaction.

Invariants (checked by explicit raises, a broken one is a bug, not bad input):

- entries are contiguous and their terms never decrease;
- ``base_index <= snap_index <= last``;
- nothing at or before ``snap_index`` is ever truncated (the snapshot is committed).

This module knows nothing of roles, terms of office or peers; the replica decides
what to append and truncate, the log only keeps the shape.
"""

from __future__ import annotations

from zbroker.peers.types import CorruptState, Entry, Image, ReplicaError

TRIM_STEP = 2_000  # entries ``trim`` frees at a time: 1-2 ms of deallocation here


class Log:
    """A snapshot plus the entries after ``base_index``."""

    def __init__(self, snapshot: Image | None = None, entries: list[Entry] | None = None) -> None:
        self.snapshot = snapshot
        snap_index, snap_term = self.snap_index, self.snap_term
        self.base_index = snap_index
        self.base_term = snap_term
        self._trim_to = snap_index  # where ``trim`` moves the base, a step at a time
        self.entries: list[Entry] = []
        # entries the snapshot covers are dropped at load: their terms cannot be checked
        # against the snapshot, and the snapshot answers any catch-up that needs them
        tail = [e for e in entries or [] if e.index > snap_index]
        expected, prev_term = snap_index + 1, snap_term
        for e in tail:
            if e.index != expected or e.term < prev_term:
                raise CorruptState(f"log entry {e.index} (term {e.term}) does not follow")
            expected, prev_term = expected + 1, e.term
        self.entries = tail

    # --- reading ----------------------------------------------------------------------

    @property
    def snap_index(self) -> int:
        return 0 if self.snapshot is None else self.snapshot.index

    @property
    def snap_term(self) -> int:
        return 0 if self.snapshot is None else self.snapshot.term

    @property
    def last(self) -> int:
        return self.entries[-1].index if self.entries else self.base_index

    @property
    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.base_term

    def term_at(self, index: int) -> int | None:
        """The term of the entry at ``index``, or None when this log cannot tell."""
        if index == 0:
            return 0
        if index == self.base_index:
            return self.base_term
        if index == self.snap_index:
            return self.snap_term
        if self.base_index < index <= self.last:
            return self.entries[index - self.base_index - 1].term
        return None

    def entry(self, index: int) -> Entry:
        if not self.base_index < index <= self.last:
            raise ReplicaError(f"entry {index} is not in the log ({self.base_index}, {self.last}]")
        return self.entries[index - self.base_index - 1]

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries with lo <= index <= hi (clipped to what the log holds)."""
        lo = max(lo, self.base_index + 1)
        hi = min(hi, self.last)
        if lo > hi:
            return []
        off = self.base_index + 1
        return self.entries[lo - off : hi - off + 1]

    # --- changing ---------------------------------------------------------------------

    def append(self, entries: list[Entry]) -> None:
        for e in entries:
            if e.index != self.last + 1 or e.term < self.last_term:
                raise ReplicaError(f"entry {e.index} (term {e.term}) does not follow {self.last}")
            self.entries.append(e)

    def truncate_from(self, index: int) -> None:
        """Drop entries with index >= ``index``."""
        if index <= self.snap_index:
            raise ReplicaError(f"truncating at {index} would cut the snapshot at {self.snap_index}")
        if index <= self.last:
            del self.entries[index - self.base_index - 1 :]

    def merge(self, entries: list[Entry], floor: int) -> tuple[int | None, list[Entry]]:
        """Add entries that the caller checked follow a matching ``prev``.

        Matching entries are kept as they are: a stale, duplicated append must never
        erase newer entries. The log is cut only at the first entry whose term differs,
        and never at or before ``floor`` (the commit index): such a batch raises
        ``ReplicaError`` before anything changes.
        Returns (index truncated from or None, entries actually appended).
        """
        cut: int | None = None
        fresh: list[Entry] = []
        for pos, e in enumerate(entries):
            if e.index <= self.base_index:
                continue  # covered by the snapshot or compacted: committed, so it matches
            if e.index <= self.last:
                if self.term_at(e.index) == e.term:
                    continue
                if e.index <= max(self.snap_index, floor):
                    raise ReplicaError(f"entry {e.index} conflicts with a committed entry")
                cut = e.index
                self.truncate_from(e.index)
            fresh = entries[pos:]
            break
        self.append(fresh)
        return cut, fresh

    def compact(self, image: Image, keep_tail: int, hold: int | None = None) -> None:
        """The shell took ``image``; drop entries older than the tail kept and ``hold``
        (the lowest index of an image still being sent: the entries after it stay)."""
        index, term = image.index, image.term
        if index <= self.snap_index:
            return
        known = self.term_at(index)
        if index > self.last or known != term:
            raise ReplicaError(f"snapshot at {index} term {term} does not match the log")
        self.snapshot = image
        new_base = index - keep_tail if hold is None else min(index - keep_tail, hold)
        self._trim_to = max(self.base_index, new_base)
        self.trim()

    def trim(self, limit: int = TRIM_STEP) -> None:
        """Drop up to ``limit`` of the entries before the base the last ``compact`` set.

        A compaction can leave 80,000 entries to drop (its taker took seconds, and the
        log grew meanwhile); freeing them at once held a loop for 50-150 ms at 1,000,000
        grants (BENCHMARKS.md). The replica trims a step every tick instead: until then
        the log just holds more of its committed past than it must.
        """
        target = min(self._trim_to, self.base_index + limit)
        if target <= self.base_index:
            return
        base_term = self.term_at(target)
        if base_term is None:
            raise ReplicaError(f"no term known at {target}")
        del self.entries[: target - self.base_index]
        self.base_index, self.base_term = target, base_term

    def install(self, image: Image) -> bool:
        """Replace the log's start with a snapshot from a peer.

        Keeps the entries after ``index`` when the log holds the snapshot's last entry
        (same index and term): they may be newer than the snapshot. Otherwise the log is
        emptied. Returns True when entries after ``index`` were discarded, which the disk
        must drop too (entries at or before ``index`` are covered by the snapshot anyway).
        """
        index, term = image.index, image.term
        keep = index <= self.last and self.term_at(index) == term
        had_after = self.last > index
        if keep:
            del self.entries[: max(0, index - self.base_index)]
        self.snapshot = image
        self.base_index, self.base_term = index, term
        self._trim_to = index
        if not keep:
            self.entries = []
            return had_after
        return False
