"""The report log's records: what one committed log entry means to a license administrator.

Theory of operation
-------------------
Every node applies the same committed entries, in the same order, to the same ledger.
``derive(index, term, delta, ledger)`` is called with the ledger as it stands *just
before* the entry is applied (a record names the session and grants the delta is about,
which a close or a checkin removes), and ``settle(records, ledger)`` just after it, which
fills in each record's ``in_use``: the feature's seats in use after the entry, read from
the ledger rather than worked out, so that shared seats (DUP_GROUP), lingering and
borrowed seats and reclaims are counted as the ledger counts them. Since the inputs are
the same on every node, so are the outputs: the three nodes' report logs agree record
for record, and each record carries the log index it came from (``ix``) and its place
among the records of that entry (``n``).

Records (schema ``SCHEMA``; docs/reportlog.md is the reference):

- ``term``: a new primary's no-op entry starts its term (``primary``, ``at`` when the
  no-op names them: ``{"k": "term", ...}``; an older log's no-op is ``None``).
- ``reread``: a ``reload`` delta replaced the entitlements (``lines``).
- ``out``: a checkout granted (the grant delta); ``borrow``: one granted as a borrow
  (the grant delta's ``borrow``: its end). A grant that ``reclaims`` a lingering seat
  first ends that seat's linger (a ``linger`` record, reason ``reclaimed``).
- ``in``: seats returned, with ``reason`` ``checkin`` (a release), ``closed`` (the
  session closed: one record per grant it held), ``expired`` (its lease lapsed),
  ``timeout`` or ``removed`` (a ``take``: the triad took it), or a release delta's own
  ``reason``. A checkin that leaves its seat lingering says until when (``linger``):
  the seat stays in use until its ``linger`` record.
- ``linger``: a lingering seat's end: ``lapsed`` (its time ran out: a ``lapse``), or
  ``reclaimed`` by its user; ``return``: a borrowed seat came back, ``returned`` early
  (a ``return`` delta) or ``lapsed`` at the borrow's end.
- ``deny``: a request answered ``denied`` (an ``answer`` delta): one per request id,
  since a retry is answered from the recorded reply and makes no delta. Its ``op`` is
  the delta's own for a borrow or return, else ``checkin`` (``not_held``) or ``checkout``.
- ``queued`` and ``dequeued``: before the ``out`` or ``deny`` of a checkout that waited
  in the queue (its delta's ``waited``): ``queued`` at the time it joined the queue,
  ``dequeued`` at the decision. The queue is the primary's alone (not replicated), so a
  wait is recorded when it ends, exactly once, with the decision that ended it.
- ``idle`` and ``busy``: the application marked its session idle or busy again (an
  ``idle`` delta).
- ``unknown``: a delta kind this schema does not know, so that nothing passes unseen.

A field a delta or session lacks (an older log's) is left out of the record (``at`` is
null, and the reader carries the last known time forward).

``seal`` chains the records: each line ends with ``"h"``, the first 32 hex digits of
sha256 over the previous line's ``h`` and the line's canonical JSON without it.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from zbroker.broker.seats import Grant, Session

SCHEMA = 2
GENESIS = "0" * 32  # the ``prev`` of the first record a report log ever holds
HASH_HEX = 32  # hex digits of sha256 kept: 128 bits
Record = dict[str, Any]
Delta = dict[str, Any]

_RELEASE_REASONS = frozenset({"checkin", "timeout", "removed", "linger"})
_TAKE_REASONS = frozenset({"timeout", "removed"})
_NOT_HELD = "not_held"  # the one denial of a checkin; others a checkout's, unless ``op``
_ASKED_OPS = frozenset({"borrow", "return"})  # ops a denial's delta names (``op``)
_LINGER = "linger"  # Session.hold of a lingering seat; "borrow" of a borrowed one


class LedgerView(Protocol):
    """What ``derive`` and ``settle`` read of the ledger."""

    def session(self, sid: str) -> Session | None: ...

    def grant(self, gid: int) -> Grant | None: ...

    def in_use(self, feature: str, version: str | None = None) -> int: ...


class ReportLogError(Exception):
    """A committed delta the report cannot describe (it does not fit the ledger): the
    ledger refuses it too, so the node starts over before any record of it is written."""


def derive(index: int, term: int, delta: Delta | None, ledger: LedgerView) -> list[Record]:
    """The records of the committed entry (``index``, ``term``, ``delta``), from the
    ledger as it stands just before ``delta`` is applied; ``settle`` them after."""
    if delta is None:
        return [{"ix": index, "n": 0, "term": term, "ev": "term", "at": None, "primary": None}]
    kind = delta.get("k")
    handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
    if handler is None:
        return [{"ix": index, "n": 0, "term": term, "ev": "unknown", "at": None, "k": str(kind)}]
    out = handler(delta, ledger)
    for n, record in enumerate(out):
        record["ix"], record["n"], record["term"] = index, n, term
    return out


def settle(records: list[Record], ledger: LedgerView) -> None:
    """Fill in ``in_use`` once the entry is applied: the feature's seats in use after it
    (every record of one entry about a feature says the same)."""
    if len(records) == 1:  # nearly every entry: one record
        record = records[0]
        if "in_use" in record:
            record["in_use"] = ledger.in_use(record["feature"])
        return
    seen: dict[str, int] = {}
    for record in records:
        if "in_use" in record:
            feature = record["feature"]
            n = seen.get(feature)
            if n is None:
                n = seen[feature] = ledger.in_use(feature)
            record["in_use"] = n


def _at(delta: Delta) -> float | None:
    at = delta.get("at")
    return float(at) if isinstance(at, int | float) and not isinstance(at, bool) else None


def _who(record: Record, session: Session) -> Record:
    """``record`` with the session fields of ``session`` added (in place: no dict between,
    this runs for nearly every record)."""
    record["sid"] = session.sid
    record["user"] = session.user
    record["host"] = session.host
    record["display"] = session.display
    record["client_version"] = session.client_version
    if session.address:
        record["address"] = session.address
    if session.project:
        record["project"] = session.project
    return record


def _session(delta: Delta, ledger: LedgerView) -> Session:
    sid = delta.get("sid")
    session = ledger.session(sid) if isinstance(sid, str) else None
    if session is None:
        raise ReportLogError(f"{delta.get('k')} delta: session {sid!r} is not open")
    return session


def _grant(gid: object, ledger: LedgerView, kind: object) -> Grant:
    grant = ledger.grant(gid) if isinstance(gid, int) else None
    if grant is None:
        raise ReportLogError(f"{kind} delta: no grant {gid!r} on the ledger")
    return grant


def _holder(grant: Grant, ledger: LedgerView, kind: object) -> Session:
    session = ledger.session(grant.sid)
    if session is None:
        raise ReportLogError(f"{kind} delta: grant {grant.id}'s session {grant.sid} is not open")
    return session


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _waits(delta: Delta, session: Session, at: float | None) -> list[Record]:
    """``queued`` and ``dequeued`` when the delta says how long its checkout waited (a
    grant or denial the ledger decided from the queue)."""
    waited = _number(delta.get("waited"))
    if waited is None or waited <= 0:
        return []
    asked: Record = {"req": delta.get("req")}
    for name in ("feature", "version", "count"):
        if delta.get(name) is not None:
            asked[name] = delta[name]
    joined = None if at is None else at - waited
    return [
        _who({"ev": "queued", "at": joined, **asked}, session),
        _who({"ev": "dequeued", "at": at, "waited": waited, **asked}, session),
    ]


def _seat(ev: str, at: float | None, grant: Grant, holder: Session) -> Record:
    """A record about one grant held by ``holder`` (``in_use``: filled in by ``settle``).
    ``since``: when the grant was made, or when its hold began for a seat in a hold."""
    since = holder.at if holder.hold else grant.at
    record = {"ev": ev, "at": at, "feature": grant.feature, "version": grant.version,
              "count": grant.count, "grant": grant.id, "since": since, "in_use": 0}  # fmt: skip
    return _who(record, holder)


def _out(delta: Delta, ledger: LedgerView) -> list[Record]:
    session = _session(delta, ledger)
    feature, count, at = delta.get("feature"), delta.get("count"), _at(delta)
    if not isinstance(feature, str) or not isinstance(count, int):
        raise ReportLogError(f"grant delta {delta.get('grant')!r}: no feature or count")
    out = _waits(delta, session, at) if "waited" in delta else []
    reclaims = delta.get("reclaims")
    if reclaims is not None:  # the lingering seat its user takes back, in the same delta
        seat = _grant(reclaims, ledger, "grant")
        hold = _holder(seat, ledger, "grant")
        ended = _seat("linger", at, seat, hold)
        ended["reason"] = "reclaimed"
        out.append(ended)
    borrow = _number(delta.get("borrow"))
    record: Record = {
        "ev": "out" if borrow is None else "borrow",
        "at": at,
        "feature": feature,
        "version": delta.get("version"),
        "count": count,
        "grant": delta.get("grant"),
        "in_use": 0,
    }
    _who(record, session)
    if borrow is not None:
        record["until"] = borrow
    if delta.get("dup"):
        record["dup"] = delta["dup"]
    out.append(record)
    return out


def _lingers(delta: Delta) -> dict[int, float]:
    """grant id -> linger end of a close or expire (``[[gid, until], ...]``)."""
    pairs = delta.get("linger")
    out: dict[int, float] = {}
    if isinstance(pairs, list):
        for pair in pairs:
            if isinstance(pair, list | tuple) and len(pair) == 2 and isinstance(pair[0], int):
                until = _number(pair[1])
                if until is not None:
                    out[pair[0]] = until
    return out


def _returned(
    grants: list[Grant], session: Session, reason: str, at: float | None, linger: dict[int, float]
) -> list[Record]:
    """One ``in`` record per grant, in ascending id (the order the ledger drops them)."""
    out: list[Record] = []
    for g in grants:
        record = _seat("in", at, g, session)
        record["reason"] = reason
        if g.id in linger:
            record["linger"] = linger[g.id]
        out.append(record)
    return out


def _in(delta: Delta, ledger: LedgerView) -> list[Record]:
    session = _session(delta, ledger)
    reason = delta.get("reason", "checkin")
    if reason not in _RELEASE_REASONS:
        reason = "checkin"
    grant = _grant(delta.get("grant"), ledger, "release")
    record = _seat("in", _at(delta), grant, session)
    record["reason"] = reason
    if "linger" in delta:
        record["linger"] = _number(delta["linger"])
    return [record]


def _ended(reason: str) -> Callable[[Delta, LedgerView], list[Record]]:
    def ended(delta: Delta, ledger: LedgerView) -> list[Record]:
        session = _session(delta, ledger)
        grants = [_grant(gid, ledger, delta.get("k")) for gid in sorted(session.grants)]
        return _returned(grants, session, reason, _at(delta), _lingers(delta))

    return ended


def _take(delta: Delta, ledger: LedgerView) -> list[Record]:
    grant = _grant(delta.get("grant"), ledger, "take")
    reason = delta.get("reason")
    holder = _holder(grant, ledger, "take")
    record = _seat("in", _at(delta), grant, holder)
    record["reason"] = reason if reason in _TAKE_REASONS else "removed"
    return [record]


def _lapse(delta: Delta, ledger: LedgerView) -> list[Record]:
    """A hold's time ran out: a lingering seat's end, or a borrow's."""
    grant = _grant(delta.get("grant"), ledger, "lapse")
    hold = _holder(grant, ledger, "lapse")
    ev = "linger" if hold.hold == _LINGER else "return"
    record = _seat(ev, _at(delta), grant, hold)
    record["reason"] = "lapsed"
    return [record]


