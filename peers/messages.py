"""Peer message kinds: typed, frozen, built by the replica and validated on the way in.

On the wire (msgpack, done by ``broker/wire.py``) every peer message is a map with a
kind ``t`` and the sender's ``term``. This module turns such maps into the frozen
dataclasses below and back (``to_wire``). ``validate`` is the only way in: it returns
None for anything malformed (missing fields, wrong types, bools posing as ints,
negative or absurd indexes, entries that are not contiguous or whose terms run
backwards), so that the replica's ``on_message`` never sees a shape it did not expect.
Semantic checks (is the sender the primary of my term? do I hold ``prev``?) belong
to the replica.

| t | fields | sent by |
| --- | --- | --- |
| hb | term, node, role, last, last_term, commit, primary, stands, wall, setup | all, on PUB |
| vote_req | term, candidate, last, last_term, transfer, pre | candidate (pre: a pre-vote) |
| vote | term, req_term, granted, pre, last, last_term, commit | voter, answering vote_req |
| append | term, prev_index, prev_term, entries, commit | primary, to each backup |
| append_ack | term, ok, match, prev_index, last, commit | backup, answering append or last chunk |
| snapshot | term, index, term_at, offset, size, crc, data | primary, to a backup behind its log |
| snapshot_ack | term, index, offset | backup: it holds [0, offset) of it |
| timeout_now | term | primary handing over to a higher-ranked backup |
| fetch | term, from_index, offset, snap_index | new primary-elect, to a voter with a better log |
| fetch_reply | term, prev_index, prev_term, entries, last, snapshot | that voter |

An entry is ``{term, index, delta}`` with ``delta`` a map (opaque here) or None.

A heartbeat's ``wall`` (the sender's wall clock as it beat, seconds since the epoch) and
``setup`` (the settings the triad must agree on, as the sender's config has them: a flat
map of names to strings or numbers, ``Config.contract``) are optional: nodes from before
them send neither, and their clock and settings count as unknown, never as different.

A snapshot travels as chunks of its image's bytes (``types.Image``): each ``data`` (bin)
is at most ``MAX_SNAPSHOT_CHUNK`` bytes (a sender sends ``Timing.snapshot_chunk``),
``offset + len(data) <= size``, ``crc`` is the crc32 of all ``size`` bytes.
``fetch_reply.snapshot`` is None or one such chunk ``{offset, size, crc, data}`` of the
image at ``prev_index`` (term ``prev_term``), entries only with its last chunk;
``fetch``'s ``snap_index`` names the image whose first ``offset`` bytes the candidate
holds (0 and 0: none). These shapes are not those of nodes from before chunked
snapshots: the two cannot replicate a snapshot to each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from zbroker.peers.types import MAX_SNAPSHOT_CHUNK, Entry, Role

MAX_INDEX = 2**62  # far beyond any real log; rejects overflow games
MAX_NAME = 256
MAX_ENTRIES = 65_536  # per message; the primary batches far below this
MAX_IMAGE = 2**40  # bytes; far beyond any real ledger's image
MAX_WALL = 2.0**40  # seconds since the epoch: some 35,000 years
MAX_SETUP = 64  # entries of a heartbeat's setup: a triad's is about ten
MAX_SETTING = 1024  # characters of one of its strings (an endpoint)


class Invalid(Exception):
    """A peer message failed validation (internal: ``validate`` turns it into None)."""


def _int(m: Mapping[str, Any], key: str) -> int:
    v = m.get(key)
    if type(v) is not int or not 0 <= v <= MAX_INDEX:
        raise Invalid(f"{key} must be a non-negative int")
    return v


def _bool(m: Mapping[str, Any], key: str) -> bool:
    v = m.get(key)
    if type(v) is not bool:
        raise Invalid(f"{key} must be a bool")
    return v


def _name(m: Mapping[str, Any], key: str, *, optional: bool = False) -> str | None:
    v = m.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME:
        raise Invalid(f"{key} must be a node name")
    return v


def _wall(m: Mapping[str, Any]) -> float | None:
    """The sender's wall clock; None when absent or unreadable. Advisory, as ``setup``:
    a value this node cannot read (a later version's) leaves it unknown, never the whole
    heartbeat refused (its term, role and standing still count)."""
    v = m.get("wall")
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < MAX_WALL:
        return None  # nan fails the comparison
    return float(v)


def _setup(m: Mapping[str, Any]) -> dict[str, str | float] | None:
    """The sender's settings the triad must share, those of them this node can read."""
    v = m.get("setup")
    if not isinstance(v, dict) or len(v) > MAX_SETUP:
        return None
    return {
        key: value
        for key, value in v.items()
        if isinstance(key, str)
        and 0 < len(key) <= MAX_NAME
        and (
            (isinstance(value, str) and len(value) <= MAX_SETTING)
            or (type(value) in (int, float) and value == value and abs(value) <= MAX_INDEX)
        )
    }


def _crc(m: Mapping[str, Any]) -> int:
    v = m.get("crc")
    if type(v) is not int or not 0 <= v < 2**32:
        raise Invalid("crc must be a crc32")
    return v


def _chunk(m: Mapping[str, Any]) -> tuple[int, int, int, bytes]:
    """(offset, size, crc, data) of one chunk of an image, checked against each other."""
    offset, size, crc, data = _int(m, "offset"), _int(m, "size"), _crc(m), m.get("data")
    if not 0 < size <= MAX_IMAGE:
        raise Invalid("size must be 1 .. MAX_IMAGE bytes")
    if type(data) is not bytes or not 0 < len(data) <= MAX_SNAPSHOT_CHUNK:
        raise Invalid("data must be 1 .. MAX_SNAPSHOT_CHUNK bytes")
    if offset + len(data) > size:
        raise Invalid("chunk runs past the image's size")
    return offset, size, crc, data


_IS_STR = str.__instancecheck__  # mapped over a map's keys: no generator, no frame per key


def _map(v: object, what: str) -> dict[str, Any]:
    # Two per entry on a backup (the entry, its delta): the check runs in C, about a
    # third of a generator's cost.
    if not isinstance(v, dict) or not all(map(_IS_STR, v)):
        raise Invalid(f"{what} must be a map with string keys")
    return v


def _entries(m: Mapping[str, Any], term: int, prev_index: int, prev_term: int) -> tuple[Entry, ...]:
    raw = m.get("entries")
    if not isinstance(raw, list) or len(raw) > MAX_ENTRIES:
        raise Invalid("entries must be a list")
    out: list[Entry] = []
    last_term = prev_term
    for pos, item in enumerate(raw):
        e = _map(item, "entry")
        e_term, e_index = _int(e, "term"), _int(e, "index")
        delta = e.get("delta")
        if e_index != prev_index + 1 + pos:
            raise Invalid("entries must follow prev_index contiguously")
        if not last_term <= e_term <= term:
            raise Invalid("entry terms must not decrease nor exceed the message term")
        out.append(Entry(e_term, e_index, None if delta is None else _map(delta, "delta")))
        last_term = e_term
    return tuple(out)


@dataclass(frozen=True)
class Heartbeat:
    term: int
    node: str
    role: Role
    last: int
    last_term: int
    commit: int
    primary: str | None
    # False: the node will not stand for election (it cannot vouch for the license the
    # triad serves, or its clock disagrees with the others'); a primary then never hands
    # over to it. Absent (older nodes): True.
    stands: bool = True
    # The sender's wall clock as it beat, so that each node sees how far the others'
    # clocks are from its own (broker/core.py); None: unknown (an older node).
    wall: float | None = None
    # What the sender's config says the triad must agree on (Config.contract); None: unknown.
    setup: dict[str, str | float] | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "t": "hb",
            "term": self.term,
            "node": self.node,
            "role": self.role.value,
            "last": self.last,
            "last_term": self.last_term,
            "commit": self.commit,
            "primary": self.primary,
            "stands": self.stands,
        }
        if self.wall is not None:
            wire["wall"] = self.wall
        if self.setup is not None:
            wire["setup"] = self.setup
        return wire


