"""The record of a chaos run: JSON lines, one record per line, written as things happen.

Every record is a JSON object with ``type`` and ``t``, a ``time.monotonic()`` reading
(one clock for every process on a machine, so records of the runner and of every client
process can be merged and compared). The types:

``meta``      once, first: ``seed``, ``features`` (name -> total seats, from the triad's
              status), ``nodes`` (names in rank order), ``peer_timeout``, ``lease``,
              ``failback``, ``options`` (how the run was invoked).
``session``   a client session exists: ``process``, ``session``, ``user`` (the user name
              it opened with, which is how the triad's holders name it).
``invoke``    an operation starts: ``id`` (unique in the run, ``p<process>s<session>#<n>``),
              ``process``, ``session``, ``op`` (``checkout`` / ``checkin``), ``phase``
              (``load``, or ``final`` for the check-ins after the final status);
              checkout: ``feature``, ``count``, ``wait``; checkin: ``grant`` (the id),
              ``of`` (the id of the checkout that got it), ``after_lost`` (the lease had
              lapsed: the application no longer counted on the seats). Optional ``sid`` /
              ``req``: the protocol's session and request id, when the recorder knows them.
``complete``  its outcome: ``id``, ``status`` - ``ok``, ``denied`` (``reason``),
              ``unavailable`` (definite: nothing changed), ``unknown`` (no answer before
              the deadline: it may or may not have acted), ``error`` (a protocol error or
              a bug; ``detail``) - and for an ok checkout ``grant``:
              ``{id, feature, version, count}``.
``lost``      the library's ``on_lost``: ``process``, ``session``, ``grants``: a list of
              ``{id, feature, count, of, state}`` (``of``: the checkout's operation id).
``fault``     a nemesis: ``fault`` (its number), ``kind``, ``phase`` ``start`` / ``end``;
              at the end ``healed`` (the triad is whole again) and ``detail``.
``action``    one step of a fault: ``fault``, ``action`` (kill, pause, resume, start,
              wipe), ``node``, ``role`` (the node's role just before, as far as the
              nemesis knew: ``primary``, ``backup`` or ``down``).
``sample``    the triad's status, sampled: ``primary`` (serving, or null), ``roles``
              (name -> role), ``in_use`` (feature -> seats, the primary's word).
``phase``     the run's phase: ``load``, ``hold`` (clients stopped, holding), ``final``
              (final status taken: clients check in), ``end``.
``final``     each node's own view after the faults healed: ``primary`` and ``nodes``:
              name -> ``{role, term, commit, last, features}``, ``features`` name ->
              ``{total, in_use, holders: [{grant, user, count}]}``; null for a node that
              did not answer.

A line that does not parse is reported, not skipped silently: the checker treats a
damaged history as a failed check.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

FORMAT_VERSION = 1
RECORD_TYPES = frozenset(
    {"meta", "session", "invoke", "complete", "lost", "fault", "action", "sample", "phase", "final"}
)
STATUSES = frozenset({"ok", "denied", "unavailable", "unknown", "error"})

Record = dict[str, Any]


class HistoryError(Exception):
    """A history file cannot be read at all (missing, unreadable)."""


class Recorder:
    """Appends records to a JSON-lines file; safe to share between threads.

    Each record is flushed as it is written, so a process killed mid-run leaves a
    history that is whole up to its last line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[str] | None = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, type_: str, t: float | None = None, **fields: Any) -> Record:
        """Write one record; ``t`` defaults to now (``time.monotonic()``)."""
        if type_ not in RECORD_TYPES:
            raise ValueError(f"unknown history record type {type_!r}")
        record: Record = {"type": type_, "t": time.monotonic() if t is None else t, **fields}
        line = json.dumps(record, separators=(",", ":"), sort_keys=False) + "\n"
        with self._lock:
            if self._file is None:
                raise ValueError(f"recorder for {self.path} is closed")
            self._file.write(line)
            self._file.flush()
        return record

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_files(parts: Iterable[Path], out: Path) -> int:
    """Merge per-process history files into one, ordered by time; returns the record count.

    Lines that do not parse are kept (at the end) so the checker reports them.
    """
    keyed: list[tuple[float, int, str]] = []
    broken: list[str] = []
    seq = 0
    for part in parts:
        for line in part.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                t = float(json.loads(line)["t"])
            except (ValueError, KeyError, TypeError):
                broken.append(line)
                continue
            keyed.append((t, seq, line))
            seq += 1
    keyed.sort()
    with open(out, "w", encoding="utf-8") as f:
        for _, _, line in keyed:
            f.write(line + "\n")
        for line in broken:
            f.write(line + "\n")
    return len(keyed) + len(broken)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class GrantInfo:
    id: int
    feature: str
    count: int
    version: str = ""


