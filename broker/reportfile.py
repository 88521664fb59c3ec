"""The report log on disk: the node's writer, and the reader that ``zbroker report`` uses.

Files
-----
A node's report log is a directory (``report_log`` in its config) of JSON-lines files
``report-<seq>-<YYYY-MM-DD>.jsonl``: ``seq`` counts up from 1 and orders them, the date
is the UTC day the file was started. Each file starts with a ``file`` header (the
schema, the node, the entitlements and seats in use so far, so that a file read alone
is understood), then the records of ``zbroker.broker.reportlog`` in log order. Every line is
sealed into one hash chain (``zbroker.broker.reportlog.seal``) that runs on from file to file:
a header's ``prev`` is the last hash of the file before it.

Rotation and retention. A new file starts when the current one reaches ``max_bytes``
or when a record arrives on a later UTC day than the file's. At each rotation, files
whose day is more than ``retention_days`` before the new file's are deleted (0 keeps
every file); the first file kept then names, in its ``prev``, a hash whose line is gone,
which ``verify`` reports as the start of what it can vouch for, not as tampering.

Resume. ``open`` reads the newest file: a torn last line (a crash in mid-write) is cut
off, and the last record's index is where the node takes up again: records for indexes
already written are skipped, so a restarted node that applies its committed log again
writes each record once. The shell then says from which index its ledger holds the
state (``applied_from``: its snapshot's index at start, or a snapshot it installed
from the primary). When that index lies beyond the last one written, the records in
between cannot be rebuilt (the deltas are folded into the snapshot): the writer says so
in a ``gap`` record naming the range and why, never a silent gap. Another node's log
holds those records, and ``zbroker report`` merges several nodes' logs by index.

Writes go through a buffer flushed once per cycle (``flush``), with no fsync: the
report log is derived data. A process crash loses nothing flushed; a power loss may
lose a tail, which the node writes again from its log if it still holds those entries,
and otherwise marks with a ``gap``.
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from zbroker.broker.reportlog import GENESIS, SCHEMA, Record, chain_hash, seal, summary, unseal

MAX_BYTES = 64 * 1024 * 1024  # a file rotates at this size: about 250,000 records
RETENTION_DAYS = 731  # two years: a renewal's year and the one before to compare with
_NAME = re.compile(r"report-(\d{6,})-(\d{4}-\d{2}-\d{2})\.jsonl\Z")
log = logging.getLogger("zbroker.node")


class ReportFileError(Exception):
    """A report log that cannot be read or written; the message names the file."""


def _day(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, tz=datetime.UTC).date().isoformat()


def log_files(directory: Path) -> list[Path]:
    """The report files of one node's directory, oldest first."""
    try:
        names = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    except OSError as exc:
        raise ReportFileError(f"{directory}: {exc.strerror or exc}") from None
    return [p for _, p in sorted(names)]


