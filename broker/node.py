"""One zbroker node: the thin executor of its core (``broker/core.py``).

It owns everything the core must not touch: the sockets (``broker/sockets.py``), the
clock, the data directory and the signals, and decides nothing. One thread, one poll
loop; each cycle reads the clock once, drains the peer ROUTER, the heartbeat SUB, the
connection monitors and the client ROUTER into the core (``step``), then carries out the core's
``Ready`` in the order the core's docstring gives: persist, early sends, one sync (group
commit), the caught-up marker, peer sends and client answers, ``advance``, then a start
over or a stop.

The license and the data directory are read in ``run`` (``_start``), never in the
constructor: a second process for the directory stops there (``DataDirLocked``), damage
found in it makes the node start as a wiped one, and a disk error while running stops
the node (``DiskError``).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import os
import signal
import time
from typing import assert_never

import zmq

from zbroker.broker.based import restrict
from zbroker.broker.borrow import load_borrow_key
from zbroker.broker.config import Config, ConfigError, load_config
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
from zbroker.broker.seats import LedgerError
from zbroker.broker.security import NodeSecurity
from zbroker.broker.served import OwnLicense
from zbroker.broker.signing import load_public_key
from zbroker.broker.sockets import NodeSockets
from zbroker.broker.storage import LOG, SNAPSHOT, Loaded, Storage, StorageError
from zbroker.peers.types import CorruptState

log = logging.getLogger("zbroker.node")

# Signals whose default action would end the node without its "stopped" line and with
# nothing it asks for: each is logged (with why) and the node serves on. SIGTERM, SIGINT
# and SIGQUIT stop it cleanly. (Python itself ignores SIGPIPE and SIGXFSZ: a write past
# the file size limit fails with EFBIG, a disk error like any other.)
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
        self.ignored_signals: list[int] = []  # noted by the handler, logged by the loop
        self.reread_asked = False  # SIGHUP (FlexNet's lmreread): noted by the handler
        # Prometheus metrics when the config asks (broker/metrics.py): served off the loop.
        self.metrics = None if self.me.metrics is None else Metrics(name, self.me.metrics)
        # The report log (docs/reportlog.md): written after each cycle's sends.
        self.report_log = (
            None if self.me.report_log is None else NodeReportLog(self.me.report_log, name)
        )
        self.taking: tuple[int, int, int] | None = None  # (pid, index, term): see _take_snapshot

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
            signed=own.signed, vendor_key=own.key,
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
            raise
        finally:
            self._stop_taking()
            try:
                self._close_storage()
            finally:
                ctx.destroy(linger=0)
                if self.metrics is not None:  # after the sockets: peers see us gone at once
                    self.metrics.close()
                if self.report_log is not None:
                    self.report_log.close()
                log.info("node %s stopped", self.me.name)

    def _close_storage(self) -> None:
        try:
            self.storage.close()
        except StorageError as exc:  # the last sync failed
            log.error("node %s stopping: %s", self.me.name, exc)
            raise

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True  # the loop sees it within one poll timeout

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reread_asked = True  # the loop rereads: no I/O inside a handler

    def _reread(self, now: Now) -> None:
        """SIGHUP: read the license and options files again, as at start. A primary
        replicates them (one reload delta, so every node switches at the same point of the
        log); a backup compares them with the triad's (broker/served.py). A file that does
        not load changes nothing."""
        self.reread_asked = False
        log.info("node %s rereads the license and options", self.me.name)
        try:
            # The config again for the files it names now (an options file newly set);
            # its other settings take effect at the next start only.
            own, options = self._read_license(load_config(self.config.path))
        except (ConfigError, LicenseError) as exc:  # an options file's errors are LicenseErrors
            log.error("reread refused, nothing changed: %s", exc)
            return
        self.core.reread(own.entitlements, options, own.signed, own.key, now)

    def _read_license(self, config: Config) -> tuple[OwnLicense, Options | None]:
        """``config``'s license (its verified lines and the vendor key) and options file, as
        at start and on a reread; their warnings are logged. LicenseError when either does
        not load, or when no line of the license verifies: a node with nothing to vouch
        for could only serve, or refuse, what another node says (broker/served.py)."""
        vendor_key = load_public_key(config.vendor_key)
        license_file = load_license(config.license_path, vendor_key)
        path = config.options
        options = None if path is None else load_options(path)
        warnings = () if options is None else options.warnings()
        entitlements = tuple(license_file.entitlements)
        _, based = restrict(entitlements, options)  # USER_BASED/HOST_BASED INCLUDEs ignored
        for line in (*license_file.refused, *warnings, *based):
            log.warning("%s", line)
        if not entitlements:
            raise LicenseError(
                f"{config.license_path}: no FEATURE/INCREMENT line verifies against the vendor "
                f"key {config.vendor_key} ({len(license_file.refused)} refused, above): check "
                "that the file and the key are the vendor's, the same as on the other nodes"
            )
        signed = tuple(license_file.signed)
        return OwnLicense(str(config.license_path), entitlements, signed, vendor_key), options

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
        while not self.stopping:
            timeout = max(0.0, wake_at - time.monotonic())
            # Round up: poll(0) for the last millisecond before a tick would spin the CPU.
            ready = sockets.poll(math.ceil(timeout * 1000))
            now = Now(time.monotonic(), time.time())
            if self.ignored_signals:
                self._log_ignored_signals()
            if self.reread_asked:  # SIGHUP, or an administrator's reread last cycle
                self._reread(now)
            if self.taking is not None:
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
            if out.reread:
                self.reread_asked = True
                wake_at = 0.0  # at once: the reply has left, the files are read next

    # --- snapshots, taken in a child
    def _take_snapshot(self, index: int, term: int) -> None:
        """Snapshot the ledger in a forked child, which has it as it is now (copy on
        write) and writes it while this loop goes on: at 1,000,000 grants building and
        writing the snapshot takes seconds (BENCHMARKS.md). The fork itself copies the
        page tables, and that pause grows with the heap: 7 ms per 500 MB on an idle
        machine here, 34-44 ms at 540 MB on the busy one of the 1,000,000-grant bench.
        One child at a time; the core asks again later for one it is not given."""
        if self.taking is not None:
            return
        pid = os.fork()
        if pid == 0:  # the child: no logging, no sockets, no return into the loop
            code = 1
            try:
                gc.disable()  # collections would touch (and copy) every page of the heap
                os.nice(19)  # the loops of this host's nodes come first: they answer clients
                _die_with_parent()
                self.storage.write_taken(self.core.ledger, index, term)
                code = 0
            except BaseException as exc:  # whatever it was, the parent must hear of it
                os.write(2, f"snapshot at {index} not taken: {exc}\n".encode(errors="replace"))
            finally:
                os._exit(code)
        self.taking = (pid, index, term)

    def _reap(self, now: Now) -> None:
        """The child's snapshot, once it exits: handed to the core (None if it failed)."""
        assert self.taking is not None
        pid, index, term = self.taking
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            return
        self.taking = None
        image = None
        if os.waitstatus_to_exitcode(status) == 0:
            try:
                image = self.storage.taken_image(index, term)
            except StorageError as exc:
                log.error("snapshot at %d not taken: %s", index, exc)
        else:
            log.error("snapshot at %d not taken: its process ended with %s", index, status)
        self.core.step(SnapshotTaken(image), now)

    def _stop_taking(self) -> None:
        if self.taking is not None:
            pid = self.taking[0]
            self.taking = None
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)

    def _carry_out(self, out: Ready) -> None:
        """Carry out one cycle's Ready, in the order the core's contract gives."""
        storage = self.storage
        if out.take_snapshot is not None:
            self._take_snapshot(*out.take_snapshot)  # the ledger as ready() left it
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
        if out.early:
            self.sockets.send_peers(out.early)
        storage.sync()  # group commit: nothing below may leave before this
        if out.mark_recovered:
            storage.mark_recovered()
        if out.peer:
            self.sockets.send_peers(out.peer)
        self.sockets.send_answers(out.answers)
        if self.report_log is not None:  # after the sends: answers never wait for it
            compacted = [
                op.image.index
                for op in out.persist
                if type(op) is SaveSnapshot and op.source == "taken"  # received: a gap
            ]
            self.report_log.cycle(
                out.report, out.report_from, compacted, self.core.ledger, time.time()
            )
        self.core.advance()
        if self.core.applied.installing is not None or (
            out.persist and any(type(op) is SaveSnapshot for op in out.persist)
        ):
            # The ledger and log are long-lived and acyclic: keep the cyclic GC from
            # rescanning them (a list splice: cheap). Full collections of a 100,000-grant
            # ledger took 40-200 ms each and freed nothing; an install builds a ledger of
            # millions of objects, a step at a time.
            gc.freeze()
        if out.start_over is not None:
            now = Now(time.monotonic(), time.time())
            self.core.restart(storage.set_aside(out.start_over), now)


def _die_with_parent() -> None:
    """Have the kernel kill this child if the node dies first (PR_SET_PDEATHSIG): its
    snapshot would be of no use, and it would hold CPU and memory for nothing."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
