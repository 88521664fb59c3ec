"""Values the replica shares with its shell: roles, timing, durable state, log entries, effects.

Nothing here has behaviour beyond validation of its own fields. The replica
(``peers/replica.py``) consumes ``Timing`` and ``Durable`` and returns lists of
the effect dataclasses below; the shell executes them in order, except that all
persistence effects of one poll cycle (``PersistEntries``, ``TruncateLog``,
``PersistHardState``, ``PersistSnapshotChunk``, ``PersistSnapshot``) are made durable
before any ``Send`` or ``Publish`` of that cycle and before any client answer released
by ``Committed`` (group commit: one fsync per cycle, and nothing leaves the node that
claims state the disk does not hold yet).

One exception: in a cycle whose only persistence effects are ``PersistEntries``, a
primary's sends may leave before the sync, so that its fsync and the backups' overlap
(Raft thesis 10.2.1). An append claims nothing about the primary's disk, and an entry
commits only once a backup acknowledges it, which the replica can hear only after
that cycle's sync: the shell syncs before it hands the replica any further event.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

SNAPSHOT_CHUNK = 256 * 1024  # bytes of an image per snapshot message, by default
MAX_SNAPSHOT_CHUNK = 1024 * 1024  # the most a peer's snapshot message may carry


class ReplicaError(Exception):
    """Root of the replica's errors: a caller broke the replica's contract."""


class NotServing(ReplicaError):
    """``propose`` was called on a node that is not a serving primary."""


class CorruptState(ReplicaError):
    """The durable state handed to the replica is inconsistent (gap in the log, bad terms)."""


class Role(Enum):
    """What a node is doing in the triad. Transitions are listed in ``replica.TRANSITIONS``."""

    BACKUP = "backup"
    CANDIDATE = "candidate"
    PRIMARY = "primary"
    RECOVERING = "recovering"


@dataclass(frozen=True)
class Timing:
    """Protocol timing and batching. ``peer_timeout`` should be several heartbeats."""

    heartbeat_interval: float = 0.1
    peer_timeout: float = 0.5
    failback: bool = True
    max_batch: int = 256
    # entries kept before a snapshot so that a lagging backup can catch up from the log
    keep_tail: int = 10_000
    # bytes of an image per snapshot message sent (tests make it small: many chunks)
    snapshot_chunk: int = SNAPSHOT_CHUNK

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.peer_timeout:
            raise ValueError("timing needs 0 < heartbeat_interval < peer_timeout")
        if self.max_batch < 1 or self.keep_tail < 0:
            raise ValueError("timing needs max_batch >= 1 and keep_tail >= 0")
        if not 1 <= self.snapshot_chunk <= MAX_SNAPSHOT_CHUNK:
            raise ValueError(f"timing needs 1 <= snapshot_chunk <= {MAX_SNAPSHOT_CHUNK}")


# Not frozen: one is made per delta on every node, and a frozen dataclass's __init__
# sets each field through object.__setattr__. No one changes one once made.
@dataclass(slots=True)
class Entry:
    """One slot of the replicated log. ``delta`` None is the no-op a new primary appends."""

    term: int
    index: int
    delta: dict[str, Any] | None

    def to_wire(self) -> dict[str, Any]:
        return {"term": self.term, "index": self.index, "delta": self.delta}


# eq=False: two images are compared by identity, never by their 100 MB of bytes (nor
# hashed by them); weakref_slot: storage unmaps a file once no image of it is left.
@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class Image:
    """A snapshot of the ledger at committed ``index`` (of ``term``), as bytes.

    The bytes are the shell's (``broker/image.py`` writes and reads them); the replica only
    keeps the latest, sends it in chunks and checks a received one against ``crc``.
    ``buf`` is ``bytes``, a read-only ``memoryview`` (of a received ``bytearray``) or of an
    ``mmap`` of the snapshot file: never changed once made. Slicing it gives the chunks.
    """

    index: int
    term: int
    buf: Any  # bytes-like: len() and slicing
    crc: int  # zlib.crc32 of buf

    @property
    def size(self) -> int:
        return len(self.buf)

    def chunk(self, offset: int, limit: int) -> bytes:
        """The bytes from ``offset``, at most ``limit`` of them (a copy: it leaves the node)."""
        return bytes(self.buf[offset : offset + limit])

    @classmethod
    def of(cls, index: int, term: int, data: bytes) -> Image:
        """An image of ``data`` held in memory (tests and the simulation)."""
        return cls(index, term, data, zlib.crc32(data))


@dataclass
class Durable:
    """What the shell loaded from its data directory at start.

    ``entries`` must be contiguous; entries at or before ``snapshot.index`` are
    ignored (they are covered by the snapshot). ``commit`` is the highest index the
    shell knows to be committed and has applied to its ledger (at least
    ``snapshot.index``; the shell may simply pass ``snapshot.index``).
    ``fresh`` means the data directory was wiped or never initialised: the node
    starts RECOVERING.
    """

    term: int = 0
    voted_for: str | None = None
    snapshot: Image | None = None  # its index and term are where the log starts
    entries: list[Entry] = field(default_factory=list)
    commit: int = 0
    fresh: bool = False


# --- effects -------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send ``msg`` to peer ``to`` over the peer ROUTER (acknowledged traffic, may be lost)."""

    to: str
    msg: dict[str, Any]


@dataclass(frozen=True)
class Publish:
    """Publish ``msg`` (a heartbeat) on the PUB socket to both peers; may be lost."""

    msg: dict[str, Any]


@dataclass(frozen=True)
class PersistEntries:
    """Append these entries to the durable log (they follow the current durable last)."""

    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class TruncateLog:
    """Drop durable log entries with index >= ``from_index`` (never committed ones)."""

    from_index: int


@dataclass(frozen=True)
class PersistHardState:
    """Durably record the current term and the vote cast in it."""

    term: int
    voted_for: str | None


@dataclass(frozen=True)
class PersistSnapshotChunk:
    """Write this chunk of the snapshot being received from a peer at ``offset`` of its
    bytes. Offset 0 starts a new one (any partial one is discarded). Chunks come in order,
    without gaps: each starts where the one before ended."""

    index: int
    term: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class PersistSnapshot:
    """The snapshot received from a peer is complete and its crc checked: make it the
    node's durable snapshot (its bytes were written by ``PersistSnapshotChunk``); log
    entries at or before ``image.index`` become moot."""

    image: Image


@dataclass(frozen=True)
class Committed:
    """Entries up to ``upto`` are committed; ``entries`` are the newly committed ones, in order.

    A backup applies them to its ledger. The primary releases the client answers
    waiting on these indexes (and applies any it has not applied yet: entries
    adopted from the previous term). No-op entries have ``delta`` None.
    """

    upto: int
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class InstallSnapshot:
    """Replace the ledger with the image's, taken at committed ``image.index``."""

    image: Image


@dataclass(frozen=True)
class RoleChanged:
    """The node's role, term or known primary changed (for the shell's routing and logs).

    A primary that becomes anything else must rebuild its ledger from committed
    state: it may have applied deltas that will never commit.
    """

    role: Role
    term: int
    primary: str | None


@dataclass(frozen=True)
class Dropped:
    """A peer message was refused as malformed or hostile (for a counter and a log line)."""

    sender: str
    reason: str


Effect = (
    Send
    | Publish
    | PersistEntries
    | TruncateLog
    | PersistHardState
    | PersistSnapshotChunk
    | PersistSnapshot
    | Committed
    | InstallSnapshot
    | RoleChanged
    | Dropped
)
