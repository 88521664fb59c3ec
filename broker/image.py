"""A ledger's snapshot as bytes: what is written to disk, sent to a peer and loaded in steps.

Format
------
A stream of msgpack objects, each packed with ``zbroker.broker.wire.pack``:

- a head map: ``{"v": SNAPSHOT_VERSION, "index", "term", "next_grant", "entitlements",
  "options", "license", "sessions": n, "grants": n}``, the counts saying how many
  sessions and grants follow;
- then ``{"s": [session map, ...]}`` records of at most ``IMAGE_BATCH`` sessions each, in
  the order ``Ledger.snapshot()`` lists them;
- then ``{"g": [grant map, ...]}`` records of at most ``IMAGE_BATCH`` grants each;
- nothing else.

Every map is the one ``Ledger.snapshot()`` holds, so ``snapshot()`` stays the one
description of the replicated state: an image is that map cut into records, with the
index and term of the log entry it was taken at. The crc of the whole stream
(``Image.crc``) is checked by whoever received or stored the bytes, not here.

Loading in steps
----------------
A node that installs a snapshot from a peer must keep serving its loop meanwhile: at
100,000 sessions holding 1,000,000 grants, building the ledger takes seconds.
``ImageLoader.step(budget)`` unpacks and adds at most ``budget`` grants (a session
counts as ``SESSION_WEIGHT`` of them), feeding its unpacker slices of the buffer only as
it needs them, so one step costs about the same at any image size (``STEP_ITEMS``:
about 1-2 ms here, docs/design.md). The exceptions are the steps in which CPython grows
one of the ledger's dicts of every grant, as it does when grants are added any other
way: about 14 ms at 349,525 grants and 26 ms at 699,051 here. Malformed bytes raise
``LedgerError``, as a malformed snapshot map does; the caller runs the node's cyclic GC
as it sees fit (node.py freezes what each step built).
"""

from __future__ import annotations

import gc
import io
import itertools
import sys
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import msgpack

from zbroker.broker.ledger import SNAPSHOT_VERSION, Ledger, LedgerBuilder
from zbroker.broker.limits import Limits
from zbroker.broker.policy import DEFAULT_MIN_TIMEOUT
from zbroker.broker.seats import LedgerError
from zbroker.broker.wire import pack
from zbroker.peers.types import Image

IMAGE_BATCH = 1_000  # sessions or grants per record
# Grants one step adds (or sessions worth as much): a median of 1.7-1.8 ms of CPU here,
# measured over the whole load of 100,000 sessions holding 1,000,000 grants.
STEP_ITEMS = 500
# What one session costs a step, in grants: a session is five times a grant's work to
# unpack and build (its recorded replies, its lease and host counts), so steps of
# sessions and steps of grants take about as long.
SESSION_WEIGHT = 5
_FEED = 64 * 1024  # bytes handed to the unpacker at a time
_KINDS = {"s": "sessions", "g": "grants"}


class Sink(Protocol):
    """Where an image is written: a file, or storage's synced-in-steps writer."""

    def write(self, data: bytes, /) -> int: ...


def write_image(ledger: Ledger, index: int, term: int, out: Sink) -> tuple[int, int]:
    """Write the image of ``ledger`` (holding every delta up to ``index``, of ``term``)
    into ``out``; return its size and crc32. Slow at scale: the snapshot taker's work
    (broker/taker.py)."""
    state, sessions, grants = ledger.snapshot_parts()
    counts = {"sessions": sessions.total, "grants": grants.total}
    head = {**state, "index": index, "term": term, **counts}
    size = crc = 0
    for record in _records(head, sessions.maps, grants.maps):
        out.write(record)
        size += len(record)
        crc = zlib.crc32(record, crc)
    return size, crc


def image_of(ledger: Ledger, index: int, term: int) -> Image:
    """The image of ``ledger`` in memory (tests and the simulation)."""
    out = io.BytesIO()
    write_image(ledger, index, term, out)
    return Image.of(index, term, out.getvalue())


def _records(
    head: dict[str, Any], sessions: Iterator[dict[str, Any]], grants: Iterator[dict[str, Any]]
) -> Iterator[bytes]:
    yield pack(head)
    for key, maps in (("s", sessions), ("g", grants)):
        while batch := list(itertools.islice(maps, IMAGE_BATCH)):
            yield pack({key: batch})


def head_of(buf: Any) -> tuple[int, int]:
    """The index and term an image's head says it was taken at (only the head is read);
    LedgerError when it has no such head."""
    try:
        head = _Stream(buf).next()
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise LedgerError(f"snapshot image: undecodable ({type(exc).__name__})") from None
    index, term = (head.get("index"), head.get("term")) if isinstance(head, dict) else (0, 0)
    if not (type(index) is int and index > 0 and type(term) is int and term >= 0):
        raise LedgerError("snapshot image: its head has no index > 0 and term >= 0")
    return index, term


class _Stream:
    """The objects of a buffer, unpacked as they are asked for: the unpacker is fed
    slices of the buffer (no copy of it) only when it runs out of data, and resumes
    where it stopped."""

    def __init__(self, buf: Any) -> None:
        self.view = memoryview(buf).cast("B")
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)
        self._fed = 0  # bytes of the buffer handed to the unpacker

    def next(self) -> Any:
        return self.read(self.unpacker.unpack)

    def read(self, read: Callable[[], Any]) -> Any:
        while True:
            try:
                return read()
            except msgpack.OutOfData:
                if self._fed == len(self.view):
                    raise LedgerError(
                        f"snapshot image: cut short at {self.unpacker.tell()} of"
                        f" {len(self.view)} bytes"
                    ) from None
                end = min(self._fed + _FEED, len(self.view))
                self.unpacker.feed(self.view[self._fed : end])
                self._fed = end

    @property
    def at_end(self) -> bool:
        """Whether every byte of the buffer was unpacked."""
        return self.unpacker.tell() == len(self.view)


