"""The data directory: what a node must find again after a crash or restart.

Files, all in the node's data directory:

- ``node.lock``: holds the pid of the node's process, which locks it and the directory
  itself with ``flock`` for its life. The locks are taken before anything else is read,
  so a second process for the same directory leaves at once without touching a file
  (``DataDirLocked``, naming the holder). The kernel drops them when the holder dies,
  even by SIGKILL: they are never stale. The directory's lock is the one that holds when
  an administrator deletes the "stale" ``node.lock`` of a running node: a second process
  would lock a new file, then read the live log mid-write as damage and set it aside.
- ``DATA.progress``, beside the directory, not in it: the term and committed index the
  directory held, recorded each second (``save_progress``); a directory found below it
  was restored from an older copy, and is damage (``_check_progress``).
- ``node.json``: the marker ``{"node": name}``. Written by ``zbroker init`` (a brand-new
  triad) or when a node that lost its data has caught up again. A directory without it is
  *fresh*: the node may have voted or acknowledged deltas before its disk was lost, so it
  must not vote until it has caught up from a primary (peers/replica.py, RECOVERING).
  Whatever else a fresh directory holds (an earlier recovery cut short) is discarded.
- ``hardstate``: one record ``{"term", "voted_for"}``, replaced atomically (write, fsync,
  rename) before any vote or term change is announced. Written when the directory is
  first used, so that once a log exists a missing hardstate is damage.
- ``log``: records ``<u32 length><u32 crc32 of body><u32 crc32 of those 8 bytes><body:
  msgpack><end byte 0xA5>``. The first record is ``{"base": [index, term]}``: the
  snapshot the log follows (``[0, 0]`` before any). Then an entries record ``{"e":
  [[index, term, delta], ...]}`` per persistence effect (a batch: one pack, one checksum
  and one write for all its entries), or a truncation ``{"x": from_index}`` (cheaper than
  rewriting the file). The first entries record after the base may begin at or before
  the base (see the rewrite below): those entries are covered by the snapshot and skipped.
  The file is grown ahead with zeros and records overwrite them (see ``_extend``); at
  least one zero header always follows the last record.
- ``snapshot``: one record framed as the log's are, whose body is a snapshot image (the
  stream of msgpack objects ``broker/image.py`` writes: a head naming the committed
  index and term it was taken at, then records of sessions and of grants); the header's
  crc32 is the image's (``Image.crc``). Its temporary forms, each renamed to
  ``snapshot`` once complete: ``snapshot.taken.tmp``, written whole by the node's
  snapshot taker (broker/taker.py; ``write_taken``: the body, the end byte, the header,
  fsync), and ``snapshot.received.tmp``, written chunk by chunk as a peer sends it
  (``save_snapshot_chunk``: each chunk at 12 + its offset, fdatasynced as it comes, so
  that finishing it never syncs 100 MB at once) and finished by ``save_snapshot``
  (header and end byte, sync). A node serves the file through an ``mmap`` of it
  (``image()``): an image of a million grants is about 110 MB, and is never read into
  the heap. These files are never truncated in place, only unlinked and written anew or
  replaced by a rename: an Image still maps the old one (a read past the end of a
  mapping whose file shrank is a SIGBUS). Each mapping keeps its file open with a shared
  ``flock``, in whichever process maps it; a file with no name left is truncated a step
  at a time only once no mapping holds it (``_free``).

Compaction
----------
``save_snapshot`` renames the finished file to ``snapshot``, then rewrites the log to
follow it: a new base record, then the bytes of every record from the one that holds
entry ``index + 1`` on, copied as they are in the kernel (``copy_file_range``: never
unpacked and packed again, nor read into the heap), then zeros; the new log replaces the
old one atomically. The storage keeps, for each entries record of the log, its first and
last index and its offset, so finding where to copy from costs nothing; entries of that
first record at or before the base are skipped when the log is read. The rewrite costs
the bytes of the entries kept (the tail the log holds after the snapshot), never the size
of the ledger. The entries after the index are kept only when the log holds entry
``index`` of the snapshot's term (as ``peers.log.Log.install`` keeps them): otherwise
they are no continuation of the snapshot, and the log ends at its base. A crash between
the rename and the rewrite leaves a log that follows an older snapshot: ``load`` finishes
the rewrite.

The rewrite runs off the node's loop when the log continues the snapshot (always for a
snapshot taken; for one received, when the log holds its last entry): a worker thread
fsyncs the directory (the snapshot's rename), writes ``log.tmp`` (the base record, the
kept records up to the log's end at the hand-off, zeros) and fsyncs it, while the loop
goes on appending to and syncing the old log, which stays whole: until the switch a crash
leaves the old log, which ``load`` compacts again. At the first ``sync`` after the worker
is done the loop switches: it copies what it appended since the hand-off into
``log.tmp``, fdatasyncs it (before the rename: a rename kept without its tail would lose
acknowledged entries), renames it over ``log`` and reopens it, and that ``sync`` also
fsyncs the directory, so nothing written to the new file is acknowledged before its name
is durable. One compaction at a time: ``save_snapshot``, ``set_aside``, ``close`` and
``load`` first wait for one under way. When the log does not continue the snapshot (a
lagging node given a snapshot past its log), entries after the snapshot cannot go to the
old log, which does not lead up to them, and the snapshot's acknowledgement leaves with
this cycle: the rewrite (a base record and zeros) is done at once, with its fsyncs. An OS
error on the worker is a ``DiskError`` from the ``sync`` that would have switched.

Torn tails and damage
---------------------
An append writes over zeros after the last good record, and a crash keeps a prefix of
what was written since the last sync (a process crash always; a power loss when the
disk writes back in order). So a *torn tail* is exactly this, after the good records:

- zeros only, at least one header's worth (the normal end);
- or a header that fails its own checksum with only zeros after its 12 bytes (and the
  room the file was grown to for the record it began: a body, an end byte, a zero header);
- or a record whose header is sound but whose body fails its checksum, and whose end
  byte and everything after it are zeros: a write that never finished.

It is cut (overwritten with zeros), which loses nothing anyone was told: nothing
vouches for a record before the sync that completes it. A record whose checksums match
is whole and kept, even if a crash lost its end byte.

Everything else is *damage*: the disk can no longer vouch for what this node
acknowledged or voted. That is: a record written to its end (or with data after it)
that fails a checksum; a record reaching past the end of the file, or fewer than twelve
zero bytes after the last record (the file was cut short); a record whose checksums
match but whose content has the wrong shape (not a map, missing keys, wrong types,
entries that do not follow each other, terms that go down, a truncation outside the
log); a log that does not start with its base or follows a snapshot the directory does
not hold, or of a term other than the snapshot's at the base; a hardstate below the
terms of the log; a missing, cut or garbled hardstate, snapshot or marker (a snapshot
whose body fails its crc32, or whose head names no index and term). A snapshot file
whose image makes no ledger is found by the node, which calls ``set_aside``. (A marker
naming another node of the triad is a mistake of configuration, not damage:
``StorageError``.) The header's own checksum is what keeps a damaged length from passing
for a torn record that swallowed the records after it.

``load`` then moves the directory's files into ``damaged-<UTC time>/`` beside them, for
an administrator to inspect, and returns a fresh state (``Loaded.damaged``; the file,
offset and what was wrong in ``Loaded.why``): the node comes up as a wiped node does. A
power loss that wrote back a later page of the last write but not an earlier one also
reads as damage: safe, at the cost of a catch-up.

Disk errors: any OS error while writing, syncing, renaming or reading (a full disk,
EIO, a file size limit) raises ``DiskError`` naming the file and the error; the node
stops. Nothing it acknowledged is lost: nothing is acknowledged before its sync.

fsync policy: the shell writes every persistence effect of one poll cycle and then
calls ``sync()`` once, before it sends any acknowledgement or answer of that cycle
(group commit). With ``fsync = false`` in the config, ``sync()`` only flushes to the OS:
a power loss may then lose acknowledged deltas, a process crash does not. (Freeing an old
snapshot file, ``_free``, syncs each step all the same: those syncs pace the disk's work,
not durability.)
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import json
import mmap
import os
import queue
import struct
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from zbroker.broker.image import head_of, write_image
from zbroker.broker.seats import LedgerError
from zbroker.broker.wire import pack, unpack
from zbroker.peers.types import Image

if TYPE_CHECKING:
    from zbroker.broker.ledger import Ledger

_HEADER = struct.Struct("<III")  # length, crc32 of the body, crc32 of those 8 bytes
_LENGTH_CRC, _CRC = struct.Struct("<II"), struct.Struct("<I")  # _HEADER's two parts
_END = 0xA5  # the last byte of every record: a record that lacks it was never finished
_END_BYTE = bytes((_END,))
_ZERO_CHUNK = 1 << 20  # the log grows by this many zeros at a time
_SYNC_STEP = 1 << 18  # a rewritten log is synced this many bytes at a time (_log_tmp)
_FREE_STEP = 2 << 20  # a snapshot file no one maps any more is freed this much at a time
_FREE_PAUSE = 0.005  # seconds between two such steps: 110 MB are freed in about 0.5 s
MARKER = "node.json"
LOCK = "node.lock"
HARDSTATE = "hardstate"
SNAPSHOT = "snapshot"
TAKEN = "snapshot.taken.tmp"  # written by the snapshot taker (write_taken)
RECEIVED = "snapshot.received.tmp"  # written chunk by chunk from a peer
LOG = "log"
TMP_LOG = "log.tmp"  # a rewritten log (a compaction's, or a fresh one), renamed over LOG
_WRITE_BUFFER = 1 << 20  # the taker's writes of a snapshot image
_STATE = (MARKER, HARDSTATE, SNAPSHOT, LOG)  # what a load reads; the lock is not state
PROGRESS = ".progress"  # DATA.progress, beside the directory: see Storage.save_progress
DAMAGED = "damaged-"  # prefix of the folders that damaged files are moved into


class StorageError(Exception):
    """The data directory cannot be used; the message names the path."""


class DataDirLocked(StorageError):
    """Another process holds the data directory; the message names it and the holder."""


class DiskError(StorageError):
    """An I/O error (a full disk, EIO) on a file of the data directory; names the file."""


class _Damage(Exception):
    """Files that cannot vouch for this node's state; handled inside ``load``."""

    def __init__(self, path: Path, offset: int | None, what: str) -> None:
        at = "" if offset is None else f" at offset {offset}"
        super().__init__(f"{path}{at}: {what}")


