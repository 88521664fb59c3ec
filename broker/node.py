"""One zbroker node: the thin executor of its core (``broker/core.py``).

It owns everything the core must not touch: the sockets (``broker/sockets.py``), the
clock, the data directory and the signals, and decides nothing. One thread, one poll
loop (a reread's files are read on a thread of their own: ``Rereader``); each cycle
reads the clock once, drains the peer ROUTER, the heartbeat SUB, the connection monitors
and the client ROUTER into the core (``step``), then carries out the core's
``Ready`` in the order the core's docstring gives: early sends, persist, one sync (group
commit), the caught-up marker, peer sends and client answers, ``advance``, then a start
over or a stop.

The license and the data directory are read in ``run`` (``_start``), never in the
constructor: a second process for the directory stops there (``DataDirLocked``), damage
found in it makes the node start as a wiped one, and a disk error while running stops
the node (``DiskError``).
"""

from __future__ import annotations

import gc
import logging
import math
import queue
import signal
import threading
import time
from pathlib import Path
from typing import TypeAlias, assert_never

import zmq

from zbroker.broker.apply import LedgerSettings
from zbroker.broker.based import restrict
from zbroker.broker.borrow import load_borrow_key
from zbroker.broker.config import Config, ConfigError, load_config, server_changes
from zbroker.broker.core import (
    Append,
    NodeCore,
    Ready,
    SaveHardState,
    SaveSnapshot,
    SaveSnapshotChunk,
    SnapshotTaken,
    Truncate,
)
from zbroker.broker.license import LicenseError, load_license
from zbroker.broker.metrics import Metrics
from zbroker.broker.model import Now
from zbroker.broker.options import Options, load_options
from zbroker.broker.reportfile import NodeReportLog
from zbroker.broker.reportlog import Record
from zbroker.broker.seats import LedgerError
from zbroker.broker.security import NodeSecurity
from zbroker.broker.served import OwnLicense
from zbroker.broker.signing import load_public_key
from zbroker.broker.sockets import NodeSockets
from zbroker.broker.storage import LOG, SNAPSHOT, Loaded, Storage, StorageError
from zbroker.broker.taker import Taker
from zbroker.peers.types import CorruptState

log = logging.getLogger("zbroker.node")

# A change of the wall clock against the monotonic one by more than this (seconds) from
# one cycle to the next is a step (set by hand, or by NTP after a long drift), logged once:
# the primary's wall-time deadlines move with it (broker/core.py judges it against the
# peers' clocks). NTP's slewing moves it by at most half a millisecond a second.
CLOCK_STEP = 1.0
FREEZE_EVERY = 1.0  # seconds between two gc.freeze() of what the loop built (_carry_out)
# Seconds between two records of the directory's progress beside it (Storage.save_progress):
# a small write a second, none of it on a client's path.
PROGRESS_EVERY = 1.0

# Signals whose default action would end the node without its "stopped" line and with
# nothing it asks for: each is logged (with why) and the node serves on. SIGTERM, SIGINT
# and SIGQUIT stop it cleanly. (Python itself ignores SIGPIPE and SIGXFSZ: a write past
# the file size limit fails with EFBIG, a disk error like any other.)
# The report log's records wait in the shell until the oldest is this old (seconds), then
# are written together. Written in the cycle that answered, they held the CPU (a JSON line
# and a chained hash each, a write and a flush) while that cycle's answers and acks were
# still on their way through the ZeroMQ I/O threads: on 2 cores a replicated checkout at
# one outstanding took 20-25 % longer with the report log on than off (BENCHMARKS.md,
# issue 17, item 4). A crash loses at most these; the next start writes them again from
# the log, or marks a gap where a snapshot covers them (broker/reportfile.py).
REPORT_EVERY = 0.01

_IGNORED_SIGNALS = {
    signal.SIGUSR1: "; still serving",
    signal.SIGUSR2: "; still serving",
    signal.SIGALRM: "; still serving",
}


