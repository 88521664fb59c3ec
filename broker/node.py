"""One zbroker node: the thin executor of its core (``broker/core.py``).

It owns everything the core must not touch: the sockets, the poller, the clock, the
data directory and the signals, and decides nothing. One thread, one poll loop; each
cycle reads the clock once, drains the peer ROUTER, the heartbeat SUB, the connection
monitors and the client ROUTER into the core (``step``), then carries out the core's
``Ready`` in the order the core's docstring gives: persist, early sends, one sync (group
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
import signal
import time
from collections.abc import Callable
from typing import assert_never

import zmq

from broker.config import Config
from broker.core import (
    Append,
    ClientMessage,
    Event,
    NodeCore,
    Outgoing,
    PeerHeartbeat,
    PeerLost,
    PeerMessage,
    Ready,
    SaveHardState,
    SaveSnapshot,
    Truncate,
)
from broker.license import load_license
from broker.metrics import Metrics
from broker.model import Entitlement, Now
from broker.options import Options, load_options
from broker.seats import LedgerError
from broker.security import NodeSecurity
from broker.signing import load_public_key
from broker.storage import LOG, SNAPSHOT, Loaded, Storage, StorageError
from broker.wire import pack
from broker.zap_policy import CLIENT_DOMAIN, PEER_DOMAIN
from peers.types import CorruptState

log = logging.getLogger("zbroker.node")

MAX_DRAIN = 512  # messages read from one socket per cycle, so no socket starves the others
# Per client connection, in messages (docs/security.md has the bounds): a client that
# never reads has its replies dropped past CLIENT_SNDHWM, never buffered without limit
# (the largest reply is a status page of 64 KiB: 16 MiB at most); one that sends faster
# than the node reads is held back by TCP past CLIENT_RCVHWM (messages of up to
# max_message). An honest client has a few requests in flight (the bench: 64) and its
# library reads every reply at once.
CLIENT_SNDHWM = 256
CLIENT_RCVHWM = 256
# Flags as plain ints: ``zmq.SNDMORE | zmq.NOBLOCK`` goes through enum.Flag (a microsecond
# a reply). recv_multipart and send_multipart cost 3-5 us a message in Python, against
# 1-2 us for the plain calls below (BENCHMARKS.md).
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
PEER_MAX_MESSAGE = 256 * 1024 * 1024  # a snapshot of 100,000 grants is about 9 MB
# Signals whose default action would end the node without its "stopped" line and with
# nothing it asks for: each is logged (with why) and the node serves on. SIGTERM, SIGINT
# and SIGQUIT stop it cleanly. (Python itself ignores SIGPIPE and SIGXFSZ: a write past
# the file size limit fails with EFBIG, a disk error like any other.)
_IGNORED_SIGNALS = {
    signal.SIGHUP: ": a reread of the license and options is not there yet; still serving",
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
        # Prometheus metrics when the config asks (broker/metrics.py): served off the loop.
        self.metrics = None if self.me.metrics is None else Metrics(name, self.me.metrics)

    def _start(self) -> None:
        """Read the license, own the data directory, read it, and build the core from it.

        StorageError when the directory is locked by another process or unusable; damage
        comes back as a fresh state, and the node recovers as a wiped one does.
        """
        vendor_key = load_public_key(self.config.vendor_key)
        license_file = load_license(self.config.license_path, vendor_key)
        for refused in license_file.refused:
            log.warning("%s", refused)
        entitlements = tuple(license_file.entitlements)
        options = None if self.config.options is None else load_options(self.config.options)
        for warning in () if options is None else options.warnings():
            log.warning("%s", warning)
        try:
            loaded = self.storage.load()
            try:
                self.core = self._core(entitlements, options, loaded)
            except (LedgerError, CorruptState) as exc:
                # Records whole and well-shaped that still make no ledger or log: damage.
                name = SNAPSHOT if isinstance(exc, LedgerError) else LOG
                loaded = self.storage.set_aside(f"{self.storage.dir / name}: {exc}")
                self.core = self._core(entitlements, options, loaded)
        except BaseException:
            self.storage.close()  # the lock goes with it
            raise

    def _core(
        self, entitlements: tuple[Entitlement, ...], options: Options | None, loaded: Loaded
    ) -> NodeCore:
        now = Now(time.monotonic(), time.time())
        mode = self.security.mode
        return NodeCore(
            self.config, self.me.name, entitlements, loaded, now, mode=mode, options=options
        )

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
        ctx = zmq.Context()
        try:
            self._open_sockets(ctx)
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
            try:
                self._close_storage()
            finally:
                ctx.destroy(linger=0)
                if self.metrics is not None:  # after the sockets: peers see us gone at once
                    self.metrics.close()
                log.info("node %s stopped", self.me.name)

    def _close_storage(self) -> None:
        try:
            self.storage.close()
        except StorageError as exc:  # the last sync failed
            log.error("node %s stopping: %s", self.me.name, exc)
            raise

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True  # the loop sees it within one poll timeout

    def _on_ignored_signal(self, signum: int, frame: object) -> None:
        self.ignored_signals.append(signum)  # logging inside a handler could deadlock

    def _log_ignored_signals(self) -> None:
        signums, self.ignored_signals = self.ignored_signals, []
        for signum in map(signal.Signals, signums):
            why = _IGNORED_SIGNALS.get(signum, "")
            log.warning("node %s ignores %s%s", self.me.name, signum.name, why)

    def _open_sockets(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        # The ZAP handler first: a CURVE server socket refuses everyone until it is bound.
        self.zap = self.security.start(ctx)
        self.clients = ctx.socket(zmq.ROUTER)
        self.security.server(self.clients, CLIENT_DOMAIN)
        self.clients.setsockopt(zmq.LINGER, 0)
        self.clients.setsockopt(zmq.MAXMSGSIZE, self.config.max_message)
        self.clients.setsockopt(zmq.BACKLOG, 1024)  # a failover is a reconnect storm
        self.clients.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)
        self.clients.setsockopt(zmq.RCVHWM, CLIENT_RCVHWM)
        self.clients.bind(self.me.client)
        self.peer_in = ctx.socket(zmq.ROUTER)
        self.peer_in.setsockopt(zmq.LINGER, 0)
        self.peer_in.setsockopt(zmq.MAXMSGSIZE, PEER_MAX_MESSAGE)
        self.security.server(self.peer_in, PEER_DOMAIN)
        self.peer_in.bind(self.me.peer)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.security.server(self.pub, PEER_DOMAIN)  # only the peers may listen
        self.pub.bind(self.me.pub)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.peer_sockets: dict[str, zmq.Socket[bytes]] = {}
        self.monitors: dict[zmq.Socket[bytes], str] = {}
        for other in self.config.nodes:
            if other.name == self.me.name:
                continue
            self.security.client(self.sub, other.name)  # per connect: each PUB has its key
            self.sub.connect(other.pub)
            out = ctx.socket(zmq.DEALER)
            self.security.client(out, other.name)
            out.setsockopt(zmq.LINGER, 0)
            out.setsockopt(zmq.ROUTING_ID, self.me.name.encode())
            # Queue nothing for a peer that is not connected: a dead peer's backlog would
            # arrive stale and late; the replica re-sends what a peer still needs.
            out.setsockopt(zmq.IMMEDIATE, 1)
            out.setsockopt(zmq.SNDHWM, 100_000)
            out.connect(other.peer)
            self.peer_sockets[other.name] = out
            # A killed peer's kernel closes its connections at once: seeing that drop
            # starts the election long before peer_timeout would.
            monitor = out.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self.monitors[monitor] = other.name
        self.poller = zmq.Poller()
        for sock in (self.clients, self.peer_in, self.sub, *self.monitors):
            self.poller.register(sock, zmq.POLLIN)

    # --- the loop
    def _loop(self) -> None:
        wake_at = 0.0
        while not self.stopping:
            timeout = max(0.0, wake_at - time.monotonic())
            # Round up: poll(0) for the last millisecond before a tick would spin the CPU.
            ready = dict(self.poller.poll(math.ceil(timeout * 1000)))
            now = Now(time.monotonic(), time.time())
            if self.ignored_signals:
                self._log_ignored_signals()
            if self.peer_in in ready:
                self._drain(self.peer_in, PeerMessage, now)
            if self.sub in ready:
                self._drain(self.sub, _heartbeat, now)
            for monitor, peer in self.monitors.items():
                if monitor in ready:
                    self._peer_lost(monitor, peer, now)
            if self.clients in ready:
                self._drain(self.clients, ClientMessage, now)
            out = self.core.ready(now)
            self._carry_out(out)
            if self.metrics is not None:  # after the sends: answers never wait for it
                self.metrics.observe(out.latencies)
                self.metrics.refresh(self.core, now)  # a snapshot once a second at most
            wake_at = out.wake_at
            if out.stop:
                self.stopping = True

    def _drain(
        self, sock: zmq.Socket[bytes], event: Callable[[list[bytes], zmq.Frame], Event], now: Now
    ) -> None:
        step = self.core.step
        recv = sock.recv
        for _ in range(MAX_DRAIN):
            try:
                frame = recv(_NOBLOCK, copy=False)  # a Frame knows ``more``: no getsockopt
            except zmq.Again:
                return
            frames = [frame.bytes]
            while frame.more:
                frame = recv(_NOBLOCK, copy=False)
                frames.append(frame.bytes)
            # The last frame carries the connection's metadata: User-Id, Peer-Address.
            step(event(frames, frame), now)

    def _peer_lost(self, monitor: zmq.Socket[bytes], peer: str, now: Now) -> None:
        while True:
            try:
                monitor.recv_multipart(zmq.NOBLOCK)  # only DISCONNECTED events are asked for
            except zmq.Again:
                return
            self.core.step(PeerLost(peer), now)

    def _carry_out(self, out: Ready) -> None:
        """Carry out one cycle's Ready, in the order the core's contract gives."""
        storage = self.storage
        for op in out.persist:
            match op:
                case Append(entries=entries):
                    storage.append(entries)
                case Truncate(from_index=from_index):
                    storage.truncate(from_index)
                case SaveHardState(term=term, voted_for=voted_for):
                    storage.save_hard_state(term, voted_for)
                case SaveSnapshot(index=index, term=term, snapshot=snapshot, keep=keep):
                    storage.save_snapshot(index, term, snapshot, keep=keep)
                    # The ledger and log are long-lived and acyclic: keep the cyclic GC
                    # from rescanning them. Full collections of a 100,000-grant ledger took
                    # 40-200 ms each, freed nothing, and with the snapshot above stalled
                    # the loop past peer_timeout.
                    gc.freeze()
                case _:
                    assert_never(op)
        if out.early:
            self._send_peers(out.early)
        storage.sync()  # group commit: nothing below may leave before this
        if out.mark_recovered:
            storage.mark_recovered()
        if out.peer:
            self._send_peers(out.peer)
        send = self.clients.send
        for frames in out.answers:
            try:
                if len(frames) == 2:  # two sends: send_multipart costs 4 us more in Python
                    send(frames[0], _SNDMORE_NOBLOCK)
                    send(frames[1], _NOBLOCK)
                else:
                    self.clients.send_multipart(frames, _NOBLOCK)
            except zmq.Again:
                pass  # a client whose pipe is full drops it; it will retry the request
        self.core.advance()
        if out.start_over is not None:
            now = Now(time.monotonic(), time.time())
            self.core.restart(storage.set_aside(out.start_over), now)

    def _send_peers(self, messages: list[Outgoing]) -> None:
        packed: dict[int, bytes] = {}  # by id: the backups often get the same append map
        for to, msg in messages:
            sock = self.pub if to is None else self.peer_sockets.get(to)
            if sock is None:
                continue
            data = packed.get(id(msg))
            if data is None:
                data = packed[id(msg)] = pack(msg)
            try:  # noqa: SIM105 - contextlib.suppress costs half a microsecond a message
                sock.send(data, _NOBLOCK)
            except zmq.Again:
                pass  # a peer gone or far behind drops it; the replica re-sends what it needs


def _heartbeat(frames: list[bytes], frame: zmq.Frame) -> PeerHeartbeat:
    return PeerHeartbeat(frames)