@dataclass
class Loaded:
    """What the data directory held at start."""

    fresh: bool
    term: int = 0
    voted_for: str | None = None
    snapshot: Image | None = None  # over an mmap of the snapshot file; the log follows it
    entries: list[tuple[int, int, Any]] = field(default_factory=list)  # (index, term, delta)
    damaged: bool = False
    why: str = ""  # why the state is fresh: a new or wiped directory, or the damage found

    @property
    def snapshot_index(self) -> int:
        return 0 if self.snapshot is None else self.snapshot.index

    @property
    def snapshot_term(self) -> int:
        return 0 if self.snapshot is None else self.snapshot.term


# An entries record of the log: its first and last index (entries cut by a later
# truncation are not counted) and its offset in the file.
_Span = tuple[int, int, int]


@dataclass
class _Receiving:
    """The snapshot being received into RECEIVED: which one, and the bytes written."""

    index: int
    term: int
    fd: int
    size: int = 0


@dataclass
class _Compaction:
    """A log rewrite handed to a worker thread (``_rewrite``): the snapshot the new log
    follows, the old log's bytes it copies, and what it made (or the error it met)."""

    index: int
    term: int
    start: int  # the old log's offset of the first record kept
    end: int  # the old log's end at the hand-off: the worker copies start..end
    made: _LogTmp | None = None  # set by the worker once log.tmp is written (and synced)
    error: Exception | None = None  # an OSError, or a bug: the node stops either way
    done: threading.Event = field(default_factory=threading.Event)  # made or error is set


@dataclass
class _LogTmp:
    """A new log written into ``log.tmp``, not yet renamed over ``log``."""

    fd: int  # open for reading and writing
    head: int  # the base record's size: where the copied bytes start
    end: int  # where the records end
    size: int  # the file's size: zeros from ``end`` up to here


def progress_path(data_dir: Path) -> Path:
    """Where the node of ``data_dir`` records its progress: beside it (``save_progress``)."""
    return data_dir.with_name(data_dir.name + PROGRESS)


