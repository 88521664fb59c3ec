"""The data directory: what a node must find again after a crash or restart.

Files, all in the node's data directory:

- ``node.json``: the marker. Written by ``zbroker init`` (a brand-new triad) or when a
  node that lost its data has caught up again. A directory without it is *fresh*: the
  node may have voted or acknowledged deltas before its disk was lost, so it must not
  vote until it has caught up from a primary (peers/replica.py, RECOVERING).
- ``hardstate``: the current term and the vote given in it, replaced atomically
  (write, fsync, rename) before any vote or term change is announced.
- ``log``: append-only records ``<u32 length><u32 crc32><msgpack>``; an entries record
  is ``{"e": [[index, term, delta], ...]}``, one per persistence effect (a batch: one
  pack, one checksum and one write for all its entries), a truncation is
  ``{"x": from_index}`` (cheaper than rewriting the file). A torn or corrupt tail, as a
  crash mid-write leaves, ends the log at the last good record: a batch is kept whole
  or not at all, which is safe because nothing vouches for it before the sync. The file
  is grown ahead with zeros and records overwrite them (see ``_extend``); a zero header
  marks the end.
- ``snapshot``: ``{"index", "term", "ledger"}`` of a committed index, replaced
  atomically; after it, the log is rewritten to keep only a tail.

fsync policy: the shell writes every persistence effect of one poll cycle and then
calls ``sync()`` once, before it sends any acknowledgement or answer of that cycle
(group commit). With ``fsync = false`` in the config, ``sync()`` only flushes to the OS:
a power loss may then lose acknowledged deltas, a process crash does not.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from broker.wire import pack, unpack

_HEADER = struct.Struct("<II")
_ZERO_CHUNK = 1 << 20  # the log grows by this many zeros at a time
MARKER = "node.json"


class StorageError(Exception):
    """The data directory cannot be used; the message names the file."""


@dataclass
class Loaded:
    """What the data directory held at start."""

    fresh: bool
    term: int = 0
    voted_for: str | None = None
    snapshot_index: int = 0
    snapshot_term: int = 0
    snapshot: dict[str, Any] | None = None
    entries: list[tuple[int, int, Any]] = field(default_factory=list)  # (index, term, delta)


def write_marker(data_dir: Path, node: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    _replace(data_dir / MARKER, json.dumps({"node": node}).encode())


class Storage:
    def __init__(self, data_dir: Path, node: str, *, fsync: bool = True) -> None:
        self.dir = data_dir
        self.node = node
        self.fsync = fsync
        self.dir.mkdir(parents=True, exist_ok=True)
        self._log: BinaryIO | None = None  # opened by load(), at the end of the good records
        self._zeroed = 0  # the file's size: zeros from the write position up to here
        self._dirty = False
        self.last = 0  # index of the last entry written (durable after the next sync)

    # --- start-up
    def load(self) -> Loaded:
        """Read the data directory; call once, before any write."""
        marker = self.dir / MARKER
        if not marker.exists():
            self._open_log(0)  # a log without its marker vouches for nothing
            return Loaded(fresh=True)
        try:
            owner = json.loads(marker.read_text()).get("node")
        except (OSError, ValueError) as exc:
            raise StorageError(f"{marker}: unreadable marker: {exc}") from None
        if owner != self.node:
            raise StorageError(
                f"{marker}: this data directory belongs to node {owner!r}, not {self.node!r}"
            )
        loaded = Loaded(fresh=False)
        hard = self._read_record_file("hardstate")
        if hard is not None:
            loaded.term, loaded.voted_for = int(hard["term"]), hard["voted_for"]
        snap = self._read_record_file("snapshot")
        if snap is not None:
            loaded.snapshot_index = int(snap["index"])
            loaded.snapshot_term = int(snap["term"])
            loaded.snapshot = snap["ledger"]
        loaded.entries = self._read_log(loaded.snapshot_index)
        self.last = loaded.entries[-1][0] if loaded.entries else loaded.snapshot_index
        return loaded

    def _read_log(self, after: int) -> list[tuple[int, int, Any]]:
        entries: list[tuple[int, int, Any]] = []
        good_end = 0
        path = self.dir / "log"
        data = path.read_bytes() if path.exists() else b""
        pos = 0
        while pos + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, pos)
            body = data[pos + _HEADER.size : pos + _HEADER.size + length]
            if length == 0 or len(body) < length or zlib.crc32(body) != crc:
                break  # zeros: the unused rest of the file; anything else: a torn write
            record = unpack(body)
            pos += _HEADER.size + length
            good_end = pos
            if "x" in record:
                cut = int(record["x"])
                entries = [e for e in entries if e[0] < cut]
            else:
                entries.extend((int(i), int(t), d) for i, t, d in record["e"] if i > after)
        self._open_log(good_end)
        # Entries must be contiguous after the snapshot; anything else is a damaged log.
        for offset, (index, _, _) in enumerate(entries):
            if index != after + 1 + offset:
                raise StorageError(
                    f"{path}: entry {index} out of order (expected {after + 1 + offset})"
                )
        return entries

    # --- persistence effects
    def append(self, entries: list[tuple[int, int, Any]]) -> None:
        if entries:
            self._write({"e": entries})
            self.last = entries[-1][0]

    def truncate(self, from_index: int) -> None:
        self._write({"x": from_index})
        self.last = min(self.last, from_index - 1)

    def save_hard_state(self, term: int, voted_for: str | None) -> None:
        self._replace_record("hardstate", {"term": term, "voted_for": voted_for})

    def save_snapshot(
        self, index: int, term: int, ledger: dict[str, Any], keep: list[tuple[int, int, Any]]
    ) -> None:
        """Store a snapshot, then rewrite the log to hold only ``keep`` (entries after it)."""
        self._replace_record("snapshot", {"index": index, "term": term, "ledger": ledger})
        tmp = self.dir / "log.tmp"
        with open(tmp, "wb") as f:
            if keep:
                f.write(_frame({"e": keep}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "log")
        self._open_log((self.dir / "log").stat().st_size)
        self.last = keep[-1][0] if keep else index
        self._sync_dir()

    def _open_log(self, end: int) -> None:
        """Hold the log open for writing at ``end``, cutting whatever follows it.

        A torn tail from a crash mid-append goes, so new records follow good ones, and so
        does any zero-filled rest: ``_extend`` lays zeros afresh.
        """
        path = self.dir / "log"
        if self._log is not None:
            self._log.close()
        path.touch()
        self._log = open(path, "r+b")  # noqa: SIM115 - held open for writes
        self._log.truncate(end)
        self._log.seek(end)
        self._zeroed = end

    def _extend(self, size: int) -> None:
        """Make the file long enough, with zeros, for ``size`` more bytes where the next
        record goes.

        Records are then written over zeros inside the file instead of growing it, so the
        per-cycle ``fdatasync`` has no file size or block map to commit: it took about
        90 us here against 190 us for an append (BENCHMARKS.md). Only the first sync after
        an extension pays for the new blocks.
        """
        assert self._log is not None
        if self._log.tell() + size <= self._zeroed:
            return
        grow = max(_ZERO_CHUNK, size)
        os.pwrite(self._log.fileno(), bytes(grow), self._zeroed)  # leaves the file position
        self._zeroed += grow

    def mark_recovered(self) -> None:
        write_marker(self.dir, self.node)

    def sync(self) -> None:
        """Group commit: make everything written since the last sync durable."""
        if not self._dirty or self._log is None:
            return
        self._log.flush()
        if self.fsync:
            os.fdatasync(self._log.fileno())  # the data and the size: all a reader needs
        self._dirty = False

    def close(self) -> None:
        self.sync()
        if self._log is not None:
            self._log.close()

    # --- internals
    def _write(self, record: dict[str, Any]) -> None:
        if self._log is None:
            raise StorageError(f"{self.dir}: the data directory was not loaded before a write")
        data = _frame(record)
        self._extend(len(data))
        self._log.write(data)
        self._dirty = True

    def _replace_record(self, name: str, record: dict[str, Any]) -> None:
        _replace(self.dir / name, _frame(record), fsync=self.fsync)

    def _read_record_file(self, name: str) -> dict[str, Any] | None:
        path = self.dir / name
        if not path.exists():
            return None
        data = path.read_bytes()
        if len(data) < _HEADER.size:
            raise StorageError(f"{path}: truncated")
        length, crc = _HEADER.unpack_from(data)
        body = data[_HEADER.size : _HEADER.size + length]
        if len(body) != length or zlib.crc32(body) != crc:
            raise StorageError(f"{path}: checksum mismatch; the file is damaged")
        record: dict[str, Any] = unpack(body)
        return record

    def _sync_dir(self) -> None:
        if self.fsync:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _frame(record: dict[str, Any]) -> bytes:
    body = pack(record)
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def _replace(path: Path, data: bytes, *, fsync: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