class Node:
    def __init__(self, config: Config, name: str) -> None:
        self.config = config
        self.me = config.node(name)
        self.security = NodeSecurity.from_config(config, name)  # keys checked before any I/O
        # Nothing of the data directory is read before run() holds its lock (_start).
        self.storage = Storage(
            self.me.data, name, fsync=config.fsync, nodes=[n.name for n in config.nodes]
        )
        self.stopping = False
        self.stopped_by = ""  # why the loop ended, for the "stopped" line
        self.ignored_signals: list[int] = []  # noted by the handler, logged by the loop
        self.reread_asked = False  # SIGHUP (FlexNet's lmreread): noted by the handler
        self.rereader = Rereader(config.path)  # reads the files off the loop (_reread)
        # Prometheus metrics when the config asks (broker/metrics.py): served off the loop.
        self.metrics = None if self.me.metrics is None else Metrics(name, self.me.metrics)
        # The report log (docs/reportlog.md): written after each cycle's sends.
        self.report_log = (
            None if self.me.report_log is None else NodeReportLog(self.me.report_log, name)
        )
        self.report_waiting: list[Record] = []  # records not written yet (_report)
        self.report_since = 0.0  # when the first of them came (monotonic)
        self.frozen_at = 0.0  # the last gc.freeze (monotonic): see _carry_out
        self.progress_at = 0.0  # the last save_progress (monotonic)
        self.progress_failed = False  # said once, until it works again
        self.taker = Taker(
            self.me.data, name, LedgerSettings.of(config), fsync=config.fsync
        )  # started at the first snapshot the core asks for

    def _start(self) -> None:
        """Read the license, own the data directory, read it, and build the core from it.

        StorageError when the directory is locked by another process or unusable; damage
        comes back as a fresh state, and the node recovers as a wiped one does.
        """
        own, options = self._read_license(self.config)
        try:
            loaded = self.storage.load()
            try:
                self.core = self._core(own, options, loaded)
            except (LedgerError, CorruptState) as exc:
                # Records whole and well-shaped that still make no ledger or log: damage.
                name = SNAPSHOT if isinstance(exc, LedgerError) else LOG
                loaded = self.storage.set_aside(f"{self.storage.dir / name}: {exc}")
                self.core = self._core(own, options, loaded)
            if self.report_log is not None:
                index = self.core.applied.index  # the snapshot's, which the ledger holds
                why = f"the node started from its snapshot at {index}"
                self.report_log.start(index, self.core.ledger, time.time(), why)
        except BaseException:
            self.storage.close()  # the lock goes with it
            raise

    def _core(self, own: OwnLicense, options: Options | None, loaded: Loaded) -> NodeCore:
        now = Now(time.monotonic(), time.time())
        mode = self.security.mode
        key = self.config.borrow_key
        return NodeCore(
            self.config, self.me.name, own.entitlements, loaded, now, mode=mode, options=options,
            borrow_key=None if key is None else load_borrow_key(key),
            signed=own.signed, vendor_key=own.key, refused=own.refused,
        )  # fmt: skip

    # --- life cycle
    def run(self) -> None:
        logging.basicConfig(
            level=logging.INFO,
            format=f"%(asctime)s {self.me.name} %(levelname)s %(message)s",
        )
        # Locked or unusable: StorageError before anything is served (the CLI exits 3).
        self._start()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, self._on_signal)
        for signum in _IGNORED_SIGNALS:
            signal.signal(signum, self._on_ignored_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        ctx = zmq.Context()
        try:
            self.sockets = NodeSockets(ctx, self.config, self.me, self.security)
            if self.metrics is not None:
                self.metrics.serve()  # after the binds: a node already running fails there
            log.info(
                "node %s serving clients at %s (rank %d of %d)",
                self.me.name,
                self.me.client,
                self.me.rank + 1,
                len(self.config.nodes),
            )
            gc.freeze()  # see _carry_out: the loaded ledger is long-lived
            self._loop()
        except StorageError as exc:  # a disk error: stop; the others fail over
            log.error("node %s stopping: %s", self.me.name, exc)
            self.stopped_by = " on a disk error"
            raise
        except BaseException:
            self.stopped_by = self.stopped_by or " on an error"
            raise
        finally:
            self.taker.stop()
            try:
                self._close_storage()
            finally:
                ctx.destroy(linger=0)
                if self.metrics is not None:  # after the sockets: peers see us gone at once
                    self.metrics.close()
                if self.report_log is not None:
                    self._write_report()
                    self.report_log.close()
                log.info("node %s stopped%s", self.me.name, self.stopped_by)

    def _close_storage(self) -> None:
        try:
            self.storage.close()
        except StorageError as exc:  # the last sync failed
            log.error("node %s stopping: %s", self.me.name, exc)
            raise

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True  # the loop sees it within one poll timeout
        self.stopped_by = f" on {signal.Signals(signum).name}"

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reread_asked = True  # the loop rereads: no I/O inside a handler

    def _reread(self, read: Reread, now: Now) -> None:
        """SIGHUP: the license and options files read again, as at start (``Rereader``). A
        primary replicates them (one reload delta, so every node switches at the same point
        of the log); a backup compares them with the triad's (broker/served.py). A file
        that does not load changes nothing."""
        if isinstance(read, ConfigError | LicenseError):  # an options file's: LicenseErrors
            log.error("reread refused, nothing changed: %s", read)
            return
        if isinstance(read, BaseException):
            raise read  # a bug in the reading: as if it had failed on the loop
        config, own, options, warnings = read
        for line in warnings:
            log.warning("%s", line)
        self.core.reread(
            own.entitlements, options, own.signed, own.key, now, own.refused,
            restart=server_changes(self.config, config),
        )  # fmt: skip

    def _read_license(self, config: Config) -> tuple[OwnLicense, Options | None]:
        """``config``'s license and options file at start (``read_files``); their warnings
        are logged. A reread reads them off the loop (``Rereader``)."""
        own, options, warnings = read_files(config)
        for line in warnings:
            log.warning("%s", line)
        return own, options

    def _on_ignored_signal(self, signum: int, frame: object) -> None:
        self.ignored_signals.append(signum)  # logging inside a handler could deadlock

    def _log_ignored_signals(self) -> None:
        signums, self.ignored_signals = self.ignored_signals, []
        for signum in map(signal.Signals, signums):
            why = _IGNORED_SIGNALS.get(signum, "")
            log.warning("node %s ignores %s%s", self.me.name, signum.name, why)

    # --- the loop
    def _loop(self) -> None:
        sockets = self.sockets
        wake_at = 0.0
        clock = time.time() - time.monotonic()  # the wall clock against the monotonic one
        while not self.stopping:
            timeout = max(0.0, wake_at - time.monotonic())
            # Round up: poll(0) for the last millisecond before a tick would spin the CPU.
            ready = sockets.poll(math.ceil(timeout * 1000))
            now = Now(time.monotonic(), time.time())
            if abs(now.wall - now.mono - clock) > CLOCK_STEP:
                log.warning(
                    "node %s's wall clock stepped %+.1f s: linger, borrow and TIMEOUT "
                    "deadlines and the report log's times follow it; keep the clock set by "
                    "NTP (docs/deploy.md, Clocks)",
                    self.me.name,
                    now.wall - now.mono - clock,
                )
            clock = now.wall - now.mono
            if self.ignored_signals:
                self._log_ignored_signals()
            if self.reread_asked:  # SIGHUP, or an administrator's reread last cycle
                self.reread_asked = False
                log.info("node %s rereads the license and options", self.me.name)
                self.rereader.ask()
            for read in self.rereader.done():
                self._reread(read, now)
            self.core.rereading = self.rereader.busy()
            if self.taker.asked is not None:
                self._reap(now)
            sockets.read(ready, self.core.step, now)
            out = self.core.ready(now)
            self._carry_out(out)
            if self.metrics is not None:  # after the sends: answers never wait for it
                self.metrics.observe(out.latencies)
                self.metrics.refresh(self.core, now)  # a snapshot once a second at most
            wake_at = out.wake_at
            if out.stop:
                self.stopping = True
                self.stopped_by = " as an administrator asked (zbroker down)"
            if out.reread:
                self.reread_asked = True
                wake_at = 0.0  # at once: the reply has left, the files are read next

    def _save_progress(self, at: float) -> None:
        """The term and committed index this directory holds, beside it (a restored copy
        is found older at the next start: Storage.save_progress)."""
        self.progress_at = at
        why = self.storage.save_progress(self.core.replica.commit)
        if why is not None and not self.progress_failed:
            log.warning("%s; a copy of the data directory restored later goes unnoticed", why)
        self.progress_failed = why is not None

    # --- snapshots, taken by the taker process (broker/taker.py)
    def _reap(self, now: Now) -> None:
        """The taker's snapshot, once it answers: handed to the core (None if not taken)."""
        asked = self.taker.asked
        answer = self.taker.answer()
        if asked is None or answer is None:
            return
        taken, why = answer
        image = None
        if taken:
            try:
                image = self.storage.taken_image(*asked)
            except StorageError as exc:
                why = str(exc)
        if image is None:
            log.error("snapshot at %d not taken: %s", asked[0], why)
        self.core.step(SnapshotTaken(image), now)

    def _carry_out(self, out: Ready) -> None:
        """Carry out one cycle's Ready, in the order the core's contract gives."""
        storage = self.storage
        if out.early:  # before the writes, which vouch for nothing until the sync either
            self.sockets.send_peers(out.early)
        for op in out.persist:
            match op:
                case Append(entries=entries):
                    storage.append(entries)
                case Truncate(from_index=from_index):
                    storage.truncate(from_index)
                case SaveHardState(term=term, voted_for=voted_for):
                    storage.save_hard_state(term, voted_for)
                case SaveSnapshotChunk(index=index, term=term, offset=offset, data=data):
                    storage.save_snapshot_chunk(index, term, offset, data)
                case SaveSnapshot(image=image, source=source):
                    storage.save_snapshot(image, source)
                case _:
                    assert_never(op)
        storage.sync()  # group commit: nothing below may leave before this
        if out.take_snapshot is not None and self.taker.asked is None:
            self.taker.ask(*out.take_snapshot)  # the taker reads its entries from the log
        if out.mark_recovered:
            storage.mark_recovered()
        if out.peer:
            self.sockets.send_peers(out.peer)
        self.sockets.send_answers(out.answers)
        if self.report_log is not None:  # after the sends: answers never wait for it
            self._report(out)
        self.core.advance()
        at = time.monotonic()
        if at >= self.progress_at + PROGRESS_EVERY:
            self._save_progress(at)
        if self.core.applied.installing is not None or at >= self.frozen_at + FREEZE_EVERY:
            # The ledger and log are long-lived and acyclic: keep the cyclic GC from
            # rescanning them (a list splice: cheap). A full collection scans every object
            # not frozen: frozen at each compaction only, that was 25-190 ms of objects
            # at 200,000 grants on a busy machine, and 40-200 ms at 100,000 before
            # snapshots left the loop, each collecting nothing. An install builds a
            # ledger of millions of objects, a step at a time. The price: cyclic garbage
            # that lived past a freeze is never collected (the node makes little).
            gc.freeze()
            self.frozen_at = at
        if out.start_over is not None:
            self._write_report()
            now = Now(time.monotonic(), time.time())
            self.core.restart(storage.set_aside(out.start_over), now)

    def _report(self, out: Ready) -> None:
        """The cycle's report records, written with those waiting once the oldest has
        waited ``REPORT_EVERY``; at once with an installed or a taken snapshot, whose
        marks must follow the records before them."""
        compacted = [
            op.image.index
            for op in out.persist
            if type(op) is SaveSnapshot and op.source == "taken"  # received: a gap
        ]
        if out.report_from is not None or compacted:
            self._write_report()
            assert self.report_log is not None  # the caller checks
            ledger = self.core.ledger
            self.report_log.cycle(out.report, out.report_from, compacted, ledger, time.time())
            return
        if out.report:
            if not self.report_waiting:
                self.report_since = time.monotonic()
            self.report_waiting += out.report
        if self.report_waiting and time.monotonic() - self.report_since >= REPORT_EVERY:
            self._write_report()

    def _write_report(self) -> None:
        """Write the report records waiting (``_report``)."""
        if self.report_log is not None and self.report_waiting:
            records, self.report_waiting = self.report_waiting, []
            self.report_log.cycle(records, None, [], self.core.ledger, time.time())


# What a reread gives the loop: the files read (``read_files``), or why not.
Reread: TypeAlias = tuple[Config, OwnLicense, Options | None, list[str]] | BaseException


class Rereader:
    """Reads the config's license and options files again (a reread) on a thread of its
    own, and hands the result to the loop (``done``, read each cycle). Parsing and
    verifying a large license takes seconds (0.2 ms a line): on the loop it stalled
    heartbeats past peer_timeout and cost an election (SPEC §6). The thread touches no
    socket and no state of the node's. A reread asked while one runs is done once more
    after it (the files may have changed since it read them), however often asked."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._results: queue.SimpleQueue[Reread] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False
        self._again = False

    def ask(self) -> None:
        with self._lock:
            if self._running:
                self._again = True
                return
            self._running = True
        threading.Thread(target=self._run, name="zbroker-reread", daemon=True).start()

    def busy(self) -> bool:
        """A reread is asked and its result not yet handed to the loop (it may stay true
        a cycle after the last result: never false too early)."""
        # No lock: the thread puts its result before it clears _running, so a read
        # between the two sees one of them (asked each cycle, it must cost nothing).
        return self._running or not self._results.empty()

    def done(self) -> list[Reread]:
        """The rereads finished since the last call, oldest first (never waits)."""
        if self._results.empty():  # nearly every cycle: no exception raised and caught
            return []
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def _run(self) -> None:
        while True:
            result: Reread
            try:
                # The config again for the files it names now (an options file newly
                # set); its other settings take effect at the next start only.
                config = load_config(self._path)
                result = (config, *read_files(config))
            except Exception as exc:  # handed to the loop: raised there unless expected
                result = exc
            self._results.put(result)
            with self._lock:
                if not self._again:
                    self._running = False
                    return
                self._again = False


def read_files(config: Config) -> tuple[OwnLicense, Options | None, list[str]]:
    """``config``'s license (its verified lines and the vendor key) and options file, as a
    node serves them, and the warnings a person should read: lines refused, options lines
    ignored or naming a feature the license lacks. LicenseError when either does not load,
    or when no line of the license verifies: a node with nothing to vouch for could only
    serve, or refuse, what another node says (broker/served.py). Read by a node at start
    and on a reread, and by ``zbroker up`` and ``zbroker reread`` before they act."""
    vendor_key = load_public_key(config.vendor_key)
    license_file = load_license(config.license_path, vendor_key)
    path = config.options
    options = None if path is None else load_options(path)
    entitlements = tuple(license_file.entitlements)
    features = {e.feature for e in entitlements}
    warnings = [] if options is None else options.warnings(features)
    _, based = restrict(entitlements, options)  # USER_BASED/HOST_BASED INCLUDEs ignored
    if not entitlements:
        first = f"; the first: {license_file.refused[0]}" if license_file.refused else ""
        raise LicenseError(
            f"{config.license_path}: no FEATURE/INCREMENT line verifies against the vendor "
            f"key {config.vendor_key} ({len(license_file.refused)} refused{first}): check "
            "that the file and the key are the vendor's, the same as on the other nodes"
        )
    signed = tuple(license_file.signed)
    refused = tuple(map(str, license_file.refused))
    own = OwnLicense(str(config.license_path), entitlements, signed, vendor_key, refused)
    return own, options, [*map(str, license_file.refused), *warnings, *based]
