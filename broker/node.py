"""One zbroker node: the thin shell around the ledger and the replica.

It owns everything the pure cores must not touch: the sockets, the poller, the clock,
the data directory and the signals. One thread, one poll loop; each cycle:

1. read the clock once; drain the peer ROUTER and the heartbeat SUB into the replica,
   and tick it;
2. hand client requests to the ledger (only while this node is a serving primary;
   others redirect), applying the deltas it returns at once so the next request sees
   the seats taken, and collecting them into one batch; tick the ledger;
3. propose the batch to the replica (one append message per backup: group commit);
4. one ``sync`` of the data directory, then every send: peer messages, heartbeats, and
   the answers of committed deltas. The replica's other effects (persist, commit, role
   changes) are executed as they come, so the ledger is current before the next
   decision; nothing that vouches for state leaves before that state is on disk.

The ledger on a backup holds exactly the committed deltas; on the primary it also holds
the uncommitted ones it proposed. When a primary loses control, it rebuilds its ledger
from its last snapshot and its committed log, and sends every waiting client a redirect.
The shell knows the index and term of the last delta its ledger applied; a log that no
longer holds that term there has replaced what the ledger holds (``_log_has_applied``).
A committed delta or snapshot that the ledger refuses ends the cycle (``Unappliable``):
the node sets its data aside and starts over as a wiped one (``_start_over``).

The data directory is locked and read in ``run`` (``_start``), never in the constructor:
a second process for it stops there (``DataDirLocked``), damage found in it makes the
node start as a wiped one, and a disk error while running stops the node (``DiskError``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from broker.config import Config
from broker.front import Front, Key
from broker.ledger import Ledger
from broker.license import load_license
from broker.model import Now, Reply
from broker.seats import LedgerError
from broker.security import (
    CLIENT_DOMAIN,
    PEER_DOMAIN,
    NodeSecurity,
    handle_admin,
    is_admin,
    is_peer,
)
from broker.signing import load_public_key
from broker.status_reply import StatusReplies
from broker.storage import LOG, SNAPSHOT, Loaded, Storage, StorageError
from broker.wire import (
    RemoteProtocolError,
    decode_request,
    encode_reply,
    pack,
    refuse_frames,
    unpack,
)
from peers import types as rp
from peers.messages import Heartbeat
from peers.messages import validate as validate_peer
from peers.replica import Replica

log = logging.getLogger("zbroker.node")

TICK = 0.01  # seconds between replica ticks: well under heartbeat_interval
LEDGER_TICK = 0.05  # lease expiry and queue deadlines need no finer grain
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
# Effects that change what this node's disk vouches for beyond its own log entries.
_DISK_STATE = (rp.PersistHardState, rp.TruncateLog, rp.PersistSnapshot, rp.InstallSnapshot)
_UNAVAILABLE: Reply = {"status": "unavailable", "detail": "this node just lost control"}
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


class Unappliable(Exception):
    """The ledger refused a committed delta or snapshot: this node's state is not to be trusted.

    Raised out of the loop's cycle, so that nothing more of that cycle is done or sent;
    ``_serve`` then starts the node over as a wiped one (``_start_over``).
    """

    def __init__(self, index: int, term: int, what: str) -> None:
        super().__init__(f"index {index} (term {term}): {what}")
        self.index = index
        self.term = term


class Node:
    def __init__(self, config: Config, name: str) -> None:
        self.config = config
        self.me = config.node(name)
        self.security = NodeSecurity.from_config(config, name)  # keys checked before any I/O
        self.last_frame: zmq.Frame | None = None  # set by _drain for each message
        self.endpoints = {n.name: n.client for n in config.nodes}
        license_file = load_license(config.license_path, load_public_key(config.vendor_key))
        for refused in license_file.refused:
            log.warning("%s", refused)
        self.entitlements = tuple(license_file.entitlements)
        # Nothing of the data directory is read before run() holds its lock (_start).
        self.storage = Storage(
            self.me.data, name, fsync=config.fsync, nodes=[n.name for n in config.nodes]
        )
        self.front = Front()
        self.batch: list[tuple[dict[str, Any], Key | None, Reply | None]] = []
        self.peer_out: list[tuple[str | None, dict[str, Any]]] = []
        self.entries_only = True  # this cycle changed no _DISK_STATE
        self.unapplied: list[rp.Entry] = []  # committed on a backup, applied after the sends
        self.client_out: list[tuple[bytes, bytes]] = []
        self.status_asks = StatusReplies()  # this cycle's status requests (broker/status_reply.py)
        self.heard: dict[str, tuple[float, dict[str, Any]]] = {}  # peer heartbeats, for status
        self.stopping = False
        self.serving = False
        self.seats_freed = False
        self.recovered = False
        self.why_fresh = ""  # why the data directory held no state to vote with

    def _ledger_from(self, snap: dict[str, Any] | None) -> Ledger:
        lease = self.config.lease
        if snap is None:
            # Entitlements arrive as a replicated `reload` delta from the primary, so every
            # node's ledger is built from the log alone.
            return Ledger((), lease=lease, heartbeat=lease / 3, limits=self.config.limits)
        return Ledger.from_snapshot(
            snap, lease=lease, heartbeat=lease / 3, limits=self.config.limits
        )

    def _start(self) -> None:
        """Own the data directory, read it, and build the ledger and the replica from it.

        StorageError when the directory is locked by another process or unusable; damage
        comes back as a fresh state, and the node recovers as a wiped one does.
        """
        try:
            loaded = self.storage.load()
            try:
                self._build(loaded)
            except (LedgerError, rp.CorruptState) as exc:
                # Records whole and well-shaped that still make no ledger or log: damage.
                name = SNAPSHOT if isinstance(exc, LedgerError) else LOG
                loaded = self.storage.set_aside(f"{self.storage.dir / name}: {exc}")
                self._build(loaded)
            how = self._begin_fresh() if loaded.fresh else ""
        except BaseException:
            self.storage.close()  # the lock goes with it
            raise
        if loaded.fresh:
            (log.warning if loaded.damaged else log.info)(
                "%s; node %s starts %s", loaded.why, self.me.name, how
            )

    def _begin_fresh(self) -> str:
        """After a fresh state was built: how the node starts, in words for its log."""
        if self.replica.role is rp.Role.RECOVERING:
            return "as a wiped node: no vote until it has caught up from a primary"
        self.storage.mark_recovered()  # a single server has no one to catch up from
        return "empty: a single server has no one to catch up from"

    def _build(self, loaded: Loaded) -> None:
        self.ledger = self._ledger_from(loaded.snapshot)
        self.applied = loaded.snapshot_index  # the ledger holds every delta up to here
        self.applied_term = loaded.snapshot_term  # and the log's term there (_log_has_applied)
        self.replica = Replica(
            self.me.name,
            self.config.ranks,
            rp.Timing(
                heartbeat_interval=self.config.heartbeat_interval,
                peer_timeout=self.config.peer_timeout,
                failback=self.config.failback,
            ),
            rp.Durable(
                term=loaded.term,
                voted_for=loaded.voted_for,
                snapshot_index=loaded.snapshot_index,
                snapshot_term=loaded.snapshot_term,
                snapshot=loaded.snapshot,
                entries=[rp.Entry(term=t, index=i, delta=d) for i, t, d in loaded.entries],
                commit=loaded.snapshot_index,
                fresh=loaded.fresh,
            ),
            time.monotonic(),
        )
        self.was_recovering = self.replica.role is rp.Role.RECOVERING
        self.why_fresh = loaded.why

    # --- life cycle
    def run(self) -> None:
        logging.basicConfig(
            level=logging.INFO,
            format=f"%(asctime)s {self.me.name} %(levelname)s %(message)s",
        )
        # Locked or unusable: StorageError before anything is served (the CLI exits 3).
        self._start()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGQUIT, self._on_signal)
        self.ignored_signals: list[int] = []  # noted by the handler, logged by the loop
        for signum in _IGNORED_SIGNALS:
            signal.signal(signum, self._on_ignored_signal)
        ctx = zmq.Context()
        try:
            self._open_sockets(ctx)
            log.info(
                "node %s serving clients at %s (rank %d of %d)",
                self.me.name,
                self.me.client,
                self.me.rank + 1,
                len(self.config.nodes),
            )
            gc.freeze()  # see _maybe_compact: the loaded ledger is long-lived
            self._serve()
        except StorageError as exc:  # a disk error: stop; the others fail over
            log.error("node %s stopping: %s", self.me.name, exc)
            raise
        finally:
            try:
                self._close_storage()
            finally:
                ctx.destroy(linger=0)
                log.info("node %s stopped", self.me.name)

    def _serve(self) -> None:
        """The loop, started over after a committed delta that the ledger refuses."""
        while True:
            try:
                self._loop()
                return
            except Unappliable as exc:
                self._start_over(exc)

    def _start_over(self, exc: Unappliable) -> None:
        """Stop serving and voting at once, and come back as a wiped node.

        A ledger that refuses what a quorum committed holds a history no other node has,
        or its snapshot does: nothing this node holds can be vouched for, so it keeps
        none of it (its files go aside for an administrator, its term and vote with them)
        and catches up from the primary before it votes again (RECOVERING), as a node whose
        disk was lost does. A primary steps down by the same move: its replica is gone, so
        the others stop hearing it as primary and elect another. What this cycle had not
        sent yet is dropped (the peers re-send what they need); clients still waiting here
        are told to ask the next primary, which answers from the replicated request table.
        """
        abandoned: Reply = {"status": "redirect", "primary": None, "outcome": "unknown"}
        for identity, (sid, req) in self.front.abandon():
            self._reply(identity, sid, req, abandoned)
        self.batch.clear()
        self.peer_out.clear()
        self.unapplied.clear()
        self.status_asks = StatusReplies()  # their askers retry; the report would be stale
        self.serving = self.seats_freed = self.recovered = False
        self.entries_only = True
        loaded = self.storage.set_aside(f"its ledger cannot follow the committed log at {exc}")
        self._build(loaded)
        how = self._begin_fresh()
        log.error(
            "node %s stops serving and voting (%s) and starts over %s",
            self.me.name,
            loaded.why,
            how,
        )

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
        next_tick = next_ledger_tick = 0.0
        while not self.stopping:
            timeout = max(0.0, next_tick - time.monotonic())
            # Round up: poll(0) for the last millisecond before a tick would spin the CPU.
            ready = dict(self.poller.poll(math.ceil(timeout * 1000)))
            now = Now(time.monotonic(), time.time())
            if self.ignored_signals:
                self._log_ignored_signals()
            if self.peer_in in ready:
                self._drain(self.peer_in, self._on_peer_frames, now)
            if self.sub in ready:
                self._drain(self.sub, self._on_heartbeat_frames, now)
            for monitor, peer in self.monitors.items():
                if monitor in ready:
                    self._on_peer_lost(monitor, peer, now)
            if now.mono >= next_tick:
                next_tick = now.mono + TICK
                self._take(self.replica.on_tick(now.mono))
            # No replica event below until the batch is proposed: the serving check made
            # for each client request then still holds when the batch goes out.
            self.serving = self.replica.is_serving(now.mono)
            if self.clients in ready:
                self._drain(self.clients, self._on_client, now)
                if self.status_asks:
                    self.client_out += self.status_asks.answer(self.report(now), self.ledger)
            if self.serving and (self.seats_freed or now.mono >= next_ledger_tick):
                next_ledger_tick = now.mono + LEDGER_TICK
                self.seats_freed = False
                self._maybe_reload()
                for delta in self.ledger.tick(now):
                    self._propose_one(delta)
                for key in self.ledger.take_ended_waiters():
                    self.front.forget(key)
            self._flush(now)

    def _drain(
        self, sock: zmq.Socket[bytes], handle: Callable[[list[bytes], Now], None], now: Now
    ) -> None:
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
            self.last_frame = frame  # metadata: the connection's User-Id, Peer-Address
            handle(frames, now)

    # --- peers
    def _on_peer_frames(self, frames: list[bytes], now: Now) -> None:
        if len(frames) != 2:
            return
        try:
            sender = frames[0].decode()
        except UnicodeDecodeError:
            return
        if not is_peer(self.last_frame, sender, secure=self.security.secure):
            return  # a triad key posing as another node than its own
        msg = self._decode_peer(frames[1])
        if msg is not None and sender in self.peer_sockets:
            self._take(self.replica.on_message(sender, msg, now.mono))

    def _on_heartbeat_frames(self, frames: list[bytes], now: Now) -> None:
        msg = self._decode_peer(frames[-1]) if len(frames) == 1 else None
        sender = msg.get("node") if msg is not None else None
        if msg is not None and isinstance(sender, str) and sender in self.peer_sockets:
            if isinstance(validate_peer(msg), Heartbeat):  # status shows only well-formed ones
                self.heard[sender] = (now.mono, msg)
            self._take(self.replica.on_message(sender, msg, now.mono))

    def _on_peer_lost(self, monitor: zmq.Socket[bytes], peer: str, now: Now) -> None:
        while True:
            try:
                monitor.recv_multipart(zmq.NOBLOCK)  # only DISCONNECTED events are asked for
            except zmq.Again:
                break
            log.info("connection to %s dropped", peer)
            self._take(self.replica.on_peer_lost(peer, now.mono))

    @staticmethod
    def _decode_peer(data: bytes) -> dict[str, Any] | None:
        try:
            msg = unpack(data)
        except Exception:  # hostile bytes on a peer socket are dropped, never a crash
            return None
        return msg if isinstance(msg, dict) else None

    # --- clients
    def _on_client(self, frames: list[bytes], now: Now) -> None:
        if len(frames) != 2:
            # Several frames: a REQ socket, say. The error vouches for no state, so it
            # need not wait for the cycle's sync; a full pipe drops it like any reply.
            with contextlib.suppress(zmq.Again):
                self.clients.send_multipart(refuse_frames(frames), _NOBLOCK)
            return
        identity, data = frames
        try:
            request = decode_request(data)
        except RemoteProtocolError as exc:
            self._reply(identity, exc.sid, exc.req, exc.reply)
            return
        if request.op == "status":
            self.status_asks.add(identity, request)  # answered together after the drain
            return
        if request.op == "admin":
            secure = self.security.secure
            admin = is_admin(self.last_frame, secure=secure)
            decision = handle_admin(request.action, admin=admin, node=self.me.name, secure=secure)
            self._reply(identity, request.sid or None, request.req, decision.reply)
            self.stopping = self.stopping or decision.stop  # the reply leaves in this cycle
            return
        refusal = self._not_serving()
        if refusal is not None:
            self._reply(identity, request.sid, request.req, refusal)
            return
        key = (request.sid, request.req)
        if self.front.waiting(key):
            self.front.wait(key, identity)  # a retry: answer where the client is now
            return
        outcome = self.ledger.handle(request, now)
        if outcome.reply is not None:
            self._reply(identity, request.sid, request.req, outcome.reply)
            return
        self.front.wait(key, identity)
        for delta in outcome.deltas:
            self._propose_one(delta)

    def _not_serving(self) -> Reply | None:
        if self.serving:
            return None
        primary = self.replica.primary
        if self.replica.role is rp.Role.PRIMARY or primary is None:
            return {
                "status": "unavailable",
                "detail": f"node {self.me.name} has no quorum or an election is in progress",
            }
        return {"status": "redirect", "primary": self.endpoints.get(primary)}

    def _propose_one(self, delta: dict[str, Any]) -> None:
        """Apply at once (the next decision must see it) and queue it for replication."""
        self.ledger.apply(delta)
        if delta["k"] in ("release", "close", "expire"):
            self.seats_freed = True
        reply = self.ledger.reply_of(delta)
        key: Key | None = (delta["sid"], delta["req"]) if reply is not None else None
        self.batch.append((delta, key, reply))

    def _maybe_reload(self) -> None:
        if tuple(self.entitlements) != tuple(self.ledger.entitlements):
            log.info("license entitlements differ from the ledger's: replicating a reload")
            self._propose_one(self.ledger.reload_delta(self.entitlements))

    def _reply(self, identity: bytes, sid: str | None, req: int | None, reply: Reply) -> None:
        self.client_out.append((identity, encode_reply(reply, sid, req)))

    # --- effects
    def _flush(self, now: Now) -> None:
        if self.batch:
            self._propose(now)
        # A primary's appends go out before its own sync, so that its fsync and the
        # backups' overlap (Raft thesis 10.2.1). They vouch for nothing on this disk: an
        # entry commits only with a backup's ack, which this loop reads in a later cycle,
        # after the sync below. Other state written this cycle (a term, a vote, a
        # truncation, a snapshot) must be durable before any message leaves.
        if self.entries_only and self.replica.role is rp.Role.PRIMARY:
            self._send_peer_out()
        self.storage.sync()  # group commit: nothing below may leave before this
        self.entries_only = True
        if self.recovered:
            self.recovered = False
            self.storage.mark_recovered()
        self._send_peer_out()
        send = self.clients.send
        for identity, data in self.client_out:
            try:  # two sends: send_multipart costs 4 us more in Python
                send(identity, _SNDMORE_NOBLOCK)
                send(data, _NOBLOCK)
            except zmq.Again:
                pass  # a client whose pipe is full drops it; it will retry the request
        self.client_out.clear()
        self._apply_unapplied()

    def _send_peer_out(self) -> None:
        packed: dict[int, bytes] = {}  # by id: the backups often get the same append map
        for to, msg in self.peer_out:
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
        self.peer_out.clear()

    def _take(self, effects: list[Any]) -> None:
        """Execute the replica's effects now, except sends, which wait for the sync."""
        for effect in effects:
            if isinstance(effect, rp.Send):
                self.peer_out.append((effect.to, effect.msg))
            elif isinstance(effect, rp.Publish):
                self.peer_out.append((None, effect.msg))
            else:
                self._execute(effect)

    def _propose(self, now: Now) -> None:
        batch, self.batch = self.batch, []
        try:
            indexes, effects = self.replica.propose([d for d, _, _ in batch], now.mono)
        except rp.NotServing:
            # Cannot happen while the loop checks serving with the same clock reading, but
            # if it did, the ledger holds deltas no one will replicate: undo, and tell the
            # clients truthfully that nothing happened.
            log.error("lost control between decision and proposal; %d deltas dropped", len(batch))
            self._rebuild_ledger(self.replica.last)
            for _, key, _ in batch:
                if key is not None and (identity := self.front.answer(key)) is not None:
                    self._reply(identity, *key, self._not_serving() or _UNAVAILABLE)
            return
        for index, (_, key, reply) in zip(indexes, batch, strict=True):
            if key is not None and reply is not None:
                self.front.proposed(index, key, reply)
        self.applied = indexes[-1]
        self.applied_term = self.replica.term
        self._take(effects)

    def _execute(self, effect: Any) -> None:
        if isinstance(effect, rp.PersistEntries):
            self.storage.append([(e.index, e.term, e.delta) for e in effect.entries])
            return
        if isinstance(effect, _DISK_STATE):
            self.entries_only = False
        if isinstance(effect, rp.TruncateLog):
            self.storage.truncate(effect.from_index)
        elif isinstance(effect, rp.PersistHardState):
            self.storage.save_hard_state(effect.term, effect.voted_for)
        elif isinstance(effect, rp.PersistSnapshot):
            keep = self.replica.entries(effect.index + 1, self.storage.last)
            self.storage.save_snapshot(
                effect.index,
                effect.term,
                effect.snapshot,
                keep=[(e.index, e.term, e.delta) for e in keep],
            )
        elif isinstance(effect, rp.InstallSnapshot):
            try:
                self.ledger = self._ledger_from(effect.snapshot)
            except LedgerError as exc:
                raise Unappliable(effect.index, effect.term, f"snapshot: {exc}") from None
            self.applied, self.applied_term = effect.index, effect.term
        elif isinstance(effect, rp.Committed):
            self._on_committed(effect)
        elif isinstance(effect, rp.RoleChanged):
            self._on_role_changed(effect)
        elif isinstance(effect, rp.Dropped):
            log.debug("dropped a message from %s: %s", effect.sender, effect.reason)

    def _on_committed(self, effect: Any) -> None:
        if self.replica.role is rp.Role.PRIMARY:
            self._apply(effect.entries)
        else:
            # A backup's acknowledgement of this cycle's appends need not wait for its
            # ledger: apply after the sends (_flush). Anything that reads the ledger
            # sooner (a role change, a status) applies them first.
            self.unapplied.extend(effect.entries)
        for identity, (sid, req), reply in self.front.committed(effect.upto):
            self._reply(identity, sid, req, reply)

    def _apply(self, entries: Sequence[rp.Entry]) -> None:
        self._apply_entries(entries)
        self._maybe_compact()

    def _apply_entries(self, entries: Sequence[rp.Entry]) -> None:
        if entries and entries[-1].index > self.applied and not self._log_has_applied():
            raise Unappliable(self.applied, self.applied_term, "the log lost this delta")
        for entry in entries:
            # A backup applies what commits; a new primary applies what it adopted from
            # the previous term; its own proposals it applied when it made them.
            if entry.index > self.applied:
                if entry.index != self.applied + 1:
                    raise Unappliable(entry.index, entry.term, f"only {self.applied} applied")
                if entry.delta is not None:
                    try:
                        self.ledger.apply(entry.delta)
                    except LedgerError as exc:
                        raise Unappliable(entry.index, entry.term, str(exc)) from None
                self.applied, self.applied_term = entry.index, entry.term

    def _log_has_applied(self) -> bool:
        """Whether the log still holds, where the ledger's history ends, the entry applied
        there. Entries are identical up to an index where two logs have the same term, so
        then the ledger holds exactly the log's deltas up to ``applied``."""
        term = self.replica.log.term_at(self.applied)
        return term is None or term == self.applied_term  # None: compacted past it

    def _apply_unapplied(self) -> None:
        if self.unapplied:
            entries, self.unapplied = self.unapplied, []
            self._apply(entries)

    def _on_role_changed(self, effect: Any) -> None:
        log.info(
            "now %s in term %d (primary: %s)",
            effect.role.value,
            effect.term,
            effect.primary,
        )
        if self.was_recovering and effect.role is not rp.Role.RECOVERING:
            self.recovered = True  # write the marker once this cycle's state is on disk
        self.was_recovering = effect.role is rp.Role.RECOVERING
        self._apply_unapplied()  # before any decision of the new role reads the ledger
        # Leases and waiters are the primary's alone; a new reign starts them afresh.
        self.ledger.forget_volatile()
        if effect.role is rp.Role.PRIMARY:
            if not self._log_has_applied():  # it would decide from deltas nobody else has
                raise Unappliable(self.applied, self.applied_term, "the log lost this delta")
            return
        if self.applied > self.replica.commit or not self._log_has_applied():
            # As primary we applied deltas that may never commit, or that the event which
            # deposed us has already replaced (an append of the next primary, read after a
            # pause or a loss, can cut them and commit past them at once; the issue 11
            # next_grant crash): rebuild from what is certain, the snapshot and the
            # committed log.
            self._rebuild_ledger(self.replica.commit)
        # Their requests may or may not commit under the next primary: say so, and let
        # the clients ask it (it answers a retry from the replicated request table).
        abandoned: Reply = {
            "status": "redirect",
            "primary": self.endpoints.get(effect.primary or ""),
            "outcome": "unknown",
        }
        for identity, (sid, req) in self.front.abandon():
            self._reply(identity, sid, req, abandoned)

    def _rebuild_ledger(self, upto: int) -> None:
        log_ = self.replica.log
        try:
            self.ledger = self._ledger_from(log_.snapshot)
        except LedgerError as exc:
            raise Unappliable(log_.snap_index, log_.snap_term, f"snapshot: {exc}") from None
        self.applied, self.applied_term = log_.snap_index, log_.snap_term
        # No compaction here: a role change rebuilds before the same event's truncation
        # and appends reach the disk, which a log rewritten under them would contradict.
        self._apply_entries(self.replica.entries(log_.snap_index + 1, upto))

    def _maybe_compact(self) -> None:
        commit = self.replica.commit
        if commit - self.replica.log.snap_index < self.config.snapshot_every:
            return
        if self.applied != commit:
            return  # a primary's ledger holding uncommitted deltas cannot be snapshotted
        term = self.replica.log.term_at(commit)
        if term is None:
            return
        snap = self.ledger.snapshot()
        keep = self.replica.entries(commit + 1, self.storage.last)
        self.storage.save_snapshot(
            commit, term, snap, keep=[(e.index, e.term, e.delta) for e in keep]
        )
        self.replica.compacted(commit, term, snap)
        # The ledger and log are long-lived and acyclic: keep the cyclic GC from rescanning
        # them. Full collections of a 100,000-grant ledger took 40-200 ms each, freed
        # nothing, and with the snapshot above stalled the loop past peer_timeout.
        gc.freeze()

    # --- status
    def _recovering(self) -> str:
        """Why this node does not vote yet, and what it waits for."""
        primary = self.replica.primary
        if primary is not None:
            return f"{self.why_fresh}; catching up from primary {primary}"
        return (
            f"{self.why_fresh}; waiting for a primary to catch up from (the two other"
            " nodes must be up and hold their data to elect one)"
        )

    def report(self, now: Now) -> dict[str, Any]:
        self._apply_unapplied()
        # Every entry has name, endpoint, role, term, last and commit (nil while a node is
        # not heard); the own entry also what only this node knows (docs/protocol.md).
        own = {
            "name": self.me.name,
            "endpoint": self.me.client,
            "role": self.replica.role.value,
            "term": self.replica.term,
            "last": self.replica.last,
            "commit": self.replica.commit,
            "peers": sorted(self.replica.peers_alive(now.mono)),
            "serving": self.replica.is_serving(now.mono),
        }
        if self.replica.role is rp.Role.RECOVERING:
            own["recovering"] = self._recovering()
        others = []
        for other in self.config.nodes:
            if other.name == self.me.name:
                continue
            at, hb = self.heard.get(other.name, (float("-inf"), {}))
            if now.mono - at > self.config.peer_timeout:
                hb = {"role": "down"}  # term, last and commit: nil
            others.append(
                {"name": other.name, "endpoint": other.client}
                | {k: hb.get(k) for k in ("role", "term", "last", "commit")}
            )
        return {
            "node": self.me.name,
            "mode": self.security.mode,
            "nodes": [own, *others],
            "features": self.ledger.status(now),
        }