@dataclass
class Op:
    """One client operation: its invocation and (if it came) its completion."""

    id: str
    op: str
    process: int
    session: int
    invoke_t: float
    line: int  # of the invocation, 1-based, to point at it
    phase: str = "load"
    feature: str | None = None
    count: int | None = None
    wait: float | None = None
    grant_ref: int | None = None  # checkin: the grant id it returns
    of: str | None = None  # checkin: the checkout op that got the grant
    after_lost: bool = False
    sid: str | None = None
    req: int | None = None
    complete_t: float | None = None
    complete_line: int | None = None
    status: str | None = None  # None: never completed (the recorder died first)
    grant: GrantInfo | None = None
    reason: str | None = None
    detail: str = ""

    @property
    def session_key(self) -> tuple[int, int]:
        return (self.process, self.session)

    def where(self) -> str:
        """How a report points at this operation."""
        at = f"line {self.line}"
        if self.complete_line is not None:
            at += f"/{self.complete_line}"
        return f"{self.id} ({self.op}, {at})"


@dataclass(frozen=True)
class LostNotice:
    t: float
    line: int
    process: int
    session: int
    grants: tuple[GrantInfo, ...]
    of: tuple[str | None, ...]  # per grant: the checkout op that got it
    states: tuple[str, ...]


@dataclass(frozen=True)
class Action:
    t: float
    action: str  # kill, pause, resume, start, wipe
    node: str
    role: str  # the node's role just before: primary, backup, down (or "" when unknown)


@dataclass
class Fault:
    id: int
    kind: str
    start: float
    line: int
    end: float | None = None
    healed: bool | None = None
    detail: str = ""
    nodes: list[str] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)


@dataclass
class History:
    meta: Record | None = None
    ops: dict[str, Op] = field(default_factory=dict)  # in invocation order
    lost: list[LostNotice] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    samples: list[Record] = field(default_factory=list)
    phases: list[tuple[float, str]] = field(default_factory=list)
    final: Record | None = None
    sessions: dict[str, tuple[int, int]] = field(default_factory=dict)  # user -> (p, s)
    errors: list[str] = field(default_factory=list)  # damage: line number and what
    first_t: float | None = None
    last_t: float | None = None

    @property
    def features(self) -> dict[str, int]:
        raw = (self.meta or {}).get("features") or {}
        return {str(k): int(v) for k, v in raw.items()}

    def phase_time(self, name: str) -> float | None:
        return next((t for t, p in self.phases if p == name), None)


def read_history(source: Path | Iterable[str]) -> History:
    """Parse a history file (or its lines); damage is collected in ``errors``."""
    if isinstance(source, Path):
        try:
            lines: Iterable[str] = source.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise HistoryError(f"cannot read history {source}: {exc.strerror}") from None
    else:
        lines = source
    history = History()
    faults: dict[int, Fault] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            _take(history, faults, record, number)
        except (ValueError, KeyError, TypeError) as exc:
            history.errors.append(f"line {number}: {exc}")
    return history


