"""The simulation's disk: one node's data directory, with a write cache that a crash empties.

It executes the persist ops of a ``Ready`` (``broker/core.py``) the way ``broker/storage.py``
does, but keeps what was written since the last ``sync`` apart from what is durable. A
crash between a write and its sync keeps any prefix of those writes and loses the rest
(a power loss on a disk that writes back in order): the core may rely on nothing it
persisted until the cycle's sync, which is exactly its contract. ``load`` is what
``Storage.load`` returns at the next start, as a ``Loaded``:

- a directory without its marker is fresh, and whatever it holds is discarded;
- a damaged directory is set aside and loads fresh with ``damaged`` set;
- otherwise the term and vote, the snapshot and the log entries after it.

A write that breaks what storage would refuse on the next load (an entry that does not
follow the log, a term that goes back) raises ``DiskViolation`` at once: the core broke
its contract, and the load that would have found it as damage is far from the cause.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from zbroker.broker.core import (
    Append,
    Persist,
    SaveHardState,
    SaveSnapshot,
    SaveSnapshotChunk,
    Truncate,
)
from zbroker.broker.storage import Loaded
from zbroker.peers.types import Image

Record = tuple[int, int, Any]  # (index, term, delta), as storage keeps log entries


class DiskViolation(Exception):
    """A persist op that the real data directory would hold as damage."""


@dataclass
class _Durable:
    """What survives any crash: the files as the last sync left them."""

    marked: bool = False  # node.json: absent, the next start is fresh
    term: int = 0
    voted_for: str | None = None
    snapshot: Image | None = None
    entries: list[Record] = field(default_factory=list)  # contiguous, after the snapshot
    receiving: tuple[int, int, int] | None = None  # a received snapshot's (index, term, bytes)

    @property
    def snapshot_index(self) -> int:
        return 0 if self.snapshot is None else self.snapshot.index

    @property
    def last(self) -> int:
        return self.entries[-1][0] if self.entries else self.snapshot_index

    def write(self, op: Persist) -> None:
        match op:
            case Append(entries=entries):
                for index, term, delta in entries:
                    if index != self.last + 1:
                        raise DiskViolation(f"appended entry {index} after the log's {self.last}")
                    if self.entries and term < self.entries[-1][1]:
                        raise DiskViolation(f"entry {index} of term {term} after a higher term")
                    self.entries.append((index, term, delta))
            case Truncate(from_index=cut):
                if cut <= self.snapshot_index:
                    raise DiskViolation(f"truncation at {cut}, inside the snapshot")
                self.entries = [e for e in self.entries if e[0] < cut]
            case SaveHardState(term=term, voted_for=voted_for):
                if term < self.term:
                    raise DiskViolation(f"hard state term went back {self.term} -> {term}")
                self.term, self.voted_for = term, voted_for
            case SaveSnapshotChunk(index=index, term=term, offset=offset, data=data):
                # chunks follow each other; offset 0 starts a snapshot afresh
                held = (index, term, offset) if offset == 0 else self.receiving
                if held != (index, term, offset):
                    raise DiskViolation(f"snapshot chunk {index}@{offset} after {held}")
                self.receiving = (index, term, offset + len(data))
            case SaveSnapshot(image=image, source=source):
                if source == "received" and self.receiving != (image.index, image.term, image.size):
                    raise DiskViolation(f"received snapshot {image.index} saved before its chunks")
                if image.index <= self.snapshot_index:
                    raise DiskViolation(f"snapshot at {image.index} after {self.snapshot_index}")
                if source == "received":  # a snapshot taken meanwhile has its own file
                    self.receiving = None
                self.snapshot = image
                self.entries = [e for e in self.entries if e[0] > image.index]
                if self.entries and self.entries[0][0] != image.index + 1:
                    raise DiskViolation(f"snapshot at {image.index} keeps {self.entries[0][0]}")


@dataclass
class SimDisk:
    """One node's data directory: durable state, and writes not yet synced."""

    durable: _Durable = field(default_factory=_Durable)
    unsynced: list[Persist] = field(default_factory=list)
    damaged: str = ""  # why the next load finds damage ("" when it does not)
    lost_writes: int = 0  # unsynced writes crashes threw away, for the stats
    set_aside_why: list[str] = field(default_factory=list)  # each time the node started over

    @classmethod
    def initialised(cls) -> SimDisk:
        """A directory as ``zbroker init`` leaves it: marked, empty."""
        return cls(_Durable(marked=True))

    @property
    def marked(self) -> bool:
        return self.durable.marked

    def write(self, op: Persist) -> None:
        self.unsynced.append(op)

    def sync(self) -> None:
        """Group commit: every write of the cycle becomes durable, in order."""
        ops, self.unsynced = self.unsynced, []
        for op in ops:
            self.durable.write(op)

    def mark_recovered(self) -> None:
        """The caught-up marker (written, and synced, after the cycle's sync)."""
        self.durable.marked = True

    def crash(self, rng: random.Random) -> int:
        """A power loss: keep a prefix of the unsynced writes; returns how many were lost."""
        kept = rng.randint(0, len(self.unsynced))
        ops, self.unsynced = self.unsynced, []
        for op in ops[:kept]:
            self.durable.write(op)
        self.lost_writes += len(ops) - kept
        return len(ops) - kept

    def wipe(self) -> None:
        """The disk is replaced: no marker, nothing on it."""
        self.durable, self.unsynced = _Durable(), []

    def corrupt(self, why: str) -> None:
        """A bit flipped in the files: the next load finds damage and sets them aside."""
        self.damaged = why

    def load(self) -> Loaded:
        """What ``Storage.load`` returns at a start (see the module docstring)."""
        if self.unsynced:
            raise DiskViolation("load with unsynced writes: crash or sync first")
        if self.damaged:
            why, self.damaged = self.damaged, ""
            self.durable = _Durable()
            return Loaded(fresh=True, damaged=True, why=f"data directory damaged: {why}")
        if not self.durable.marked:
            self.durable = _Durable()
            return Loaded(fresh=True, why="no node.json: a new or wiped data directory")
        d = self.durable
        d.receiving = None  # storage drops a received snapshot's file cut short (.tmp)
        return Loaded(
            fresh=False,
            term=d.term,
            voted_for=d.voted_for,
            snapshot=d.snapshot,
            entries=list(d.entries),
        )

    def set_aside(self, why: str) -> Loaded:
        """``Storage.set_aside``: the node starts over as a wiped one."""
        self.set_aside_why.append(why)
        self.durable, self.unsynced, self.damaged = _Durable(), [], ""
        return Loaded(fresh=True, damaged=True, why=f"data directory damaged: {why}")

    def holds(self, index: int, term: int) -> bool:
        """Whether the durable state holds entry ``index`` of ``term``: in the log, or
        under the snapshot (which only ever covers committed entries)."""
        if index <= self.durable.snapshot_index:
            return True
        entry = self.entry(index)
        return entry is not None and entry[1] == term

    def entry(self, index: int) -> Record | None:
        """The durable log entry at ``index``, if the log (not the snapshot) holds it."""
        d = self.durable
        at = index - d.snapshot_index - 1
        if 0 <= at < len(d.entries):
            return d.entries[at]
        return None