def write_marker(data_dir: Path, node: str) -> None:
    """Mark ``data_dir`` as holding ``node``'s state; a new directory gets an empty state
    first (term 0, an empty log), so that a marked directory always has both files.
    OSError when it cannot be written."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / HARDSTATE).exists() and not (data_dir / LOG).exists():
        # A brand-new node: a progress record beside it is an earlier triad's, and would
        # make its first load set the new state aside (all three: none left to recover).
        progress_path(data_dir).unlink(missing_ok=True)
        _replace(data_dir / HARDSTATE, _frame({"term": 0, "voted_for": None}))
        _replace(data_dir / LOG, _frame({"base": [0, 0]}) + bytes(_ZERO_CHUNK))
        _fsync_dir(data_dir)
    _replace(data_dir / MARKER, json.dumps({"node": node}).encode())


def bootstrap(data_dir: Path, node: str) -> None:
    """Give a brand-new triad's node its empty state and marker: a state it may vote with.

    StorageError unless ``data_dir`` is absent or empty: marking a directory that held a
    node's state, or lost it, would let that node vote with a history it does not have. A
    node whose data is lost needs nothing: it starts as a wiped one and catches up.
    """
    try:
        if data_dir.exists() and any(data_dir.iterdir()):
            raise StorageError(
                f"{data_dir}: not empty; bootstrap is only for the empty data directory of a"
                " brand-new triad's node (a node whose data was lost catches up on its own)"
            )
        write_marker(data_dir, node)
    except OSError as exc:
        raise DiskError(f"{data_dir}: cannot write the node's first state: {exc}") from None


class Storage:
    """One node's data directory. ``load`` first (it locks); then the persistence effects."""

    def __init__(
        self, data_dir: Path, node: str, *, fsync: bool = True, nodes: Collection[str] = ()
    ) -> None:
        self.dir = data_dir
        self.node = node
        self.nodes = frozenset(nodes)  # the triad's names: a marker naming one is no damage
        self.fsync = fsync
        self._lock_fd: int | None = None  # node.lock's
        self._dir_lock_fd: int | None = None  # the directory's
        self._log: BinaryIO | None = None  # opened by load(), at the end of the good records
        self._zeroed = 0  # the file's size: zeros from the write position up to here
        self._dirty = False
        self._failed = False  # a write or sync failed: the node stops, close() skips the sync
        self.last = 0  # index of the last entry written (durable after the next sync)
        self._base = (0, 0)  # the log's base record: the (index, term) it follows
        self._spans: list[_Span] = []  # the log's entries records that hold entries, in order
        self._image: Image | None = None  # the snapshot file, mapped
        self._receiving: _Receiving | None = None
        self._compaction: _Compaction | None = None  # a log rewrite under way off the loop
        self._dir_unsynced = False  # a rename the next sync() makes durable
        self._term = 0  # the hard state's, as last written or read

    # --- start-up
    def lock(self) -> None:
        """Own the directory (created if missing) for the life of this process."""
        if self._lock_fd is not None:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise StorageError(f"{self.dir}: not a directory; give the node its own") from None
        except OSError as exc:
            raise StorageError(
                f"{self.dir}: cannot create the data directory: {_os(exc)}"
            ) from None
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise StorageError(f"{self.dir}: the data directory is not writable by this user")
        path = self.dir / LOCK
        try:
            dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(f"{path}: cannot open the lock file: {_os(exc)}") from None
        try:
            # The directory first: a node.lock deleted under a running node is a new
            # file, free to lock; the directory stays the same.
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a node of an older version
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            os.close(dir_fd)
            raise DataDirLocked(
                f"{self.dir}: the data directory is in use by another process (pid {holder});"
                f" is node {self.node} already running? One process per data directory"
            ) from None
        except OSError as exc:
            os.close(fd)
            os.close(dir_fd)
            raise StorageError(f"{path}: cannot lock the data directory: {_os(exc)}") from None
        try:
            os.ftruncate(fd, 0)
            _pwrite_all(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            os.close(dir_fd)
            raise DiskError(f"{path}: cannot write: {_os(exc)}") from None
        self._lock_fd, self._dir_lock_fd = fd, dir_fd

    def load(self) -> Loaded:
        """Lock, then read the data directory; call once, before any write.

        Damage is set aside (see the module docstring) and the state returned is fresh.
        """
        self.lock()
        self._abandon()
        _REWRITER.start()  # at start-up, not at the first compaction: see _Rewriter
        try:
            return self._read()
        except _Damage as damage:
            return self.set_aside(str(damage))
        except OSError as exc:
            where = exc.filename or self.dir
            room = ""
            if exc.errno == errno.ENOSPC:  # what the disk needs beyond the node's data
                room = (
                    f"; free {2 * _ZERO_CHUNK >> 20} MiB beyond the data on its disk: the log "
                    "is laid ahead in 1 MiB of zeros, and finishing a compaction at start "
                    "writes a second log beside it"
                )
            raise DiskError(f"{where}: cannot use the data directory: {_os(exc)}{room}") from None

    def set_aside(self, why: str) -> Loaded:
        """Move the directory's state into ``damaged-<UTC time>/``; start it afresh.

        Also for damage the caller finds (a snapshot whose ledger does not load).
        """
        self._abandon()  # its log.tmp goes aside with the rest
        if self._log is not None:
            self._log.close()
            self._log = None
        self._drop_received()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())  # for the administrator
        try:
            target = self.dir / f"{DAMAGED}{stamp}"
            n = 1
            while target.exists():
                n += 1
                target = self.dir / f"{DAMAGED}{stamp}-{n}"
            target.mkdir()
            for name in sorted(os.listdir(self.dir)):
                if name in _STATE or name.endswith(".tmp"):
                    os.rename(self.dir / name, target / name)
            if self.fsync:
                _fsync_dir(self.dir)
            self._empty_state()
        except OSError as exc:
            raise DiskError(f"{self.dir}: cannot set damaged files aside: {_os(exc)}") from None
        return Loaded(
            fresh=True,
            damaged=True,
            why=f"data directory damaged: {why}; its files were moved to {target}",
        )

    def _read(self) -> Loaded:
        for name in os.listdir(self.dir):
            if name.endswith(".tmp"):
                os.unlink(self.dir / name)  # a replace cut short: the old file still holds
        if not (self.dir / MARKER).exists():
            return self._start_fresh()
        self._check_marker()
        hard = self._read_record_file(HARDSTATE, _hard_state)
        if hard is None:
            raise _Damage(self.dir / HARDSTATE, None, "missing (a marked directory has one)")
        snap = _map_snapshot(self.dir / SNAPSHOT, check=True) if self._has(SNAPSHOT) else None
        path = self.dir / LOG
        if not path.exists():
            raise _Damage(path, None, "missing (a marked directory has one)")
        term, voted_for = hard
        self._term = term
        data = path.read_bytes()
        records, good_end, torn_end = _scan(path, data)
        base, entries, spans = _replay(path, records)
        snap_index, snap_term = (snap.index, snap.term) if snap is not None else (0, 0)
        _check_snapshot(path, base, snap_index, snap_term, snap is not None)
        top = max(snap_term, entries[-1][1] if entries else base[1])
        if term < top:
            raise _Damage(
                self.dir / HARDSTATE, None, f"term {term} is below the log's last term {top}"
            )
        self._open_log(good_end, len(data), torn_end)
        self._base, self._spans, self._image = base, spans, snap
        self.last = entries[-1][0] if entries else base[0]
        self._check_progress(term, max(self.last, snap_index))
        if snap_index != base[0]:
            # A compaction stored its snapshot, then stopped before it rewrote the log:
            # finish it, so that the entries appended next follow the snapshot on disk too.
            self._compact_log(snap_index, snap_term)
        kept = [e for e in entries if e[0] > snap_index] if self.last > snap_index else []
        return Loaded(fresh=False, term=term, voted_for=voted_for, snapshot=snap, entries=kept)

    def _has(self, name: str) -> bool:
        return (self.dir / name).exists()

    @property
    def progress_path(self) -> Path:
        return progress_path(self.dir)

    def save_progress(self, commit: int) -> str | None:
        """Record beside the directory, after a sync, that it held its term and the
        committed entries up to ``commit`` (as far as it holds them): a copy of the
        directory restored later (a backup, a copy taken before an upgrade) is consistent,
        only old, and would vote with grants it lost; ``load`` finds it older than this.
        Beside, not in it, to outlive such a restore (not a whole machine's, which takes
        this file back too). No fsync: a record lost or older only weakens the check.
        Why it could not be written, if so: the node serves on without the check (the
        directory's parent may not be writable)."""
        image = self._image.index if self._image is not None else 0
        index = min(commit, max(self.last, image))
        record = {"node": self.node, "term": self._term, "index": index}
        try:
            _replace(self.progress_path, json.dumps(record).encode(), fsync=False)
        except OSError as exc:
            return f"{self.progress_path}: cannot write: {_os(exc)}"
        return None

    def _check_progress(self, term: int, last: int) -> None:
        """_Damage when the directory is older than its progress record says it was. A
        single server's directory is its only copy: better served old than emptied."""
        if len(self.nodes) < 2:
            return
        try:
            seen = json.loads(self.progress_path.read_bytes())
            then, index = int(seen["term"]), int(seen["index"])
            mine = seen["node"] == self.node
        except (OSError, ValueError, TypeError, KeyError):
            return  # none yet, or unreadable: nothing to compare with
        if mine and (then > term or index > last):
            raise _Damage(
                self.dir,
                None,
                f"older than this node has been: it held term {then} and entry {index} "
                f"({self.progress_path}), the directory holds term {term} and entries to "
                f"{last}: a copy restored from a backup, or a log whose end was lost? It "
                "must not vote with grants it lost: it recovers from its peers",
            )

    def _start_fresh(self) -> Loaded:
        left = [n for n in (HARDSTATE, SNAPSHOT, LOG) if self._has(n)]
        for name in left:
            os.unlink(self.dir / name)  # they vouch for nothing without the marker
        self._empty_state()
        why = f"{self.dir} has no {MARKER}: a new or wiped data directory"
        if left:
            why += f" (discarded {', '.join(left)}: from an earlier start that never caught up)"
        return Loaded(fresh=True, why=why)

    def _check_marker(self) -> None:
        path = self.dir / MARKER
        try:
            marker = json.loads(path.read_bytes().decode())
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
            raise _Damage(path, None, f"not a marker: {exc}") from None
        owner = marker.get("node") if isinstance(marker, dict) else None
        if not isinstance(owner, str) or len(marker) != 1:
            raise _Damage(path, None, 'not a marker: expected {"node": name}')
        if owner == self.node:
            return
        if owner in self.nodes or not self.nodes:
            raise StorageError(
                f"{path}: this data directory belongs to node {owner!r}, not {self.node!r};"
                " check the data setting of each node in the config"
            )
        raise _Damage(path, None, f"names node {owner!r}, which is not in this triad")

    # --- persistence effects
    def append(self, entries: list[tuple[int, int, Any]]) -> None:
        if entries:
            offset = self._write({"e": entries})
            self._spans.append((entries[0][0], entries[-1][0], offset))
            self.last = entries[-1][0]

    def truncate(self, from_index: int) -> None:
        if from_index > self.last:
            return  # nothing to cut (a compaction may have dropped the tail already)
        self._write({"x": from_index})
        self.last = from_index - 1
        spans = self._spans
        while spans and spans[-1][0] >= from_index:
            spans.pop()
        if spans and spans[-1][1] >= from_index:
            spans[-1] = (spans[-1][0], from_index - 1, spans[-1][2])

    def save_hard_state(self, term: int, voted_for: str | None) -> None:
        self._replace_record(HARDSTATE, {"term": term, "voted_for": voted_for})
        self._term = term

    # --- snapshots
    def write_taken(self, ledger: Ledger, index: int, term: int) -> None:
        """Write ``ledger``'s image (holding every delta up to ``index``, of ``term``) into
        ``snapshot.taken.tmp``: the body, the end byte, then the header, then fsync.

        For the snapshot taker, a process of its own (broker/taker.py): plain file I/O on a
        file of its own, nothing of the node's touched (the log, the lock), no logging.
        DiskError when it cannot.
        """
        path = self.dir / TAKEN
        try:
            _unlink(path)
            with open(path, "xb", buffering=_WRITE_BUFFER) as out:
                out.write(bytes(_HEADER.size))
                paced = _Paced(out, sync=self.fsync)
                size, crc = write_image(ledger, index, term, paced)
                out.write(_END_BYTE)
                out.flush()
                _pwrite_all(out.fileno(), _header(size, crc), 0)
                if self.fsync:
                    os.fsync(out.fileno())
        except OSError as exc:
            raise DiskError(f"{path}: cannot write: {_os(exc)}") from None

    def taken_image(self, index: int, term: int) -> Image:
        """The image the taker wrote by ``write_taken``, over an mmap of its file (its crc
        is the header's: a taker that said it is done wrote it whole). StorageError when the file is
        not that snapshot."""
        path = self.dir / TAKEN
        try:
            image = _map_snapshot(path, check=False)
        except _Damage as damage:
            raise StorageError(f"the snapshot taken is unusable: {damage}") from None
        except OSError as exc:
            raise DiskError(f"{path}: cannot read: {_os(exc)}") from None
        if (image.index, image.term) != (index, term):
            raise StorageError(
                f"{path}: holds the snapshot at {image.index} of term {image.term},"
                f" not the one at {index} of term {term}"
            )
        return image

    def save_snapshot_chunk(self, index: int, term: int, offset: int, data: bytes) -> None:
        """Write a chunk of the snapshot a peer sends into ``snapshot.received.tmp``, at
        12 + ``offset``; offset 0 starts it afresh. Chunks come in order, without gaps:
        StorageError for one that does not follow. Synced as it is written when fsync
        is on, so that completing a 100 MB image syncs only its last chunk."""
        path = self.dir / RECEIVED
        try:
            if offset == 0:
                self._drop_received()
                _unlink(path)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                self._receiving = _Receiving(index, term, fd)
            got = self._receiving
            if got is None or (got.index, got.term, got.size) != (index, term, offset):
                had = "none" if got is None else f"{got.size} bytes of {got.index}/{got.term}"
                raise StorageError(
                    f"{path}: a chunk at {offset} of the snapshot at {index} of term {term}"
                    f" does not follow what was received ({had})"
                )
            _pwrite_all(got.fd, data, _HEADER.size + offset)
            if self.fsync:
                os.fdatasync(got.fd)
            got.size += len(data)
        except OSError as exc:
            raise self._disk_error(RECEIVED, exc) from None

    def save_snapshot(self, image: Image, source: str) -> None:
        """Make ``image`` the node's snapshot: finish its file (``source``: "taken", a
        taker's ``snapshot.taken.tmp``; "received", the chunks of
        ``snapshot.received.tmp``), rename it to ``snapshot``, then rewrite the log to
        follow it, off the loop when the log continues it (the module docstring)."""
        if source not in ("taken", "received"):
            raise ValueError(f"source {source!r}: 'taken' or 'received'")
        self._settle()  # one compaction at a time
        if image.index < self._base[0]:
            raise StorageError(
                f"{self.dir / SNAPSHOT}: a snapshot at {image.index} is older than the"
                f" log's base {self._base[0]}"
            )
        name = TAKEN if source == "taken" else RECEIVED
        try:
            if source == "received":
                self._finish_received(image)
            # On the loop: a rename is cheap (the old file's blocks are freed when its
            # last mapping goes, on the unmapping thread); its directory fsync is not.
            os.replace(self.dir / name, self.dir / SNAPSHOT)
        except OSError as exc:
            raise self._disk_error(name, exc) from None
        if source == "taken":
            self._image = image  # a mapping of the file just renamed: the same inode
        else:  # built in memory from the chunks: serve the file instead (lazily mapped)
            try:
                self._image = _map_snapshot(self.dir / SNAPSHOT, check=False)
            except (_Damage, OSError) as exc:
                self._failed = True
                raise DiskError(f"{self.dir / SNAPSHOT}: cannot read back: {exc}") from None
        try:
            assert self._log is not None
            self._log.flush()
            end = self._log.tell()
            start = self._kept_from(image.index, image.term, end)
            if start is None:
                if self.fsync:
                    _fsync_dir(self.dir)  # the snapshot's name, before a log that follows it
                self._compact_log(image.index, image.term)
                return
            job = _Compaction(image.index, image.term, start, end)
            _REWRITER.submit(job, self.dir, os.dup(self._log.fileno()), self.fsync)
            self._compaction = job
        except OSError as exc:
            raise self._disk_error(LOG, exc) from None

    def image(self) -> Image | None:
        """The node's snapshot, over an mmap of its file (None before any)."""
        return self._image

    def _finish_received(self, image: Image) -> None:
        got = self._receiving
        if got is None or (got.index, got.term, got.size) != (image.index, image.term, image.size):
            had = "nothing" if got is None else f"{got.size} bytes of {got.index}/{got.term}"
            raise StorageError(
                f"{self.dir / RECEIVED}: holds {had}, not the {image.size} bytes of the"
                f" snapshot at {image.index} of term {image.term}"
            )
        _pwrite_all(got.fd, _header(image.size, image.crc), 0)
        _pwrite_all(got.fd, _END_BYTE, _HEADER.size + image.size)
        if self.fsync:
            os.fdatasync(got.fd)
        self._drop_received()

    def _drop_received(self) -> None:
        if self._receiving is not None:
            with contextlib.suppress(OSError):
                os.close(self._receiving.fd)
            self._receiving = None

    def mark_recovered(self) -> None:
        try:
            write_marker(self.dir, self.node)
        except OSError as exc:
            raise self._disk_error(MARKER, exc) from None

    def sync(self) -> None:
        """Group commit: make everything written since the last sync durable. First
        switches to the log a compaction rewrote off the loop, once it is written."""
        if self._compaction is not None and self._compaction.done.is_set():
            self._switch()
        try:
            if self._dirty and self._log is not None:
                self._log.flush()
                if self.fsync:
                    os.fdatasync(self._log.fileno())  # the data and the size: all a reader needs
                self._dirty = False
            if self._dir_unsynced:
                _fsync_dir(self.dir)  # the switch's rename: before anything in the new log is acked
                self._dir_unsynced = False
        except OSError as exc:
            raise self._disk_error(LOG, exc) from None

    def close(self) -> None:
        """Sync and release the files and the lock; DiskError if that last sync fails, or
        the rewrite of a compaction under way (waited for) failed."""
        try:
            if not self._failed:
                self._settle()
                self.sync()
        finally:
            self._abandon()
            if self._log is not None:
                # A write that failed already stopped the node and said why.
                with contextlib.suppress(OSError):
                    self._log.close()
                self._log = None
            self._drop_received()
            for fd in (self._lock_fd, self._dir_lock_fd):
                if fd is not None:
                    os.close(fd)  # releases its flock
            self._lock_fd = self._dir_lock_fd = None

    # --- internals
    def _empty_state(self) -> None:
        """Term 0, no vote, an empty log: where a fresh node starts, unmarked."""
        _replace(self.dir / HARDSTATE, _frame({"term": 0, "voted_for": None}), fsync=self.fsync)
        self._term = 0
        self._image = None
        self._new_log(0, 0)

    def _compact_log(self, index: int, term: int) -> None:
        """Rewrite the log to follow the snapshot at ``index`` (of ``term``): the records
        from the one holding entry index + 1 on, copied byte for byte; none when the log
        does not hold entry ``index`` of ``term`` (see the module docstring)."""
        assert self._log is not None
        self._log.flush()
        end = self._log.tell()
        start = self._kept_from(index, term, end)
        start = end if start is None else start
        spans, last = self._spans, self.last
        made = _log_tmp(self.dir, index, term, (self._log.fileno(), start, end), self.fsync)
        self._replace_log(made, index, term)
        if self.fsync:
            _fsync_dir(self.dir)
            self._dir_unsynced = False
        shift = made.head - start
        self._spans = [(first, upto, at + shift) for first, upto, at in spans if at >= start]
        if self._spans:
            self.last = last

    def _kept_from(self, index: int, term: int, end: int) -> int | None:
        """Where the records a compaction to ``index`` (of ``term``) keeps start in the
        log (``end``, the log's end, when none follow it); None when the log does not hold
        entry ``index`` of ``term``: what follows is no continuation of the snapshot."""
        if self._term_at(index) != term:
            return None
        held = self._span_of(index + 1)
        return end if held is None else held[2]

    def _new_log(self, base: int, term: int) -> None:
        """Replace the log with its base record and zeros to write over."""
        self._replace_log(_log_tmp(self.dir, base, term, None, self.fsync), base, term)
        if self.fsync:
            _fsync_dir(self.dir)
            self._dir_unsynced = False

    def _replace_log(self, made: _LogTmp, base: int, term: int) -> None:
        """Rename ``log.tmp`` (written whole, and synced when fsync is on) over the log
        and write on at its end; the directory's fsync is the caller's."""
        try:
            os.replace(self.dir / TMP_LOG, self.dir / LOG)
        finally:
            os.close(made.fd)
        self._open_log(made.end, made.size, made.end)
        self._base = (base, term)
        self._spans = []
        self.last = base
        self._dirty = False  # what the old log held unsynced was copied, and synced with it

    def _switch(self) -> None:
        """Finish the compaction the worker did (the module docstring): the records the
        loop appended since the hand-off copied after the worker's, ``log.tmp`` synced,
        then renamed over the log; the next sync() fsyncs the directory."""
        job, log = self._compaction, self._log
        assert job is not None and log is not None
        job.done.wait()
        self._compaction = None
        made = job.made
        if made is None:
            self._failed = True
            why = _os(job.error) if isinstance(job.error, OSError) else repr(job.error)
            raise DiskError(f"{self.dir / TMP_LOG}: cannot write: {why}")
        try:
            log.flush()
            added = log.tell() - job.end
            _copy_range(log.fileno(), made.fd, job.end, added, made.end)
            made.end += added
            if made.end + _HEADER.size > made.size:  # more than the worker's zeros came
                _pwrite_all(made.fd, bytes(_ZERO_CHUNK), made.end)
                made.size = made.end + _ZERO_CHUNK
            if self.fsync:
                os.fdatasync(made.fd)
        except OSError as exc:
            os.close(made.fd)
            raise self._disk_error(TMP_LOG, exc) from None
        spans, last = self._spans, self.last
        try:
            self._replace_log(made, job.index, job.term)
        except OSError as exc:
            raise self._disk_error(LOG, exc) from None
        shift = made.head - job.start
        self._spans = [(first, upto, at + shift) for first, upto, at in spans if at >= job.start]
        if self._spans:
            self.last = last
        self._dir_unsynced = self.fsync

    def _settle(self) -> None:
        """Wait for the compaction under way, if any, and switch to its log."""
        if self._compaction is not None:
            self._switch()

    def _abandon(self) -> None:
        """Wait for the compaction under way, if any, and drop what it made: the old log
        stays (``load`` compacts it again), ``log.tmp`` is removed at the next load."""
        job, self._compaction = self._compaction, None
        if job is not None:
            job.done.wait()
            if job.made is not None:
                with contextlib.suppress(OSError):
                    os.close(job.made.fd)

    def _span_of(self, index: int) -> _Span | None:
        """The entries record that holds entry ``index``, if the log holds it."""
        at = bisect.bisect_right(self._spans, index, key=lambda span: span[0]) - 1
        if at >= 0 and self._spans[at][1] >= index:
            return self._spans[at]
        return None

    def _term_at(self, index: int) -> int | None:
        """The term of entry ``index`` in the log (the base's at the base), read back
        from its record; None when the log does not hold it."""
        if index == self._base[0]:
            return self._base[1]
        span = self._span_of(index)
        if span is None or self._log is None:
            return None
        fd = self._log.fileno()
        length = _HEADER.unpack(_pread_all(fd, _HEADER.size, span[2]))[0]
        record = unpack(_pread_all(fd, length, span[2] + _HEADER.size))
        term: int = record["e"][index - span[0]][1]
        return term

    def _open_log(self, end: int, size: int, torn_end: int) -> None:
        """Hold the log open for writing at ``end``; zero a torn tail up to ``torn_end``."""
        if self._log is not None:
            self._log.close()
        self._log = open(self.dir / LOG, "r+b")  # noqa: SIM115 - held open for writes
        if torn_end > end:
            _pwrite_all(self._log.fileno(), bytes(torn_end - end), end)
            if self.fsync:
                os.fdatasync(self._log.fileno())
        self._log.seek(end)
        self._zeroed = size

    def _extend(self, log: BinaryIO, size: int) -> None:
        """Make the file long enough, with zeros, for ``size`` more bytes where the next
        record goes, and a zero header after them.

        Records are then written over zeros inside the file instead of growing it, so the
        per-cycle ``fdatasync`` has no file size or block map to commit: it took about
        90 us here against 190 us for an append (BENCHMARKS.md). Only the first sync after
        an extension pays for the new blocks. The zero header after the last record is
        what tells a log cut short from one that ends there.
        """
        if log.tell() + size + _HEADER.size <= self._zeroed:
            return
        grow = max(_ZERO_CHUNK, size + _HEADER.size)
        _pwrite_all(log.fileno(), bytes(grow), self._zeroed)  # leaves the file position
        self._zeroed += grow

    def _write(self, record: dict[str, Any]) -> int:
        """Append ``record`` to the log; the offset it starts at."""
        if self._log is None:
            raise StorageError(f"{self.dir}: the data directory was not loaded before a write")
        data = _frame(record)
        try:
            self._extend(self._log, len(data))
            offset = self._log.tell()
            self._log.write(data)
        except OSError as exc:
            raise self._disk_error(LOG, exc) from None
        self._dirty = True
        return offset

    def _replace_record(self, name: str, record: dict[str, Any]) -> None:
        try:
            _replace(self.dir / name, _frame(record), fsync=self.fsync)
        except OSError as exc:
            raise self._disk_error(name, exc) from None

    def _disk_error(self, name: str, exc: OSError) -> DiskError:
        self._failed = True
        return DiskError(f"{self.dir / name}: cannot write: {_os(exc)}")

    def _read_record_file(self, name: str, shape: Any) -> Any:
        """The one record of ``name`` checked by ``shape``, or None if there is no file."""
        path = self.dir / name
        if not path.exists():
            return None
        data = path.read_bytes()
        if len(data) < _HEADER.size:
            raise _Damage(path, 0, f"cut short: {len(data)} bytes, not even a record header")
        length, crc, header_crc = _HEADER.unpack_from(data)
        if zlib.crc32(data[:8]) != header_crc:
            raise _Damage(path, 0, "the record header fails its checksum")
        if len(data) != _HEADER.size + length + 1:
            raise _Damage(path, 0, f"the record says {length} bytes, the file has {len(data)}")
        body = data[_HEADER.size : -1]
        if zlib.crc32(body) != crc:
            raise _Damage(path, 0, "checksum mismatch")
        if data[-1] not in (_END, 0):
            raise _Damage(path, len(data) - 1, f"end byte {data[-1]:#x}, not {_END:#x}")
        return shape(path, _decode(path, 0, body))