@dataclass(frozen=True)
class VoteRequest:
    term: int
    candidate: str
    last: int
    last_term: int
    transfer: bool
    pre: bool

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "vote_req",
            "term": self.term,
            "candidate": self.candidate,
            "last": self.last,
            "last_term": self.last_term,
            "transfer": self.transfer,
            "pre": self.pre,
        }


@dataclass(frozen=True)
class Vote:
    term: int  # the voter's term after handling the request
    req_term: int  # the term that was asked for
    granted: bool
    pre: bool
    last: int
    last_term: int
    commit: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "vote",
            "term": self.term,
            "req_term": self.req_term,
            "granted": self.granted,
            "pre": self.pre,
            "last": self.last,
            "last_term": self.last_term,
            "commit": self.commit,
        }


@dataclass(frozen=True)
class Append:
    term: int
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "append",
            "term": self.term,
            "prev_index": self.prev_index,
            "prev_term": self.prev_term,
            "entries": [e.to_wire() for e in self.entries],
            "commit": self.commit,
        }


@dataclass(frozen=True)
class AppendAck:
    term: int
    ok: bool
    match: int  # ok: the backup's log matches the primary's through here
    prev_index: int  # the prev_index (or snapshot index) this answers
    last: int
    commit: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "append_ack",
            "term": self.term,
            "ok": self.ok,
            "match": self.match,
            "prev_index": self.prev_index,
            "last": self.last,
            "commit": self.commit,
        }


