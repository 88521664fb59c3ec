"""The snapshot taker: a process beside each node that keeps a ledger of the committed
deltas and writes the snapshots the node asks for.

Why a process of its own: a snapshot of 1,000,000 grants takes seconds to write, and
the node's loop must answer meanwhile. A fork of the node would have the ledger for free,
but the fork itself copies the node's page tables on the loop: 7 ms per 500 MB idle, 34-44
ms at 540 MB on a busy machine (BENCHMARKS.md). The taker instead builds its ledger from
what the node already writes to its data directory, the snapshot file and the log, and
nothing of the node's memory: the loop's part of a snapshot is one line to a pipe.

It only ever applies committed deltas, read from the log on disk: the node asks for the
snapshot at its commit index, after that cycle's sync. An entry committed at ``index`` in
``term`` has the same history before it in every log that holds it (Log Matching), so
whatever version of the log file the taker reads, once it finds that entry there the
entries before it are the committed ones. Its ledger is kept between snapshots, and
brought forward by the deltas after it; it is rebuilt from the snapshot file when the log
no longer holds the entry its ledger ends at (a snapshot received from a peer, a data
directory set aside).

The cost is memory: the taker holds a second copy of the ledger (about as much as a
backup's: 755 MB at 1,000,000 grants, BENCHMARKS.md), and CPU at nice 19 while it writes.

Protocol, one JSON line each way: the node writes ``{"index": n, "term": t}`` to the
taker's stdin; the taker writes ``snapshot.taken.tmp`` (``Storage.write_taken``) and
answers ``{"index": n, "term": t, "ok": true}``, or ``"ok": false`` with ``"why"``. It
exits when its stdin closes, and the kernel kills it when the node dies
(``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zbroker.broker.apply import LedgerSettings
from zbroker.broker.ledger import Ledger
from zbroker.broker.limits import Limits
from zbroker.broker.seats import LedgerError
from zbroker.broker.storage import Storage, StorageError, read_log
from zbroker.peers.types import Image

Record = tuple[int, int, Any]  # (index, term, delta), as the log holds entries
# How long the taker looks for the entry it was asked for before it says it cannot: the
# node asks after the sync that wrote it, so it is found at once unless a compaction
# replaced the log under the read.
FIND_WITHIN = 2.0
_RETRY = 0.05


class NotYet(Exception):
    """The files do not hold the asked entry (yet): the snapshot cannot be taken now."""


class ShadowLedger:
    """The taker's ledger and the (index, term) of the last committed entry it applied.

    Pure: the files are read by the caller and handed in.
    """

    def __init__(self, settings: LedgerSettings) -> None:
        self.settings = settings
        self.ledger: Ledger | None = None
        self.index = 0
        self.term = 0

    def at(
        self, snapshot: Image | None, entries: Sequence[Record], index: int, term: int
    ) -> Ledger:
        """The ledger holding every committed delta up to ``index`` (of ``term``), from the
        snapshot and the log's ``entries`` (consecutive; those it covers may come first).
        NotYet when they do not hold that entry; LedgerError when a delta or the snapshot
        makes no ledger (the next call starts again from the snapshot)."""
        first = entries[0][0] if entries else 0
        snap_index, snap_term = (0, 0) if snapshot is None else (snapshot.index, snapshot.term)

        def term_at(i: int) -> int | None:
            if i == snap_index:
                return snap_term
            k = i - first
            return entries[k][1] if 0 <= k < len(entries) else None

        def goes_on(i: int) -> bool:  # the entries reach from i to index
            return i == index or term_at(i + 1) is not None

        if index < snap_index:
            raise NotYet(f"the node's snapshot at {snap_index} is past {index} already")
        if term_at(index) != term:
            raise NotYet(f"the log does not hold entry {index} of term {term}")
        mine = self.index
        if self.ledger is None or mine > index or term_at(mine) != self.term or not goes_on(mine):
            self._load(snapshot)
            if not goes_on(self.index):
                raise NotYet(f"the log does not follow the snapshot at {self.index}")
        ledger = self.ledger
        assert ledger is not None
        try:
            for _, entry_term, delta in entries[self.index + 1 - first : index + 1 - first]:
                if delta is not None:
                    ledger.apply(delta)
                self.index, self.term = self.index + 1, entry_term
        except LedgerError:
            self.ledger = None  # part of a delta may have applied: start again next time
            raise
        return ledger

    def _load(self, snapshot: Image | None) -> None:
        self.ledger = None
        if snapshot is None:
            self.ledger, self.index, self.term = self.settings.empty(), 0, 0
        else:
            ledger = self.settings.loader(snapshot).finish()
            self.ledger, self.index, self.term = ledger, snapshot.index, snapshot.term


# --- the taker process


def main() -> None:
    """``python -m zbroker.broker.taker SETTINGS``: serve the node that started it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the node
    settings = json.loads(sys.argv[1])
    _die_with(settings["parent"])
    os.nice(19)  # the loops of this host's nodes come first: they answer clients
    data = Path(settings["data"])
    shadow = ShadowLedger(
        LedgerSettings(settings["lease"], Limits(**settings["limits"]), settings["min_timeout"])
    )
    storage = Storage(data, settings["node"], fsync=settings["fsync"])  # only write_taken
    out = sys.stdout
    for line in sys.stdin:
        asked = json.loads(line)
        answer = {**asked, "ok": True}
        try:
            ledger = _find(shadow, data, asked["index"], asked["term"])
            storage.write_taken(ledger, asked["index"], asked["term"])
        except (NotYet, LedgerError, StorageError) as exc:
            answer.update(ok=False, why=str(exc))
        out.write(json.dumps(answer) + "\n")
        out.flush()