# --- reading the log: framing, then shape


def _scan(path: Path, data: bytes) -> tuple[list[tuple[int, Any]], int, int]:
    """The (offset, record) of each good record, where they end, and where a torn tail
    ends (the good end when there is none). ``_Damage`` for anything else."""
    records: list[tuple[int, Any]] = []
    pos, size = 0, len(data)
    while True:
        if size - pos < _HEADER.size:
            raise _Damage(path, pos, f"cut short: {size - pos} bytes after the last record")
        length, crc, header_crc = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length + 1
        header_ok = zlib.crc32(data[pos : pos + 8]) == header_crc
        if header_ok and end <= size:
            body = data[pos + _HEADER.size : end - 1]
            if zlib.crc32(body) == crc:
                if data[end - 1] not in (_END, 0):
                    raise _Damage(path, end - 1, f"end byte {data[end - 1]:#x}, not {_END:#x}")
                records.append((pos, _decode(path, pos, body)))
                pos = end
                continue
        # Not a good record: the end of the log, a torn tail, or damage.
        tail = max(pos, len(data.rstrip(b"\0")))  # one past the last non-zero byte
        if tail == pos:
            return records, pos, pos  # zeros to the end: the normal end of the log
        if not header_ok:
            if tail <= pos + _HEADER.size:
                # A header never finished: a torn tail, if the file still has the room
                # it was grown to for that record (a body, an end byte, a zero header).
                if size - pos < 2 * _HEADER.size + 2:
                    raise _Damage(path, pos, f"cut short: {size - pos} bytes from a torn header")
                return records, pos, tail
            raise _Damage(path, pos, "a record header that fails its checksum, data after it")
        if end > size:
            raise _Damage(path, pos, f"a record of {length} bytes reaches past the end of the file")
        if tail < end:
            return records, pos, tail  # an append that never finished: a torn tail
        raise _Damage(path, pos, "checksum mismatch in a record written to its end")


