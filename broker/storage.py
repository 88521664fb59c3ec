"""The data directory: what a node must find again after a crash or restart.

Files, all in the node's data directory:

- ``node.json``: the marker. Written by ``zbroker init`` (a brand-new triad) or when a
  node that lost its data has caught up again. A directory without it is *fresh*: the
  node may have voted or acknowledged deltas before its disk was lost, so it must not
  vote until it has caught up from a primary (peers/replica.py, RECOVERING).
- ``hardstate``: the current term and the vote given in it, replaced atomically
  (write, fsync, rename) before any vote or term change is announced.
- ``log``: append-only records ``<u32 length><u32 crc32><msgpack>``; an entry record is
  ``{"i": index, "t": term, "d": delta}``, a truncation is ``{"x": from_index}``
  (cheaper than rewriting the file). A torn or corrupt tail, as a crash mid-write
  leaves, ends the log at the last good record.
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
        self._log: BinaryIO = open(self.dir / "log", "ab")  # noqa: SIM115 - held open for appends
        self._dirty = False
        self.last = 0  # index of the last entry written (durable after the next sync)

    # --- start-up
    def load(self) -> Loaded:
        marker = self.dir / MARKER
        if not marker.exists():
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
            if len(body) < length or zlib.crc32(body) != crc:
                break
            record = unpack(body)
            pos += _HEADER.size + length
            good_end = pos
            if "x" in record:
                cut = int(record["x"])
                entries = [e for e in entries if e[0] < cut]
            elif record["i"] > after:
                entries.append((int(record["i"]), int(record["t"]), record["d"]))
        if good_end < len(data):
            # A torn tail from a crash mid-append: cut it so new records follow good ones.
            self._log.close()
            with open(path, "r+b") as f:
                f.truncate(good_end)
            self._log = open(path, "ab")  # noqa: SIM115
        # Entries must be contiguous after the snapshot; anything else is a damaged log.
        for offset, (index, _, _) in enumerate(entries):
            if index != after + 1 + offset:
                raise StorageError(
                    f"{path}: entry {index} out of order (expected {after + 1 + offset})"
                )
        return entries

    # --- persistence effects
    def append(self, entries: list[tuple[int, int, Any]]) -> None:
        for index, term, delta in entries:
            self._write({"i": index, "t": term, "d": delta})
            self.last = index

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
            for i, t, d in keep:
                f.write(_frame({"i": i, "t": t, "d": d}))
            f.flush()
            os.fsync(f.fileno())
        self._log.close()
        os.replace(tmp, self.dir / "log")
        self._log = open(self.dir / "log", "ab")  # noqa: SIM115
        self.last = keep[-1][0] if keep else index
        self._sync_dir()

    def mark_recovered(self) -> None:
        write_marker(self.dir, self.node)

    def sync(self) -> None:
        """Group commit: make everything written since the last sync durable."""
        if not self._dirty:
            return
        self._log.flush()
        if self.fsync:
            os.fsync(self._log.fileno())
        self._dirty = False

    def close(self) -> None:
        self.sync()
        self._log.close()

    # --- internals
    def _write(self, record: dict[str, Any]) -> None:
        self._log.write(_frame(record))
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