def _return(delta: Delta, ledger: LedgerView) -> list[Record]:
    """A borrow returned early (asked by the session ``sid``; the seat is in its hold)."""
    grant = _grant(delta.get("grant"), ledger, "return")
    hold = _holder(grant, ledger, "return")
    record = _seat("return", _at(delta), grant, hold)
    record["reason"] = "returned"
    return [record]


def _idle(delta: Delta, ledger: LedgerView) -> list[Record]:
    session = _session(delta, ledger)
    return [_who({"ev": "idle" if delta.get("idle") else "busy", "at": _at(delta)}, session)]


def _deny(delta: Delta, ledger: LedgerView) -> list[Record]:
    reply = delta.get("reply")
    if not isinstance(reply, dict) or reply.get("status") != "denied":
        return []  # an ``ok`` answer (a second open of a session) is no usage event
    session = _session(delta, ledger)
    at = _at(delta)
    reason = str(reply.get("reason"))
    op = delta.get("op")  # a borrow's or return's; a checkout's or checkin's names none
    if op not in _ASKED_OPS:
        op = "checkin" if reason == _NOT_HELD else "checkout"
    record: Record = {
        "ev": "deny",
        "at": at,
        "op": op,
        "reason": reason,
        "detail": str(reply.get("detail", "")),
        "req": delta.get("req"),
    }
    _who(record, session)
    for name in ("feature", "version", "count"):  # a checkout's; older logs lack them
        if delta.get(name) is not None:
            record[name] = delta[name]
    if "waited" in delta:
        return [*_waits(delta, session, at), record]
    return [record]