def _replay(
    path: Path, records: list[tuple[int, Any]]
) -> tuple[tuple[int, int], list[Any], list[_Span]]:
    """The log's base (index, term), its entries after the base, and the spans of its
    entries records (``_Span``), once every record is checked."""
    if not records:
        raise _Damage(path, 0, "no base record: every log starts with one")
    first_off, first = records[0]
    base = first.get("base") if isinstance(first, dict) and len(first) == 1 else None
    if not (isinstance(base, list) and len(base) == 2 and all(_count(v) for v in base)):
        raise _Damage(path, first_off, 'the first record is not {"base": [index, term]}')
    entries: list[tuple[int, int, Any]] = []
    spans: list[_Span] = []
    last, last_term = base
    for n, (offset, record) in enumerate(records[1:]):
        if not isinstance(record, dict) or len(record) != 1:
            raise _Damage(path, offset, "a record must be a map of one kind")
        if "e" in record:
            batch = record["e"]
            if not isinstance(batch, list) or not batch:
                raise _Damage(path, offset, "an entries record needs a list of entries")
            # A compaction copies the record holding the entry after its snapshot whole:
            # the entries of it up to the base are the snapshot's.
            covered = _covered(path, offset, batch, base[0]) if n == 0 else 0
            for item in batch[covered:]:
                index, term = _entry(path, offset, item, last, last_term)
                entries.append((index, term, item[2]))
                last, last_term = index, term
            spans.append((batch[0][0], last, offset))
        elif "x" in record:
            cut = record["x"]
            if not (_count(cut) and base[0] < cut <= last + 1):
                raise _Damage(path, offset, f"truncation at {cut!r} outside ({base[0]}, {last}]")
            del entries[cut - base[0] - 1 :]
            last = cut - 1
            last_term = entries[-1][1] if entries else base[1]
            while spans and spans[-1][0] >= cut:
                spans.pop()
            if spans and spans[-1][1] >= cut:
                spans[-1] = (spans[-1][0], cut - 1, spans[-1][2])
        else:
            raise _Damage(path, offset, f"unknown record kind {next(iter(record))!r}")
    return (base[0], base[1]), entries, spans


