"""The report log's records: what one committed log entry means to a license administrator.

Theory of operation
-------------------
Every node applies the same committed entries, in the same order, to the same ledger.
``derive(index, term, delta, ledger)`` is called with the ledger as it stands *just
before* the entry is applied, and returns the records the entry yields; the seats in
use after the event are worked out from the state before it (a grant adds its count, a
checkin takes it away), so the function needs nothing but that one reading. Since its
inputs are the same on every node, so are its outputs: the three nodes' report logs
agree record for record, and each record carries the log index it came from (``ix``)
and its place among the records of that entry (``n``).

Records (schema ``SCHEMA``; docs/reportlog.md is the reference):

- ``term``: a new primary's no-op entry starts its term.
- ``reread``: a ``reload`` delta replaced the entitlements (``lines``).
- ``out``: a checkout granted (the grant delta).
- ``in``: seats returned, with ``reason`` ``checkin`` (a release), ``closed`` (the
  session closed: one record per grant it held), ``expired`` (its lease lapsed), or the
  release delta's own ``reason`` when it carries one (``timeout``, ``removed``, ``linger``).
- ``deny``: a request answered ``denied`` (an ``answer`` delta): one per request id,
  since a retry is answered from the recorded reply and makes no delta.
- ``dequeued``: before the ``out`` or ``deny`` of a checkout that waited in the queue,
  when its delta says how long (``waited``).
- ``unknown``: a delta kind this schema does not know, so that nothing passes unseen.

Every delta the ledger decides carries its wall time (``at``); a denied checkout's
``answer`` names the feature, version and count asked for; a grant or denial decided
from the queue says how long it waited (``waited``); a session keeps the address it
opened from and its project. Logs written before the deltas carried them still read:
a field a delta or session lacks is left out of the record (``at`` is null, and the
reader carries the last known time forward). Not carried yet (docs/reportlog.md, "What
the log lacks"): the primary's name at a term's start.

``seal`` chains the records: each line ends with ``"h"``, the first 32 hex digits of
sha256 over the previous line's ``h`` and the line's canonical JSON without it.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, Protocol

from zbroker.broker.seats import Grant, Session

SCHEMA = 1
GENESIS = "0" * 32  # the ``prev`` of the first record a report log ever holds
HASH_HEX = 32  # hex digits of sha256 kept: 128 bits
Record = dict[str, Any]
Delta = dict[str, Any]

# What a record says of the session that did it, when the session has it.
_SESSION_FIELDS = ("user", "host", "display", "client_version")
_OPTIONAL_SESSION_FIELDS = ("address", "project")  # empty in sessions of older logs
_RELEASE_REASONS = frozenset({"checkin", "timeout", "removed", "linger"})
_NOT_HELD = "not_held"  # the one denial of a checkin; every other is a checkout's


class LedgerView(Protocol):
    """What ``derive`` reads of the ledger before the entry is applied."""

    def session(self, sid: str) -> Session | None: ...

    def grant(self, gid: int) -> Grant | None: ...

    def in_use(self, feature: str, version: str | None = None) -> int: ...


class ReportLogError(Exception):
    """A committed delta the report cannot describe (it does not fit the ledger): the
    ledger refuses it too, so the node starts over before any record of it is written."""


def derive(index: int, term: int, delta: Delta | None, ledger: LedgerView) -> list[Record]:
    """The records of the committed entry (``index``, ``term``, ``delta``), from the
    ledger as it stands just before ``delta`` is applied."""
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


def _at(delta: Delta) -> float | None:
    at = delta.get("at")
    return float(at) if isinstance(at, int | float) and not isinstance(at, bool) else None


def _who(session: Session) -> Record:
    who: Record = {"sid": session.sid}
    for name in _SESSION_FIELDS:
        who[name] = getattr(session, name)
    for name in _OPTIONAL_SESSION_FIELDS:
        value = getattr(session, name, None)
        if value:
            who[name] = value
    return who


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


def _dequeued(delta: Delta, at: float | None) -> list[Record]:
    """A ``dequeued`` record when the delta says how long its checkout waited (a grant
    or denial the ledger decided from the queue)."""
    waited = delta.get("waited")
    if not isinstance(waited, int | float) or isinstance(waited, bool) or waited <= 0:
        return []
    record: Record = {"ev": "dequeued", "at": at, "waited": float(waited)}
    if isinstance(delta.get("feature"), str):
        record["feature"] = delta["feature"]
    return [record]


def _out(delta: Delta, ledger: LedgerView) -> list[Record]:
    session = _session(delta, ledger)
    feature, count, at = delta.get("feature"), delta.get("count"), _at(delta)
    if not isinstance(feature, str) or not isinstance(count, int):
        raise ReportLogError(f"grant delta {delta.get('grant')!r}: no feature or count")
    record = {
        "ev": "out",
        "at": at,
        "feature": feature,
        "version": delta.get("version"),
        "count": count,
        "grant": delta.get("grant"),
        **_who(session),
        "in_use": ledger.in_use(feature) + count,
    }
    return [*_dequeued(delta, at), record]


def _returned(
    grants: list[Grant], session: Session, reason: str, at: float | None, ledger: LedgerView
) -> list[Record]:
    """One ``in`` record per grant, in ascending id (the order the ledger drops them)."""
    out: list[Record] = []
    left: dict[str, int] = {}
    who = _who(session)
    for g in grants:
        in_use = left.get(g.feature, ledger.in_use(g.feature)) - g.count
        left[g.feature] = in_use
        out.append(
            {"ev": "in", "at": at, "reason": reason, "feature": g.feature, "version": g.version,
             "count": g.count, "grant": g.id, "since": g.at, **who, "in_use": in_use}
        )  # fmt: skip
    return out


def _in(delta: Delta, ledger: LedgerView) -> list[Record]:
    session = _session(delta, ledger)
    reason = delta.get("reason", "checkin")
    if reason not in _RELEASE_REASONS:
        reason = "checkin"
    grant = _grant(delta.get("grant"), ledger, "release")
    return _returned([grant], session, str(reason), _at(delta), ledger)


def _ended(reason: str) -> Callable[[Delta, LedgerView], list[Record]]:
    def ended(delta: Delta, ledger: LedgerView) -> list[Record]:
        session = _session(delta, ledger)
        grants = [_grant(gid, ledger, delta.get("k")) for gid in sorted(session.grants)]
        return _returned(grants, session, reason, _at(delta), ledger)

    return ended


def _deny(delta: Delta, ledger: LedgerView) -> list[Record]:
    reply = delta.get("reply")
    if not isinstance(reply, dict) or reply.get("status") != "denied":
        return []  # an ``ok`` answer (a second open of a session) is no usage event
    session = _session(delta, ledger)
    at = _at(delta)
    reason = str(reply.get("reason"))
    record: Record = {
        "ev": "deny",
        "at": at,
        "op": "checkin" if reason == _NOT_HELD else "checkout",
        "reason": reason,
        "detail": str(reply.get("detail", "")),
        "req": delta.get("req"),
        **_who(session),
    }
    for name in ("feature", "version", "count"):  # a checkout's; older logs lack them
        if delta.get(name) is not None:
            record[name] = delta[name]
    return [*_dequeued(delta, at), record]


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
    """A term delta that names its primary (not made today: docs/reportlog.md)."""
    return [{"ev": "term", "at": _at(delta), "primary": delta.get("primary")}]


def _nothing(delta: Delta, ledger: LedgerView) -> list[Record]:
    return []


_HANDLERS: dict[str, Callable[[Delta, LedgerView], list[Record]]] = {
    "open": _nothing,  # a session alone holds no seat
    "grant": _out,
    "release": _in,
    "close": _ended("closed"),
    "expire": _ended("expired"),
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


# One encoder for every line: json.dumps with arguments builds one per call (half its cost).
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(record: Record) -> str:
    """The record's one JSON text: sorted keys, no blanks, UTF-8 as is."""
    return _ENCODER.encode(record)


def chain_hash(prev: str, body: str) -> str:
    return hashlib.sha256((prev + body).encode()).hexdigest()[:HASH_HEX]


def seal(record: Record, prev: str) -> tuple[str, str]:
    """The record's line (with its newline) and its hash, chained to ``prev``.

    The hash goes last, outside the sorted keys, so that a reader checks a line by
    cutting it off (``unseal``) without parsing and writing the JSON again.
    """
    body = canonical(record)
    h = chain_hash(prev, body)
    return f'{body[:-1]},"h":"{h}"}}\n', h


_TAIL = len(',"h":"') + HASH_HEX + len('"}')


def unseal(line: str) -> tuple[str, str] | None:
    """(body, hash) of a sealed line without its newline; None when it is not one."""
    if len(line) <= _TAIL or not line.endswith('"}') or line[-_TAIL : -_TAIL + 6] != ',"h":"':
        return None
    return line[:-_TAIL] + "}", line[-HASH_HEX - 2 : -2]