@dataclass(frozen=True)
class Snapshot:
    """One chunk of the image at ``index`` (of term ``term_at``): ``size`` bytes in all."""

    term: int
    index: int
    term_at: int
    offset: int
    size: int
    crc: int
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "snapshot",
            "term": self.term,
            "index": self.index,
            "term_at": self.term_at,
            "offset": self.offset,
            "size": self.size,
            "crc": self.crc,
            "data": self.data,
        }


@dataclass(frozen=True)
class SnapshotAck:
    term: int
    index: int  # the image this answers
    offset: int  # the backup holds its bytes [0, offset), in order

    def to_wire(self) -> dict[str, Any]:
        return {"t": "snapshot_ack", "term": self.term, "index": self.index, "offset": self.offset}


@dataclass(frozen=True)
class Chunk:
    """A chunk of an image in a fetch reply (the image is the reply's prev_index/prev_term)."""

    offset: int
    size: int
    crc: int
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"offset": self.offset, "size": self.size, "crc": self.crc, "data": self.data}


@dataclass(frozen=True)
class TimeoutNow:
    term: int

    def to_wire(self) -> dict[str, Any]:
        return {"t": "timeout_now", "term": self.term}


@dataclass(frozen=True)
class Fetch:
    term: int
    from_index: int
    offset: int = 0  # bytes the candidate holds of the image at snap_index
    snap_index: int = 0  # 0: no image being assembled

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "fetch",
            "term": self.term,
            "from_index": self.from_index,
            "offset": self.offset,
            "snap_index": self.snap_index,
        }


@dataclass(frozen=True)
class FetchReply:
    term: int
    prev_index: int  # with a snapshot: the snapshot's index
    prev_term: int
    entries: tuple[Entry, ...]
    last: int  # the voter's last index: fetch again until reached
    snapshot: Chunk | None

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "fetch_reply",
            "term": self.term,
            "prev_index": self.prev_index,
            "prev_term": self.prev_term,
            "entries": [e.to_wire() for e in self.entries],
            "last": self.last,
            "snapshot": None if self.snapshot is None else self.snapshot.to_wire(),
        }


Message = (
    Heartbeat
    | VoteRequest
    | Vote
    | Append
    | AppendAck
    | Snapshot
    | SnapshotAck
    | TimeoutNow
    | Fetch
    | FetchReply
)

_ROLES = {r.value: r for r in Role}


def _hb(m: Mapping[str, Any]) -> Message:
    raw = m.get("role")
    role = _ROLES.get(raw) if isinstance(raw, str) else None
    if role is None:
        raise Invalid("role must be a role name")
    node = _name(m, "node")
    if node is None:
        raise Invalid("node missing")
    return Heartbeat(
        _int(m, "term"),
        node,
        role,
        _int(m, "last"),
        _int(m, "last_term"),
        _int(m, "commit"),
        _name(m, "primary", optional=True),
        _bool(m, "stands") if "stands" in m else True,
        _wall(m),
        _setup(m),
    )


def _vote_req(m: Mapping[str, Any]) -> Message:
    candidate = _name(m, "candidate")
    if candidate is None:
        raise Invalid("candidate missing")
    return VoteRequest(
        _int(m, "term"),
        candidate,
        _int(m, "last"),
        _int(m, "last_term"),
        _bool(m, "transfer"),
        _bool(m, "pre"),
    )