def _covered(path: Path, offset: int, batch: list[Any], base: int) -> int:
    """How many entries at the start of ``batch`` are at or before ``base``: consecutive
    entries ending at the base, whose terms the snapshot vouches for."""
    first = batch[0]
    if not (isinstance(first, list) and len(first) == 3 and _count(first[0])):
        raise _Damage(path, offset, "an entry must be [index, term, delta]")
    covered = max(0, min(base - first[0] + 1, len(batch)))
    for i, item in enumerate(batch[:covered]):
        if not (isinstance(item, list) and len(item) == 3 and item[0] == first[0] + i):
            raise _Damage(path, offset, "entries before the base that do not follow each other")
    if covered == len(batch):
        raise _Damage(path, offset, f"entries {first[0]}.. are all at or before the base {base}")
    return covered


def _entry(path: Path, offset: int, item: Any, last: int, last_term: int) -> tuple[int, int]:
    if not (isinstance(item, list) and len(item) == 3 and _count(item[0]) and _count(item[1])):
        raise _Damage(path, offset, "an entry must be [index, term, delta]")
    index, term, delta = item
    if index != last + 1:
        raise _Damage(path, offset, f"entry {index} does not follow entry {last}")
    if term < max(1, last_term):
        raise _Damage(path, offset, f"entry {index} has term {term}, below {last_term} before it")
    if delta is not None and not (isinstance(delta, dict) and isinstance(delta.get("k"), str)):
        raise _Damage(path, offset, f"entry {index}: its delta is not a map with a kind")
    return index, term