class ImageLoader:
    """Builds the ledger of an image a few items at a time (see the module docstring)."""

    def __init__(
        self,
        image: Image,
        *,
        lease: float,
        heartbeat: float,
        limits: Limits | None = None,
        min_timeout: float = DEFAULT_MIN_TIMEOUT,
    ) -> None:
        self.image = image
        self._settings: dict[str, Any] = {
            "lease": lease,
            "heartbeat": heartbeat,
            "limits": limits,
            "min_timeout": min_timeout,
        }
        self._stream = _Stream(image.buf)
        self._builder: LedgerBuilder | None = None
        self._expected = {"sessions": 0, "grants": 0}  # what the head announced
        self.added = {"sessions": 0, "grants": 0}  # what was added so far
        self._kind = ""  # the kind of the record being read ("" between records)
        self._left = 0  # its items not read yet
        self._ledger: Ledger | None = None

    @property
    def items(self) -> int:
        """Sessions and grants the image holds (0 until the first step read its head)."""
        return sum(self._expected.values())

    def step(self, budget: int = STEP_ITEMS) -> Ledger | None:
        """Add at most ``budget`` grants, or sessions worth as much (``SESSION_WEIGHT``
        each; at least one), and return the ledger once all are in.

        LedgerError when the image is malformed or cut short; the loader is then of no
        further use.
        """
        if self._ledger is not None:
            return self._ledger
        try:
            return self._step(max(1, budget))
        except (msgpack.UnpackException, ValueError, TypeError) as exc:
            # Bytes that are no msgpack stream of ours (a wrong map key type, garbage).
            raise LedgerError(f"snapshot image: undecodable ({type(exc).__name__})") from None

    def finish(self) -> Ledger:
        """Every step left at once (a node's start); LedgerError when malformed.

        The cyclic GC is paused meanwhile: the millions of objects built, all alive,
        would make each of its full collections rescan all built so far (a 1,000,000
        grant image took 11.9 s of CPU to load with it, 5.9 s without, here).
        """
        paused = gc.isenabled()
        gc.disable()
        try:
            ledger = self.step(sys.maxsize)
        finally:
            if paused:
                gc.enable()
        assert ledger is not None  # an unbounded step finishes or raises
        return ledger

    def _step(self, budget: int) -> Ledger | None:
        if self._builder is None:
            self._builder = self._head()
        while budget:
            if self._left == 0:
                if self._complete():
                    break
                self._open_record()
                continue
            weight = SESSION_WEIGHT if self._kind == "sessions" else 1
            take = min(max(1, budget // weight), self._left)
            batch = [self._next() for _ in range(take)]
            self._left -= take
            budget = max(0, budget - take * weight)
            if self._kind == "sessions":
                self._builder.sessions(batch)
            else:
                self._builder.grants(batch)
            self.added[self._kind] += take
        if not self._complete():
            return None
        if not self._stream.at_end:
            raise LedgerError("snapshot image: data after its last grant")
        self._ledger = self._builder.done()
        return self._ledger

    def _head(self) -> LedgerBuilder:
        head = self._next()
        if not isinstance(head, dict):
            raise LedgerError("snapshot image: its head is not a map")
        if head.get("v") != SNAPSHOT_VERSION:
            raise LedgerError(f"snapshot image: version {head.get('v')!r}, not {SNAPSHOT_VERSION}")
        if (head.get("index"), head.get("term")) != (self.image.index, self.image.term):
            raise LedgerError(
                f"snapshot image: its head says index {head.get('index')!r} of term"
                f" {head.get('term')!r}, the image is at {self.image.index} of term"
                f" {self.image.term}"
            )
        for name in self._expected:
            count = head.get(name)
            if type(count) is not int or count < 0:
                raise LedgerError(f"snapshot image: its head's {name!r} must be a count")
            self._expected[name] = count
        maps = {k: v for k, v in head.items() if k not in ("index", "term", "sessions", "grants")}
        return LedgerBuilder(maps, **self._settings)

    def _open_record(self) -> None:
        """Read the next record's kind and length."""
        try:
            kinds = self._stream.read(self._stream.unpacker.read_map_header)
        except ValueError:  # msgpack's "unexpected type header": not a map
            kinds = 0
        if kinds != 1:
            raise LedgerError("snapshot image: a record must be a map of one kind")
        key = self._next()
        kind = _KINDS.get(key) if isinstance(key, str) else None
        if kind is None:
            raise LedgerError(f"snapshot image: unknown record kind {key!r:.40}")
        if kind == "grants" and self.added["sessions"] != self._expected["sessions"]:
            raise LedgerError(self._miscount("sessions"))
        self._kind, self._left = kind, self._stream.read(self._stream.unpacker.read_array_header)
        if self.added[kind] + self._left > self._expected[kind]:
            raise LedgerError(self._miscount(kind))

    def _complete(self) -> bool:
        return self.added == self._expected and self._left == 0

    def _miscount(self, kind: str) -> str:
        return f"snapshot image: more or fewer {kind} than the {self._expected[kind]} its head says"

    def _next(self) -> Any:
        return self._stream.next()


def load_image(
    image: Image,
    *,
    lease: float,
    heartbeat: float,
    limits: Limits | None = None,
    min_timeout: float = DEFAULT_MIN_TIMEOUT,
) -> Ledger:
    """The ledger of ``image`` at once (a node's start); LedgerError when malformed."""
    return ImageLoader(
        image, lease=lease, heartbeat=heartbeat, limits=limits, min_timeout=min_timeout
    ).finish()