def _vote(m: Mapping[str, Any]) -> Message:
    return Vote(
        _int(m, "term"),
        _int(m, "req_term"),
        _bool(m, "granted"),
        _bool(m, "pre"),
        _int(m, "last"),
        _int(m, "last_term"),
        _int(m, "commit"),
    )


def _append(m: Mapping[str, Any]) -> Message:
    term, prev_index, prev_term = _int(m, "term"), _int(m, "prev_index"), _int(m, "prev_term")
    if prev_term > term:
        raise Invalid("prev_term beyond the message term")
    return Append(
        term, prev_index, prev_term, _entries(m, term, prev_index, prev_term), _int(m, "commit")
    )


def _append_ack(m: Mapping[str, Any]) -> Message:
    return AppendAck(
        _int(m, "term"),
        _bool(m, "ok"),
        _int(m, "match"),
        _int(m, "prev_index"),
        _int(m, "last"),
        _int(m, "commit"),
    )


def _snapshot(m: Mapping[str, Any]) -> Message:
    term, index, term_at = _int(m, "term"), _int(m, "index"), _int(m, "term_at")
    if term_at > term:
        raise Invalid("term_at beyond the message term")
    if index < 1:
        raise Invalid("a snapshot's index starts at 1")
    return Snapshot(term, index, term_at, *_chunk(m))


def _snapshot_ack(m: Mapping[str, Any]) -> Message:
    index, offset = _int(m, "index"), _int(m, "offset")
    if index < 1 or offset > MAX_IMAGE:
        raise Invalid("snapshot_ack needs index >= 1 and offset <= MAX_IMAGE")
    return SnapshotAck(_int(m, "term"), index, offset)


def _timeout_now(m: Mapping[str, Any]) -> Message:
    return TimeoutNow(_int(m, "term"))


def _fetch(m: Mapping[str, Any]) -> Message:
    from_index, offset, snap_index = _int(m, "from_index"), _int(m, "offset"), _int(m, "snap_index")
    if from_index < 1:
        raise Invalid("from_index starts at 1")
    if offset > MAX_IMAGE or (snap_index == 0 and offset != 0):
        raise Invalid("offset must be 0 without snap_index, and at most MAX_IMAGE")
    return Fetch(_int(m, "term"), from_index, offset, snap_index)


def _fetch_reply(m: Mapping[str, Any]) -> Message:
    term, prev_index, prev_term = _int(m, "term"), _int(m, "prev_index"), _int(m, "prev_term")
    if prev_term > term:
        raise Invalid("prev_term beyond the message term")
    raw = m.get("snapshot")
    entries = _entries(m, term, prev_index, prev_term)
    last = _int(m, "last")
    if last < prev_index + len(entries):
        raise Invalid("last before the entries sent")
    chunk = None
    if raw is not None:
        fields = _map(raw, "snapshot")
        if fields.keys() != {"offset", "size", "crc", "data"}:
            raise Invalid("snapshot must be a chunk {offset, size, crc, data}")
        chunk = Chunk(*_chunk(fields))
        if prev_index < 1:
            raise Invalid("a snapshot's index starts at 1")
        if entries and chunk.offset + len(chunk.data) != chunk.size:
            raise Invalid("entries come only with the last chunk of a snapshot")
    return FetchReply(term, prev_index, prev_term, entries, last, chunk)


_PARSERS: dict[str, Callable[[Mapping[str, Any]], Message]] = {
    "hb": _hb,
    "vote_req": _vote_req,
    "vote": _vote,
    "append": _append,
    "append_ack": _append_ack,
    "snapshot": _snapshot,
    "snapshot_ack": _snapshot_ack,
    "timeout_now": _timeout_now,
    "fetch": _fetch,
    "fetch_reply": _fetch_reply,
}


def parse(msg: object) -> Message:
    """The typed message for ``msg``; raises ``Invalid`` with the reason."""
    if not isinstance(msg, dict):
        raise Invalid("a peer message is a map")
    kind = msg.get("t")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise Invalid(f"unknown message kind {kind!r:.40}")
    return parser(msg)


def validate(msg: object) -> Message | None:
    """The typed message for ``msg``, or None when it is malformed in any way."""
    try:
        return parse(msg)
    except Invalid:
        return None