def _check_snapshot(
    path: Path, base: tuple[int, int], snap_index: int, snap_term: int, have: bool
) -> None:
    """The log follows the snapshot the directory holds (or an older one: a compaction
    stores its snapshot before it rewrites the log)."""
    snapshot = path.with_name(SNAPSHOT)
    if not have and base[0] > 0:
        raise _Damage(snapshot, None, f"missing, though the log follows one at index {base[0]}")
    if snap_index < base[0]:
        raise _Damage(snapshot, 0, f"at index {snap_index}, older than the log's base {base[0]}")
    if have and snap_index == base[0] and snap_term != base[1]:
        raise _Damage(snapshot, 0, f"of term {snap_term}, the log's base of term {base[1]}")


def read_log(data_dir: Path) -> tuple[Image | None, list[tuple[int, int, Any]]]:
    """The snapshot and the log's entries after the log's base, as another process reads
    them while the node runs (its snapshot taker, broker/taker.py).

    The node appends meanwhile, and may replace either file by a rename: each is read
    whole through one open, so it is one version of it; the log's end may be a record
    being written, read as a torn tail. The snapshot may be newer than the log's base (a
    compaction between its two renames): the entries then include some it covers.
    Committed entries are what the caller may rely on: a record not yet flushed is
    simply not there yet. StorageError when the files do not read as a log.
    """
    path = data_dir / LOG
    try:
        snapshot = _map_snapshot(data_dir / SNAPSHOT, check=False)
    except FileNotFoundError:
        snapshot = None
    except (_Damage, OSError) as exc:
        raise StorageError(f"{data_dir / SNAPSHOT}: cannot read: {exc}") from None
    try:
        records = _scan(path, path.read_bytes())[0]
        _, entries, _ = _replay(path, records)
    except (_Damage, OSError) as exc:
        raise StorageError(f"{path}: cannot read: {exc}") from None
    return snapshot, entries