def _find(shadow: ShadowLedger, data: Path, index: int, term: int) -> Ledger:
    deadline = time.monotonic() + FIND_WITHIN
    while True:
        try:
            snapshot, entries = read_log(data)
            return shadow.at(snapshot, entries, index, term)
        except (NotYet, StorageError):  # StorageError: read while a compaction replaced it
            if time.monotonic() > deadline:
                raise
        time.sleep(_RETRY)


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when the node dies (PR_SET_PDEATHSIG): a
    snapshot would be of no use, and it would hold CPU and memory for nothing."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the node died before the call: nobody would kill us
        os._exit(0)


# --- the node's side


def answer_of(line: bytes, asked: tuple[int, int]) -> tuple[bool, str]:
    """The taker's answer line to the snapshot ``asked`` (index, term): (taken, why not).
    A line of anything else (a library that printed) is a failure, never an exception
    in the node's loop."""
    try:
        answer = json.loads(line)
        said, taken = (answer["index"], answer["term"]), answer["ok"] is True
        why = str(answer.get("why", ""))
    except (ValueError, TypeError, KeyError, AttributeError):
        return False, f"the taker answered {line[:80]!r}"
    if said != asked:
        return False, f"the taker answered for the snapshot at {said[0]}, not {asked[0]}"
    return taken, why


class Taker:
    """The node's handle on its taker process: started at the first snapshot asked for,
    asked one snapshot at a time, read without blocking the loop."""

    def __init__(self, data: Path, node: str, settings: LedgerSettings, *, fsync: bool) -> None:
        self._args = {
            "data": str(data),
            "node": node,
            "fsync": fsync,
            "lease": settings.lease,
            "limits": dataclasses.asdict(settings.limits),
            "min_timeout": settings.min_timeout,
        }
        self._process: subprocess.Popen[bytes] | None = None
        self._read = b""
        self.asked: tuple[int, int] | None = None  # (index, term) of the snapshot asked for
        self._unstarted = ""  # why the taker asked for could not start

    def ask(self, index: int, term: int) -> None:
        """Ask for the snapshot at ``index`` (of ``term``); one at a time."""
        assert self.asked is None
        self._unstarted = ""  # a failed start that stop() cut short says nothing of this one
        process = self._process
        if process is None or process.poll() is not None:
            # subprocess starts it with vfork: nothing of the node's memory is copied.
            args = json.dumps({**self._args, "parent": os.getpid()})
            command = [sys.executable, "-m", "zbroker.broker.taker", args]
            # It imports zbroker as this process did, however that was (an install, a path).
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            try:
                process = self._process = subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env
                )
            except OSError as exc:  # no descriptor or process left (a connection flood)
                self.asked, self._unstarted = (index, term), f"cannot start the taker: {exc}"
                return
            assert process.stdout is not None
            os.set_blocking(process.stdout.fileno(), False)
            self._read = b""
        assert process.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it died: answer() says so
            process.stdin.write(json.dumps({"index": index, "term": term}).encode() + b"\n")
        self.asked = (index, term)

    def answer(self) -> tuple[bool, str] | None:
        """The answer to the snapshot asked for, once there is one: (taken, why not)."""
        assert self.asked is not None
        if self._unstarted:
            self.asked, why, self._unstarted = None, self._unstarted, ""
            return False, why
        assert self._process is not None
        process = self._process
        assert process.stdout is not None
        try:
            got = os.read(process.stdout.fileno(), 4096)
        except BlockingIOError:
            got = None
        self._read += got or b""
        line, newline, self._read = self._read.partition(b"\n")
        asked = self.asked
        if newline:
            self.asked = None
            return answer_of(line, asked)
        self._read = line
        if got != b"":
            return None
        self.asked = None  # end of file: it died (it writes to stderr, the node's log, why)
        self._process = None
        return False, f"the snapshot taker ended with {process.wait()}"

    @property
    def pid(self) -> int | None:
        """The taker process's, while there is one."""
        return None if self._process is None else self._process.pid

    def stop(self) -> None:
        """End the taker, at once: a snapshot it was writing is of no use any more."""
        process, self._process = self._process, None
        self.asked = None
        if process is not None:
            process.kill()
            process.wait()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    pipe.close()


if __name__ == "__main__":
    main()