def _reread(delta: Delta, ledger: LedgerView) -> list[Record]:
    raw = delta.get("entitlements")
    lines = [
        {k: line.get(k) for k in ("feature", "version", "count", "expires")}
        for line in (raw if isinstance(raw, list) else [])
        if isinstance(line, dict)
    ]
    record: Record = {"ev": "reread", "at": _at(delta), "lines": lines}
    if "options" in delta:
        record["options"] = delta["options"] is not None
    return [record]


def _term(delta: Delta, ledger: LedgerView) -> list[Record]:
    """A new primary's no-op that names it (``peers/replica.py``)."""
    return [{"ev": "term", "at": _at(delta), "primary": delta.get("primary")}]


def _nothing(delta: Delta, ledger: LedgerView) -> list[Record]:
    return []


_HANDLERS: dict[str, Callable[[Delta, LedgerView], list[Record]]] = {
    "open": _nothing,  # a session alone holds no seat
    "grant": _out,
    "release": _in,
    "close": _ended("closed"),
    "expire": _ended("expired"),
    "take": _take,
    "lapse": _lapse,
    "return": _return,
    "idle": _idle,
    "answer": _deny,
    "reload": _reread,
    "term": _term,
}


def summary(ledger: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The entitlements (as ``reread`` lists them) and seats in use by feature of a
    ``zbroker.broker.ledger.Ledger``: what a ``gap`` record says holds after it."""
    lines = [
        {"feature": e.feature, "version": e.version, "count": e.count,
         "expires": e.expires.isoformat() if e.expires is not None else None}
        for e in ledger.entitlements
    ]  # fmt: skip
    return lines, {f["name"]: f["in_use"] for f in ledger.status()}


# --- the hash chain ----------------------------------------------------------------------


_SORTED = orjson.OPT_SORT_KEYS
# The fallback for what orjson refuses (an integer beyond 64 bits): the same canonical
# form, one encoder built once (json.dumps with arguments builds one per call).
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(record: Record) -> bytes:
    """The record's one JSON text, UTF-8: sorted keys, no blanks, non-ASCII as is.

    orjson writes it some six times faster than the json module (this is most of the
    report log's cost on a node: docs/reportlog.md, "Cost"); both write the same text
    for what records hold (strings, integers, finite floats, lists, maps).
    """
    try:
        return orjson.dumps(record, option=_SORTED)
    except TypeError:
        return _ENCODER.encode(record).encode()


def chain_hash(prev: str, body: bytes) -> str:
    return hashlib.sha256(prev.encode() + body).hexdigest()[:HASH_HEX]


def seal(record: Record, prev: str) -> tuple[bytes, str]:
    """The record's line (UTF-8, with its newline) and its hash, chained to ``prev``.

    The hash goes last, outside the sorted keys, so that a reader checks a line by
    cutting it off (``unseal``) without parsing and writing the JSON again.
    """
    body = canonical(record)
    h = chain_hash(prev, body)
    return b'%s,"h":"%s"}\n' % (body[:-1], h.encode()), h


_TAIL = len(b',"h":"') + HASH_HEX + len(b'"}')
_MARK = b',"h":"'


def unseal(line: bytes) -> tuple[bytes, str] | None:
    """(body, hash) of a sealed line without its newline; None when it is not one."""
    if len(line) <= _TAIL or not line.endswith(b'"}') or line[-_TAIL : -_TAIL + 6] != _MARK:
        return None
    return line[:-_TAIL] + b"}", line[-HASH_HEX - 2 : -2].decode("ascii", "replace")