class _Unmapper:
    """Unmaps the snapshot files that no image uses any more, on a thread of its own.

    Unmapping a 110 MB snapshot whose file was renamed over (a compaction) frees its
    blocks and its page cache: about 25 ms here with nothing else running, more on a busy
    disk, and it would happen in the node's loop when the last image of it is dropped
    there. ``mmap.close`` releases the GIL, so on this thread it costs the loop nothing.
    Each mapping is held here until its image is gone (a weakref callback), so that the
    loop only ever drops references to it, never the mapping itself.

    The blocks themselves are freed a step at a time (``_free``): freed at once, 110 MB
    made one journal commit that held the loop's next fdatasync about 20-25 ms here (a
    file system mounted with ``discard`` trims them in that commit).
    """

    def __init__(self) -> None:
        self._held: dict[weakref.ref[Image], tuple[mmap.mmap, int]] = {}
        self._gone: queue.SimpleQueue[tuple[mmap.mmap, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def track(self, image: Image, mapped: mmap.mmap, fd: int) -> None:
        # Started here, never in _released: that may run while the interpreter exits
        # (its images dropped with its modules), when a thread started would never run
        # and Thread.start would wait for it forever.
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="unmap", daemon=True)
            self._thread.start()
        self._held[weakref.ref(image, self._released)] = (mapped, fd)

    def _released(self, ref: weakref.ref[Image]) -> None:
        held = self._held.pop(ref, None)
        if held is not None and not sys.is_finalizing():
            self._gone.put(held)

    def _run(self) -> None:
        while True:
            mapped, fd = self._gone.get()
            while True:
                try:
                    mapped.close()
                    break
                except BufferError:  # the image's view is released a moment later
                    time.sleep(0.001)
            _free(fd)


def _free(fd: int) -> None:
    """Close a snapshot file no mapping of this process uses any more. If it has no name
    left (renamed over, unlinked) and no other process maps it (each mapping holds a
    shared ``flock``: ``_map_snapshot``), its blocks are freed ``_FREE_STEP`` bytes at a
    time, each step committed: truncating a file that is still mapped would be a SIGBUS
    for the reader."""
    try:
        stat = os.fstat(fd)
        if stat.st_nlink == 0 and stat.st_size > _FREE_STEP:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: mapped elsewhere
            for size in range(stat.st_size - _FREE_STEP, 0, -_FREE_STEP):
                os.ftruncate(fd, size)
                os.fsync(fd)
                time.sleep(_FREE_PAUSE)  # back to back, the commits would queue the loop's
    except OSError:
        pass  # freed whole when its last holder closes it, as any file
    finally:
        os.close(fd)


_UNMAPPER = _Unmapper()


def _map_snapshot(path: Path, *, check: bool) -> Image:
    """The snapshot file at ``path`` as an Image over a read-only mmap of it; ``check``:
    its body's crc32 checked too (at load: a taker's or a peer's was checked as made).

    The file stays open (for writing: see ``_free``) with a shared ``flock`` for as long
    as the mapping lives, in whichever process maps it (the node, its snapshot taker)."""
    fd = _open_shared(path)
    try:
        size = os.fstat(fd).st_size
        if size < _HEADER.size + 1:
            raise _Damage(path, 0, f"cut short: {size} bytes, not even a record header")
        header = _pread_all(fd, _HEADER.size, 0)
        length, crc, header_crc = _HEADER.unpack(header)
        if zlib.crc32(header[:8]) != header_crc:
            raise _Damage(path, 0, "the record header fails its checksum")
        if size != _HEADER.size + length + 1:
            raise _Damage(path, 0, f"the record says {length} bytes, the file has {size}")
        end = _pread_all(fd, 1, size - 1)[0]
        if end not in (_END, 0):
            raise _Damage(path, size - 1, f"end byte {end:#x}, not {_END:#x}")
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        body = memoryview(mapped)[_HEADER.size : _HEADER.size + length]
        if check and zlib.crc32(body) != crc:
            raise _Damage(path, 0, "checksum mismatch")
        try:
            index, term = head_of(body)
        except LedgerError as exc:
            raise _Damage(path, _HEADER.size, str(exc)) from None
    except BaseException:
        os.close(fd)  # a mapping made is closed with its last view
        raise
    image = Image(index, term, body, crc)
    _UNMAPPER.track(image, mapped, fd)
    return image


def _open_shared(path: Path) -> int:
    """``path`` opened with a shared ``flock``: no one frees it while it is held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_nlink:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # renamed over before it was locked, and perhaps freed since: again


# --- shapes of the small files


def _hard_state(path: Path, record: Any) -> tuple[int, str | None]:
    if isinstance(record, dict) and set(record) == {"term", "voted_for"}:
        term, vote = record["term"], record["voted_for"]
        if _count(term) and (vote is None or isinstance(vote, str)):
            return term, vote
    raise _Damage(path, 0, 'not {"term": int >= 0, "voted_for": name or nil}')


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0  # not bool, which msgpack also decodes


def _decode(path: Path, offset: int, body: bytes) -> Any:
    try:
        return unpack(body)
    except Exception as exc:  # any msgpack error: the checksum matched bytes that are not ours
        raise _Damage(path, offset, f"undecodable record ({type(exc).__name__})") from None


# --- bytes on disk


def _frame(record: Any) -> bytes:
    body = pack(record)
    return b"".join((_header(len(body), zlib.crc32(body)), body, _END_BYTE))


def _header(length: int, crc: int) -> bytes:
    head = _LENGTH_CRC.pack(length, crc)
    return head + _CRC.pack(zlib.crc32(head))


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset``: ``os.pread`` may read less than asked."""
    parts = []
    while size > 0:
        part = os.pread(fd, size, offset)
        if not part:
            raise OSError(f"pread found the end of the file at offset {offset}")
        parts.append(part)
        size, offset = size - len(part), offset + len(part)
    return b"".join(parts)


class _Paced:
    """A file written in steps of ``_WRITE_BUFFER`` bytes, each synced as it is written
    (when ``sync``): a snapshot taker's 100 MB would otherwise reach the disk in one burst
    at its final fsync, and every node's group commit on that disk (its per-cycle
    fdatasync) would wait behind it, 100-200 ms at 1,000,000 grants here."""

    def __init__(self, out: BinaryIO, *, sync: bool) -> None:
        self._out, self._sync, self._pending = out, sync, 0

    def write(self, data: bytes) -> int:
        written = self._out.write(data)
        self._pending += len(data)
        if self._sync and self._pending >= _WRITE_BUFFER:
            self._out.flush()
            os.fdatasync(self._out.fileno())
            self._pending = 0
        return written


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    """``os.pwrite`` until all of ``data`` is written (it may write less than asked);
    how many bytes that was."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"pwrite wrote nothing at offset {offset}")
        view, offset = view[written:], offset + written
    return len(data)


def _copy_range(src: int, dst: int, start: int, size: int, to: int) -> None:
    """Copy ``size`` bytes of ``src`` from ``start`` into ``dst`` at ``to``, in the kernel
    (``copy_file_range``: no copy through this process), or by reads and writes where the
    file system cannot."""
    while size > 0:
        try:
            done = os.copy_file_range(src, dst, size, start, to)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            done = _pwrite_all(dst, _pread_all(src, min(size, _ZERO_CHUNK), start), to)
        if done <= 0:
            raise OSError(f"copy_file_range copied nothing at offset {start}")
        start, to, size = start + done, to + done, size - done


def _log_tmp(
    data_dir: Path,
    base: int,
    term: int,
    copy: tuple[int, int, int] | None,
    fsync: bool,
    *,
    paced: bool = False,
) -> _LogTmp:
    """Write ``log.tmp``: the base record, the bytes ``copy`` names (a file, from, to),
    and zeros to write over; synced when ``fsync``. ``paced`` (off the loop): synced a
    step of ``_SYNC_STEP`` bytes at a time, since megabytes synced at once would hold the
    loop's own syncs of its log, on the same disk, behind them."""
    head = _frame({"base": [base, term]})
    path = data_dir / TMP_LOG
    step = _SYNC_STEP if paced and fsync else None  # None: written whole, synced once
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        end = _pwrite_all(fd, head, 0)
        src, at, upto = copy if copy is not None else (-1, 0, 0)
        while at < upto:
            size = upto - at if step is None else min(step, upto - at)
            _copy_range(src, fd, at, size, end)
            at, end = at + size, end + size
            if step is not None:
                os.fdatasync(fd)
        zeros = bytes(step or _ZERO_CHUNK)
        for offset in range(end, end + _ZERO_CHUNK, len(zeros)):
            _pwrite_all(fd, zeros, offset)
            if step is not None:
                os.fdatasync(fd)
        size = end + _ZERO_CHUNK
        if fsync:
            os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a write names no file: the message must
        raise
    return _LogTmp(fd, len(head), end, size)


def _rewrite(job: _Compaction, data_dir: Path, log_fd: int, fsync: bool) -> None:
    """A compaction's slow part, on its worker thread (fsync and copy_file_range release
    the GIL): the snapshot's rename made durable before a log that follows it can be,
    then ``log.tmp`` written from ``log_fd`` (a dup of the old log's, closed here)."""
    try:
        if fsync:
            _fsync_dir(data_dir)
        copy = (log_fd, job.start, job.end)
        job.made = _log_tmp(data_dir, job.index, job.term, copy, fsync, paced=True)
    except Exception as exc:  # raised on the loop (_switch); the thread lives on
        job.error = exc
    finally:
        os.close(log_fd)
        job.done.set()


class _Rewriter:
    """Runs the compactions' rewrites (``_rewrite``) on a thread of its own, started
    once: a thread started per compaction cost the loop up to 8 ms here (``start`` waits
    for the new thread to run, which competes for the GIL)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[_Compaction, Path, int, bool]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():  # none yet, or forked
            self._thread = threading.Thread(target=self._run, name="compaction", daemon=True)
            self._thread.start()

    def submit(self, job: _Compaction, data_dir: Path, log_fd: int, fsync: bool) -> None:
        self.start()
        self._jobs.put((job, data_dir, log_fd, fsync))

    def _run(self) -> None:
        while True:
            _rewrite(*self._jobs.get())


_REWRITER = _Rewriter()


def _unlink(path: Path) -> None:
    """Remove a snapshot's temporary file before writing it anew: never truncate it in
    place, since an Image may still map it (a read past the end of a mapping whose file
    shrank is a SIGBUS), and the mapping keeps the old file for as long as it lives."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(path: Path) -> None:
    """Make the renames in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: Path, data: bytes, *, fsync: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return "unknown"
    return pid if pid.isdigit() else "unknown"


def _os(exc: OSError) -> str:
    return exc.strerror or str(exc)
