"""An image received in chunks, in order, checked against its crc as it grows.

A node receives at most one image at a time: a backup (or a RECOVERING node) from its
primary's ``snapshot`` messages, a candidate from a voter's ``fetch_reply`` chunks. The
rules (``Receiver.offer``):

- chunks are taken in order only: one that starts where the bytes held end is taken
  (and written: ``PersistSnapshotChunk``); a gap or a duplicate is refused, and the
  answer names the offset held, from which the sender resends;
- a chunk at offset 0 of another image starts over when nothing is held, when the image
  is newer (higher index) or when it comes in a newer term (a new primary: the old
  transfer will never end); any other chunk of another image is refused with 0 held of
  it (a late copy of an older transfer's chunk must not undo a newer one). A chunk of
  the same image (index, term, size and crc) continues it, whoever sends it;
- the last chunk completes the image: the crc, kept up to date chunk by chunk (never
  computed over the whole buffer at the end), must match; a mismatch drops the bytes
  (``Dropped``) and the sender starts again at 0.

The bytes are held in one ``bytearray`` (amortised appends); the complete image's
``buf`` is a read-only view of it, so a 100 MB image is never copied.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from zbroker.peers.types import Dropped, Effect, Image, PersistSnapshotChunk


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk of the image at ``index`` (term ``term``), ``size`` bytes in all."""

    index: int
    term: int
    offset: int
    size: int
    crc: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Received:
    """What became of a chunk: ``held`` bytes of its image held now (the answer's offset),
    ``taken`` whether it was taken (or dropped the image for a crc mismatch: the sender
    must start again), ``image`` the image once complete and sound."""

    held: int
    taken: bool
    image: Image | None = None


@dataclass
class Assembly:
    """The bytes [0, len(buf)) of one image, from ``sender`` in messages of ``msg_term``."""

    index: int
    term: int
    size: int
    crc: int
    sender: str
    msg_term: int
    buf: bytearray = field(default_factory=bytearray)
    running: int = 0  # zlib.crc32 of buf

    def same(self, p: Piece) -> bool:
        return (self.index, self.term, self.size, self.crc) == (p.index, p.term, p.size, p.crc)


class Receiver:
    """The one image this node is receiving, if any (see the module docstring)."""

    def __init__(self) -> None:
        self.current: Assembly | None = None

    def drop(self) -> None:
        self.current = None

    def holds(self, p: Piece) -> bool:
        """Whether the image being received is the one ``p`` is a chunk of."""
        return self.current is not None and self.current.same(p)

    def held_from(self, sender: str) -> tuple[int, int]:
        """(offset, index) of the image held from ``sender``; (0, 0) when none."""
        a = self.current
        if a is None or a.sender != sender:
            return 0, 0
        return len(a.buf), a.index

    def offer(self, sender: str, msg_term: int, p: Piece, out: list[Effect]) -> Received:
        a = self.current
        if a is None or not a.same(p):
            starts = p.offset == 0 and (a is None or p.index > a.index or msg_term > a.msg_term)
            if not starts:
                return Received(0, False)
            a = self.current = Assembly(p.index, p.term, p.size, p.crc, sender, msg_term)
        if p.offset != len(a.buf):
            return Received(len(a.buf), False)  # a gap or a duplicate: never written
        a.buf += p.data
        a.running = zlib.crc32(p.data, a.running)
        a.sender, a.msg_term = sender, max(a.msg_term, msg_term)
        out.append(PersistSnapshotChunk(p.index, p.term, p.offset, p.data))
        if len(a.buf) < a.size:
            return Received(len(a.buf), True)
        self.current = None
        if a.running != a.crc:
            out.append(
                Dropped(
                    sender,
                    f"snapshot at {a.index} failed its crc check"
                    f" ({a.running:#010x}, expected {a.crc:#010x}): receiving it again",
                )
            )
            return Received(0, True)
        return Received(a.size, True, Image(a.index, a.term, memoryview(a.buf).toreadonly(), a.crc))