def _take(history: History, faults: dict[int, Fault], r: Mapping[str, Any], line: int) -> None:
    kind = r["type"]
    t = float(r["t"])
    history.first_t = t if history.first_t is None else min(history.first_t, t)
    history.last_t = t if history.last_t is None else max(history.last_t, t)
    if kind == "meta":
        if history.meta is not None:
            raise ValueError("a second meta record")
        history.meta = dict(r)
    elif kind == "session":
        history.sessions[str(r["user"])] = (int(r["process"]), int(r["session"]))
    elif kind == "invoke":
        _invoke(history, r, t, line)
    elif kind == "complete":
        _complete(history, r, t, line)
    elif kind == "lost":
        grants = [g for g in r["grants"]]
        history.lost.append(
            LostNotice(
                t=t,
                line=line,
                process=int(r["process"]),
                session=int(r["session"]),
                grants=tuple(_grant(g) for g in grants),
                of=tuple(_opt_str(g.get("of")) for g in grants),
                states=tuple(str(g.get("state", "")) for g in grants),
            )
        )
    elif kind == "fault":
        _fault(faults, history, r, t, line)
    elif kind == "action":
        number = int(r["fault"])
        if number not in faults:
            raise ValueError(f"action of fault {number} before its start")
        faults[number].actions.append(
            Action(t, str(r["action"]), str(r["node"]), str(r.get("role") or ""))
        )
    elif kind == "sample":
        history.samples.append(dict(r))
    elif kind == "phase":
        history.phases.append((t, str(r["phase"])))
    elif kind == "final":
        history.final = dict(r)
    else:
        raise ValueError(f"unknown record type {kind!r}")


def _invoke(history: History, r: Mapping[str, Any], t: float, line: int) -> None:
    op_id = str(r["id"])
    if op_id in history.ops:
        raise ValueError(f"operation {op_id} invoked twice")
    op = str(r["op"])
    if op not in ("checkout", "checkin"):
        raise ValueError(f"unknown operation {op!r}")
    history.ops[op_id] = Op(
        id=op_id,
        op=op,
        process=int(r["process"]),
        session=int(r["session"]),
        invoke_t=t,
        line=line,
        phase=str(r.get("phase", "load")),
        feature=_opt_str(r.get("feature")),
        count=_opt_int(r.get("count")),
        wait=None if r.get("wait") is None else float(r["wait"]),
        grant_ref=_opt_int(r.get("grant")),
        of=_opt_str(r.get("of")),
        after_lost=bool(r.get("after_lost", False)),
        sid=_opt_str(r.get("sid")),
        req=_opt_int(r.get("req")),
    )


def _complete(history: History, r: Mapping[str, Any], t: float, line: int) -> None:
    op = history.ops.get(str(r["id"]))
    if op is None:
        raise ValueError(f"completion of operation {r['id']} that was never invoked")
    if op.status is not None:
        raise ValueError(f"operation {op.id} completed twice (first at line {op.complete_line})")
    status = str(r["status"])
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    if t < op.invoke_t:
        raise ValueError(f"operation {op.id} completed before it was invoked")
    op.status = status
    op.complete_t = t
    op.complete_line = line
    op.reason = _opt_str(r.get("reason"))
    op.detail = str(r.get("detail") or "")
    if r.get("grant") is not None:
        op.grant = _grant(r["grant"])
    if op.op == "checkout" and status == "ok" and op.grant is None:
        raise ValueError(f"ok checkout {op.id} without its grant")


def _fault(
    faults: dict[int, Fault], history: History, r: Mapping[str, Any], t: float, line: int
) -> None:
    number = int(r["fault"])
    phase = r["phase"]
    if phase == "start":
        if number in faults:
            raise ValueError(f"fault {number} started twice")
        fault = Fault(
            id=number, kind=str(r["kind"]), start=t, line=line, nodes=list(r.get("nodes", []))
        )
        faults[number] = fault
        history.faults.append(fault)
    elif phase == "end":
        if number not in faults:
            raise ValueError(f"end of fault {number} that never started")
        fault = faults[number]
        fault.end = t
        fault.healed = bool(r.get("healed", True))
        fault.detail = str(r.get("detail") or "")
        fault.nodes = list(r.get("nodes", fault.nodes))
    else:
        raise ValueError(f"unknown fault phase {phase!r}")


def _grant(g: Mapping[str, Any]) -> GrantInfo:
    return GrantInfo(
        id=int(g["id"]),
        feature=str(g["feature"]),
        count=int(g["count"]),
        version=str(g.get("version") or ""),
    )


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value