class ReportWriter:
    """Appends one node's records to its report log directory (see the module docstring).

    Owned by the node's loop thread. ``open`` before anything else; ``write`` records
    of committed entries in log order, ``flush`` once a cycle, ``close`` at the end.
    """

    def __init__(
        self,
        directory: Path,
        node: str,
        *,
        max_bytes: int = MAX_BYTES,
        retention_days: int = RETENTION_DAYS,
    ) -> None:
        self.dir = Path(directory)
        self.node = node
        self.max_bytes = max_bytes
        self.retention_days = retention_days
        self.last_index = 0  # the highest log index with records in the files
        self._prev = GENESIS  # the chain's last hash
        self._lines: list[dict[str, Any]] = []  # entitlements as of the last record
        self._in_use: dict[str, int] = {}  # seats in use by feature as of the last record
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._seq = 0
        self._day = ""
        self._size = 0

    # --- start ------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory or take up the newest file where it ends."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReportFileError(f"{self.dir}: {exc.strerror or exc}") from None
        files = log_files(self.dir)
        if not files:
            return
        path = files[-1]
        m = _NAME.match(path.name)
        assert m is not None  # log_files matched it
        self._seq, self._day = int(m.group(1)), m.group(2)
        try:
            self._resume(path)
            self._file = path.open("ab")
        except OSError as exc:
            raise ReportFileError(f"{path}: {exc.strerror or exc}") from None
        self._path = path
        self._size = path.stat().st_size

    def _resume(self, path: Path) -> None:
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line: cut it off, it is written again or gapped
            with path.open("r+b") as f:
                f.truncate(end)
        for raw in data[:end].splitlines():
            sealed = unseal(raw)
            if sealed is None:
                raise ReportFileError(f"{path}: a line is not a sealed record: {raw[:80]!r}")
            body, self._prev = sealed
            self._follow(orjson.loads(body))

    def _follow(self, record: Record) -> None:
        """Keep what a later file's header repeats: entitlements, seats in use, index."""
        ev = record.get("ev")
        if ev == "upto":
            self.last_index = max(self.last_index, int(record["to"]))
            return
        if ev == "file" or ev == "gap":
            self._lines = list(record.get("lines", self._lines))
            self._in_use = dict(record.get("in_use", self._in_use))
            self.last_index = max(self.last_index, int(record.get("to", 0)))
            return
        ix = record["ix"]
        if ix > self.last_index:
            self.last_index = ix
        if ev == "reread":
            self._lines = list(record["lines"])
        in_use = record.get("in_use")
        if in_use is not None:
            self._in_use[record["feature"]] = in_use

    def applied_from(
        self, index: int, lines: list[dict[str, Any]], in_use: dict[str, int], wall: float, why: str
    ) -> None:
        """The node's ledger holds the state at ``index`` (a snapshot), with these
        entitlements and seats in use: a gap record when the files end before it."""
        if index <= self.last_index:
            return
        gap = {"ev": "gap", "at": wall, "node": self.node, "from": self.last_index + 1,
               "to": index, "why": why, "lines": lines, "in_use": in_use}  # fmt: skip
        self._append([gap], wall)

    def covered(self, index: int, wall: float) -> None:
        """The records of every entry up to ``index`` are written (the node compacted its
        log there): an ``upto`` record when the last index with records is below it, so
        that a restart from that snapshot sees no gap where entries made no records."""
        if index > self.last_index:
            self._append([{"ev": "upto", "at": wall, "node": self.node, "to": index}], wall)

    # --- records ------------------------------------------------------------------

    def write(self, records: Sequence[Record], wall: float) -> None:
        """Append the records of committed entries, skipping indexes already written."""
        fresh = [r for r in records if r["ix"] > self.last_index]
        if fresh:
            self._append(fresh, wall)

    def _append(self, records: Sequence[Record], wall: float) -> None:
        day = _day(wall)
        if self._file is None or self._size >= self.max_bytes or day > self._day:
            self._rotate(day, wall)
        assert self._file is not None  # _rotate opened one
        lines = []
        prev = self._prev
        follow = self._follow
        for record in records:
            line, prev = seal(record, prev)
            lines.append(line)
            follow(record)
        data = b"".join(lines)  # one write per cycle: a crash tears one line at most
        try:
            self._file.write(data)
        except OSError as exc:
            raise ReportFileError(f"{self._path}: {exc.strerror or exc}") from None
        self._prev = prev
        self._size += len(data)

    def _rotate(self, day: str, wall: float) -> None:
        self.close()
        self._seq += 1
        self._day = day
        self._path = self.dir / f"report-{self._seq:06d}-{day}.jsonl"
        header = {"ev": "file", "v": SCHEMA, "node": self.node, "at": wall, "prev": self._prev,
                  "lines": self._lines, "in_use": self._in_use}  # fmt: skip
        line, h = seal(header, self._prev)
        try:
            self._file = self._path.open("ab")
            self._file.write(line)
        except OSError as exc:
            raise ReportFileError(f"{self._path}: {exc.strerror or exc}") from None
        self._prev = h
        self._size = len(line)
        self._expire(day)

    def _expire(self, today: str) -> None:
        if self.retention_days <= 0:
            return
        oldest = datetime.date.fromisoformat(today) - datetime.timedelta(self.retention_days)
        for path in log_files(self.dir)[:-1]:
            m = _NAME.match(path.name)
            if m is not None and datetime.date.fromisoformat(m.group(2)) < oldest:
                try:
                    path.unlink()
                except OSError as exc:
                    raise ReportFileError(f"{path}: {exc.strerror or exc}") from None

    def flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                raise ReportFileError(f"{self._path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError as exc:
                raise ReportFileError(f"{self._path}: {exc.strerror or exc}") from None


class NodeReportLog:
    """What the node's shell does with its report log, in three calls. A report log that
    cannot be written stops itself, never the node: licenses are served on, one error line
    says so, and the next start marks what was missed with a ``gap``."""

    def __init__(self, directory: Path, node: str) -> None:
        self.writer: ReportWriter | None = ReportWriter(directory, node)

    def start(self, snapshot_index: int, ledger: Any, wall: float, why: str) -> None:
        """Open the files, and say where the node's ledger starts (its snapshot)."""
        if self.writer is not None:
            self._guard(lambda w: (w.open(), w.applied_from(snapshot_index, *summary(ledger),
                                                            wall, why)))  # fmt: skip

    def cycle(
        self,
        records: Sequence[Record],
        installed: int | None,
        compacted: Sequence[int],
        ledger: Any,
        wall: float,
    ) -> None:
        """One cycle: a snapshot installed from the primary (a gap if the files end before
        it), the records of the entries committed, snapshots taken (``covered``)."""
        w = self.writer
        if w is None or not (records or installed is not None or compacted):
            return

        def write(w: ReportWriter) -> None:
            if installed is not None:
                why = f"the ledger was replaced by the primary's snapshot at {installed}"
                w.applied_from(installed, *summary(ledger), wall, why)
            w.write(records, wall)
            for index in compacted:
                w.covered(index, wall)
            w.flush()

        self._guard(write)

    def close(self) -> None:
        if self.writer is not None:
            self._guard(lambda w: w.close())

    def _guard(self, act: Any) -> None:
        w = self.writer
        assert w is not None  # callers check
        try:
            act(w)
        except (ReportFileError, OSError, ValueError) as exc:
            log.error("report log %s stops: %s; licenses are served on, and the next start "
                      "marks the records missed with a gap", w.dir, exc)  # fmt: skip
            self.writer = None
            with contextlib.suppress(ReportFileError):
                w.close()


# --- reading -----------------------------------------------------------------------------


def stream_files(arg: Path) -> list[Path]:
    """The files of one node's log: a directory's report files, or one file as given."""
    if arg.is_dir():
        files = log_files(arg)
        if not files:
            raise ReportFileError(f"{arg}: no report-*.jsonl files in this directory")
        return files
    if not arg.exists():
        raise ReportFileError(f"{arg}: no such file or directory")
    return [arg]


@dataclass(frozen=True)
class Line:
    """One record as read: where it is, and what it says."""

    path: Path
    number: int  # 1-based line number in its file
    record: Record


def read_stream(files: Iterable[Path]) -> Iterator[Line]:
    """The records of one node's files in order. A line that is not a sealed JSON record
    raises ReportFileError naming it (``verify`` says more)."""
    for path in files:
        try:
            f = path.open("rb")
        except OSError as exc:
            raise ReportFileError(f"{path}: {exc.strerror or exc}") from None
        with f:
            for number, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    break  # a torn last line: the writer cuts it when it opens the file
                try:
                    record = orjson.loads(raw)
                except ValueError:
                    raise ReportFileError(f"{path}:{number}: not a JSON record") from None
                if not isinstance(record, dict) or "ev" not in record:
                    raise ReportFileError(f"{path}:{number}: not a report record")
                problem = check_record(record)
                if problem is not None:
                    raise ReportFileError(f"{path}:{number}: {problem}")
                yield Line(path, number, record)


# --- what a record must hold -------------------------------------------------------------
#
# A line can hold a valid hash and still lack what the report needs (a writer's bug, a
# hand-made log, a line sealed by whoever can write the file): the reader checks every
# field the report reads of each event it knows, so that such a line is one error naming
# it, never a crash deep in the figures. Fields and events it does not know stay ignored
# (docs/reportlog.md: a reader ignores them).

MAX_INT = 2**53  # counts, indexes and grant ids past this are no real log's (and overflow floats)
MAX_TIME = 253_402_300_799.0  # 9999-12-31T23:59:59Z: the last second a date can print


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_INT


def _is_time(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= MAX_TIME


_INT = ("a whole number from 0 to 2**53", _is_int)
_TIME = ("a Unix time from 1970 to 9999", _is_time)
_TEXT = ("a string", lambda v: isinstance(v, str))
_SEAT = {"feature": _TEXT, "count": _INT, "grant": _INT, "in_use": _INT}
_ENTRY = ("term", "reread", "out", "borrow", "in", "linger", "return", "deny", "queued",
          "dequeued", "idle", "busy", "unknown")  # fmt: skip
# Fields each event needs (the value must pass the check), and fields it may lack but
# that, when present and not null, must pass it.
_NEEDS: dict[str, dict[str, tuple[str, Any]]] = {
    "out": _SEAT,
    "borrow": _SEAT,
    "in": _SEAT,
    "linger": _SEAT,
    "return": _SEAT,
    "gap": {"from": _INT, "to": _INT},
    "upto": {"to": _INT},
}
_MAY: dict[str, dict[str, tuple[str, Any]]] = {
    "in": {"since": _TIME},
    "linger": {"since": _TIME},
    "return": {"since": _TIME},
    "deny": {"feature": _TEXT},
    "queued": {"feature": _TEXT},
    "dequeued": {"feature": _TEXT},
}


def check_record(record: Record) -> str | None:
    """What a record lacks or holds wrongly for the report, in words (None: nothing).

    Checks the fields of the events the report knows: ``ix`` and ``n`` of every entry's
    record, ``at``, the seat fields, a reread's or header's ``lines`` and ``in_use``."""
    ev = record["ev"]
    if not isinstance(ev, str):
        return "a record whose 'ev' is not a string"
    what = f"{ev!r} record"
    if ev in _ENTRY or "ix" in record:  # an entry's record, or one the merge orders by index
        for name in ("ix", "n"):
            if not _is_int(record.get(name)):
                return _wrong(what, name, record, _INT[0])
    at = record.get("at")
    if at is not None and not _is_time(at):
        return _wrong(what, "at", record, _TIME[0] + ", or null")
    for name, (kind, ok) in _NEEDS.get(ev, {}).items():
        if not ok(record.get(name)):
            return _wrong(what, name, record, kind)
    for name, (kind, ok) in _MAY.get(ev, {}).items():
        value = record.get(name)
        if value is not None and not ok(value):
            return _wrong(what, name, record, kind + " when present")
    if ev == "reread" or (ev in ("file", "gap") and "lines" in record):
        problem = _lines_problem(record.get("lines"))
        if problem is not None:
            return f"{what}: 'lines' {problem}"
    if ev in ("file", "gap") and record.get("in_use") is not None:
        in_use = record["in_use"]
        if not isinstance(in_use, dict) or not all(_is_int(n) for n in in_use.values()):
            return f"{what}: 'in_use' must map features to {_INT[0]}"
    return None


def _wrong(what: str, name: str, record: Record, kind: str) -> str:
    if name not in record:
        return f"{what} without {name!r} ({kind})"
    return f"{what} whose {name!r} is not {kind}"


def _lines_problem(lines: Any) -> str | None:
    """A reread's or header's entitlement lines: a list of {feature, count, expires?}."""
    if not isinstance(lines, list):
        return "must be a list of entitlement lines"
    for k, line in enumerate(lines, 1):
        if not isinstance(line, dict):
            return f"line {k} is not an object"
        if not isinstance(line.get("feature"), str):
            return f"line {k} has no 'feature' string"
        count = line.get("count")
        if count is not None and not _is_int(count):  # null reads as 0, as before
            return f"line {k}: 'count' is not {_INT[0]}"
        expires = line.get("expires")
        if expires is not None and not isinstance(expires, str):
            return f"line {k}: 'expires' is not a date string or null"
    return None


@dataclass
class Merged:
    """What a merge of several nodes' logs found besides the records."""

    headers: list[Line] = field(default_factory=list)  # each stream's first header
    gaps: list[Line] = field(default_factory=list)
    conflicts: list[tuple[Line, Line]] = field(default_factory=list)  # same index, not equal
    spans: list[tuple[int, int]] = field(default_factory=list)  # each stream's first, last ix
    counts: list[int] = field(default_factory=list)  # each stream's records (with an index)
    ends: list[tuple[int, int]] = field(default_factory=list)  # each stream's last (ix, n)
    # (stream, ix, n): a record others hold that a stream lacks inside its own span and
    # outside its gaps. A node writes every record in log order and marks with a gap what it
    # cannot write, so such a hole is a deleted line (or a writer's bug), never normal.
    missing: list[tuple[int, int, int]] = field(default_factory=list)
    missing_count: int = 0


MAX_KEPT = 100  # gaps, conflicts and missing records kept for the report: memory stays bounded


def merge(streams: Sequence[Sequence[Path]], merged: Merged) -> Iterator[Line]:
    """The records of several nodes' logs, merged by (index, n), each once.

    Records of one index that differ between nodes are counted in ``merged.conflicts``
    (the first one read is kept); a record that a stream lacks although it holds records
    before and after it, and no gap of its own covers it, in ``merged.missing``; headers
    and gaps go to ``merged`` instead of out. A stream that starts later or ends sooner
    than the others (retention, a node down or behind) lacks nothing: ``spans`` and
    ``counts`` say how far each one goes.
    """
    n = len(streams)
    firsts: list[int | None] = [None] * n
    lasts = [0] * n
    ends = [(0, 0)] * n
    counts = [0] * n
    headed = [False] * n
    gaps: list[list[range]] = [[] for _ in range(n)]  # every gap of each stream (few)

    def keyed(k: int, files: Sequence[Path]) -> Iterator[tuple[int, int, int, Line]]:
        for line in read_stream(files):
            r = line.record
            if "ix" not in r:
                if r["ev"] == "file" and not headed[k]:
                    headed[k] = True
                    merged.headers.append(line)
                elif r["ev"] == "gap":
                    gaps[k].append(range(r["from"], r["to"] + 1))
                    if len(merged.gaps) < MAX_KEPT:
                        merged.gaps.append(line)
                continue
            yield r["ix"], r["n"], k, line

    # One head per stream, by (ix, n, stream): a stream's next record (and the gaps
    # before it) is read before any later key is looked at, so when a key is done every
    # stream that lacks it has its head past it and its gaps up to there known.
    iters = [keyed(k, files) for k, files in enumerate(streams)]
    heap = [head for it in iters if (head := next(it, None)) is not None]
    heapq.heapify(heap)
    alive = {head[2] for head in heap}
    while heap:
        ix, number, _, first = heap[0]
        holders: list[int] = []
        while heap and heap[0][:2] == (ix, number):
            _, _, k, line = heap[0]
            holders.append(k)
            if firsts[k] is None:
                firsts[k] = ix
            lasts[k] = ix
            ends[k] = (ix, number)
            counts[k] += 1
            differs = line is not first and not _same(line.record, first.record)
            if differs and len(merged.conflicts) < MAX_KEPT:
                merged.conflicts.append((first, line))
            head = next(iters[k], None)
            if head is None:
                heapq.heappop(heap)
                alive.discard(k)
            else:
                heapq.heapreplace(heap, head)
        for k in range(n):
            # begun before this key, records after it, no gap over it: a hole
            if k in holders or firsts[k] is None or k not in alive:
                continue
            if not any(ix in g for g in gaps[k]):
                merged.missing_count += 1
                if len(merged.missing) < MAX_KEPT:
                    merged.missing.append((k, ix, number))
        yield first
    merged.spans = [(f or 0, lasts[k]) for k, f in enumerate(firsts)]
    merged.counts = counts
    merged.ends = ends


def _same(a: Record, b: Record) -> bool:
    return {k: v for k, v in a.items() if k != "h"} == {k: v for k, v in b.items() if k != "h"}


# --- verify ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """A line that breaks the chain, or a file that does not follow the one before."""

    path: Path
    number: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.number}: {self.what}"


def verify(files: Sequence[Path], limit: int = MAX_KEPT) -> list[Finding]:
    """Check one node's chain line by line; each finding names the file and line.

    A changed line fails its own hash. A deleted line makes the next one fail, since it
    no longer follows the line before it. A file whose header's ``prev`` is not the last
    hash of the file before it has lost lines at that file's end, or a file between.
    Past a finding the check goes on from the line as it is, so one change is one finding.
    """
    found: list[Finding] = []
    prev: str | None = None
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            return [*found, Finding(path, 0, f"cannot be read: {exc}")]
        for number, raw in enumerate(data.split(b"\n")[:-1], 1):
            sealed = unseal(raw)
            if sealed is None:
                found.append(Finding(path, number, "not a sealed record (no hash at its end)"))
                continue
            body, h = sealed
            if number == 1:
                header_prev = _header_prev(body)
                if header_prev is None:
                    found.append(Finding(path, 1, "the first line is not a file header"))
                elif prev is not None and header_prev != prev:
                    what = "does not follow the file before it: lines at that file's end, or a file"
                    found.append(Finding(path, 1, what + ", were deleted"))
                if header_prev is not None:
                    prev = header_prev
            if prev is not None and chain_hash(prev, body) != h:
                what = "breaks the chain: this line was changed, or the line before it deleted"
                found.append(Finding(path, number, what))
            prev = h
            if len(found) >= limit:
                return found
    return found


def _header_prev(body: bytes) -> str | None:
    try:
        record = orjson.loads(body)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("ev") != "file":
        return None
    prev = record.get("prev")
    return prev if isinstance(prev, str) else None
