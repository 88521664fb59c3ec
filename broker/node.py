"""One zbroker node: the thin shell around the ledger and the replica.

It owns everything the pure cores must not touch: the sockets, the poller, the clock,
the data directory and the signals. One thread, one poll loop; each cycle:

1. read the clock once; drain the client ROUTER, the peer ROUTER and the heartbeat SUB;
2. hand client requests to the ledger (primary only; backups redirect), applying the
   deltas it returns at once so the next request sees the seats taken, and collecting
   them into one batch;
3. tick the replica and (on the primary) the ledger; propose the batch to the replica;
4. execute the effects: every persistence effect of the cycle first, one ``sync`` (group
   commit), then every send: peer messages, heartbeats, and the answers of committed
   deltas. No answer or acknowledgement ever leaves before what it vouches for is on disk.

The ledger on a backup holds exactly the committed deltas; on the primary it also holds
the uncommitted ones it proposed. When a primary loses control, it rebuilds its ledger
from its last snapshot and its committed log, and sends every waiting client a redirect.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

import zmq

from broker.config import Config
from broker.front import Front, Key
from broker.ledger import Ledger
from broker.license import load_license
from broker.model import Now, Reply, Request, reply_ok
from broker.signing import load_public_key
from broker.storage import Storage
from broker.wire import RemoteProtocolError, decode_request, encode_reply, pack, unpack
from peers import replica as rp

log = logging.getLogger("zbroker.node")

TICK = 0.01  # seconds between replica ticks: well under heartbeat_interval
LEDGER_TICK = 0.05  # lease expiry and queue deadlines need no finer grain
MAX_DRAIN = 512  # messages read from one socket per cycle, so no socket starves the others
PEER_MAX_MESSAGE = 256 * 1024 * 1024  # a snapshot of 100,000 grants is about 9 MB


class Node:
    def __init__(self, config: Config, name: str) -> None:
        self.config = config
        self.me = config.node(name)
        self.endpoints = {n.name: n.client for n in config.nodes}
        license_file = load_license(config.license_path, load_public_key(config.vendor_key))
        for refused in license_file.refused:
            log.warning("%s", refused)
        self.entitlements = license_file.entitlements
        self.storage = Storage(self.me.data, name, fsync=config.fsync)
        loaded = self.storage.load()
        self.snapshot: tuple[int, int, dict[str, Any] | None] = (
            loaded.snapshot_index,
            loaded.snapshot_term,
            loaded.snapshot,
        )
        self.ledger = self._ledger_from(loaded.snapshot)
        self.applied = loaded.snapshot_index  # the ledger holds every delta up to here
        now = time.monotonic()
        self.replica = rp.Replica(
            name,
            config.ranks,
            rp.Timing(
                heartbeat_interval=config.heartbeat_interval,
                peer_timeout=config.peer_timeout,
                failback=config.failback,
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
            now,
        )
        self.front = Front()
        self.batch: list[tuple[dict[str, Any], Key | None, Reply | None]] = []
        self.effects: list[Any] = []
        self.client_out: list[tuple[bytes, bytes]] = []
        self.stopping = False
        self.seats_freed = False

    def _ledger_from(self, snap: dict[str, Any] | None) -> Ledger:
        lease = self.config.lease
        if snap is None:
            # Entitlements arrive as a replicated `reload` delta from the primary, so every
            # node's ledger is built from the log alone.
            return Ledger((), lease=lease, heartbeat=lease / 3)
        return Ledger.from_snapshot(snap, lease=lease, heartbeat=lease / 3)

    # --- life cycle
    def run(self) -> None:
        logging.basicConfig(
            level=logging.INFO,
            format=f"%(asctime)s {self.me.name} %(levelname)s %(message)s",
        )
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        ctx = zmq.Context()
        try:
            self._open_sockets(ctx)
            log.info(
                "node %s serving clients at %s (rank %d of %d)",
                self.me.name, self.me.client, self.me.rank + 1, len(self.config.nodes),
            )
            self._loop()
        finally:
            self.storage.close()
            ctx.destroy(linger=0)
            log.info("node %s stopped", self.me.name)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True  # the loop sees it within one poll timeout

    def _open_sockets(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.clients = ctx.socket(zmq.ROUTER)
        self.clients.setsockopt(zmq.LINGER, 0)
        self.clients.setsockopt(zmq.MAXMSGSIZE, self.config.max_message)
        self.clients.setsockopt(zmq.BACKLOG, 1024)  # a failover is a reconnect storm
        self.clients.setsockopt(zmq.SNDHWM, 100_000)
        self.clients.setsockopt(zmq.RCVHWM, 100_000)
        self.clients.bind(self.me.client)
        self.peer_in = ctx.socket(zmq.ROUTER)
        self.peer_in.setsockopt(zmq.LINGER, 0)
        self.peer_in.setsockopt(zmq.MAXMSGSIZE, PEER_MAX_MESSAGE)
        self.peer_in.bind(self.me.peer)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(self.me.pub)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.peer_out: dict[str, zmq.Socket[bytes]] = {}
        for other in self.config.nodes:
            if other.name == self.me.name:
                continue
            self.sub.connect(other.pub)
            out = ctx.socket(zmq.DEALER)
            out.setsockopt(zmq.LINGER, 0)
            out.setsockopt(zmq.ROUTING_ID, self.me.name.encode())
            # Queue nothing for a peer that is not connected: a dead peer's backlog would
            # arrive stale and late; the replica re-sends what a peer still needs.
            out.setsockopt(zmq.IMMEDIATE, 1)
            out.setsockopt(zmq.SNDHWM, 100_000)
            out.connect(other.peer)
            self.peer_out[other.name] = out
        self.poller = zmq.Poller()
        for sock in (self.clients, self.peer_in, self.sub):
            self.poller.register(sock, zmq.POLLIN)

    # --- the loop
    def _loop(self) -> None:
        next_tick = next_ledger_tick = 0.0
        while not self.stopping:
            timeout = max(0.0, next_tick - time.monotonic())
            ready = dict(self.poller.poll(timeout * 1000))
            now = Now(time.monotonic(), time.time())
            if self.peer_in in ready:
                self._drain(self.peer_in, self._on_peer_frames)
            if self.sub in ready:
                self._drain(self.sub, self._on_heartbeat_frames)
            if self.clients in ready:
                self._drain(self.clients, lambda frames: self._on_client(frames, now))
            if now.mono >= next_tick:
                next_tick = now.mono + TICK
                self.effects += self.replica.on_tick(now.mono)
            if self.replica.serving and (self.seats_freed or now.mono >= next_ledger_tick):
                next_ledger_tick = now.mono + LEDGER_TICK
                self.seats_freed = False
                self._maybe_reload()
                for delta in self.ledger.tick(now):
                    self._propose_one(delta)
            self._flush(now)

    def _drain(self, sock: zmq.Socket[bytes], handle: Any) -> None:
        for _ in range(MAX_DRAIN):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(frames)

    # --- peers
    def _on_peer_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        try:
            sender = frames[0].decode()
        except UnicodeDecodeError:
            return
        msg = self._decode_peer(frames[1])
        if msg is not None and sender in self.peer_out:
            self.effects += self.replica.on_message(sender, msg, time.monotonic())

    def _on_heartbeat_frames(self, frames: list[bytes]) -> None:
        msg = self._decode_peer(frames[-1]) if len(frames) == 1 else None
        sender = msg.get("node") if msg is not None else None
        if msg is not None and isinstance(sender, str) and sender in self.peer_out:
            self.effects += self.replica.on_message(sender, msg, time.monotonic())

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
            return  # not a DEALER talking our protocol: nothing sane to answer
        identity, data = frames
        try:
            request = decode_request(data)
        except RemoteProtocolError as exc:
            self._reply(identity, exc.sid, exc.req, exc.reply)
            return
        if request.op == "status":
            self._reply(identity, request.sid or None, None, reply_ok(report=self.report(now)))
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
        if self.replica.serving:
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
        key: Key | None = None
        reply: Reply | None = None
        if "sid" in delta and "req" in delta:
            key = (delta["sid"], delta["req"])
            reply = self.ledger.recorded(*key) or reply_ok()
        self.batch.append((delta, key, reply))

    def _maybe_reload(self) -> None:
        delta = self.ledger.reload_delta(self.entitlements)
        if delta["entitlements"] != self.ledger.snapshot()["entitlements"]:
            log.info("license entitlements changed: replicating a reload")
            self._propose_one(delta)

    def _reply(self, identity: bytes, sid: str | None, req: int | None, reply: Reply) -> None:
        self.client_out.append((identity, encode_reply(reply, sid, req)))

    # --- effects
    def _flush(self, now: Now) -> None:
        if self.batch:
            indexes, effects = self.replica.propose([d for d, _, _ in self.batch], now.mono)
            for index, (_, key, reply) in zip(indexes, self.batch, strict=True):
                if key is not None and reply is not None:
                    self.front.proposed(index, key, reply)
            self.applied = indexes[-1]
            self.effects += effects
            self.batch.clear()
        effects, self.effects = self.effects, []
        peer_out: list[tuple[str | None, dict[str, Any]]] = []
        for effect in effects:
            if isinstance(effect, rp.Send):
                peer_out.append((effect.to, effect.msg))
            elif isinstance(effect, rp.Publish):
                peer_out.append((None, effect.msg))
            else:
                self._execute(effect)
        self.storage.sync()  # group commit: nothing below may leave before this
        for to, msg in peer_out:
            sock = self.pub if to is None else self.peer_out.get(to)
            if sock is None:
                continue
            try:
                sock.send(pack(msg), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the peer is gone or far behind; the replica re-sends what it needs
        for identity, data in self.client_out:
            try:
                self.clients.send_multipart([identity, data], zmq.NOBLOCK)
            except zmq.Again:
                pass  # the client's pipe is full: it will retry the request
        self.client_out.clear()

    def _execute(self, effect: Any) -> None:
        if isinstance(effect, rp.PersistEntries):
            self.storage.append([(e.index, e.term, e.delta) for e in effect.entries])
        elif isinstance(effect, rp.TruncateLog):
            self.storage.truncate(effect.from_index)
        elif isinstance(effect, rp.PersistHardState):
            self.storage.save_hard_state(effect.term, effect.voted_for)
        elif isinstance(effect, rp.InstallSnapshot):
            self.ledger = self._ledger_from(effect.snapshot)
            self.applied = effect.index
            self.snapshot = (effect.index, effect.term, effect.snapshot)
            self.storage.save_snapshot(effect.index, effect.term, effect.snapshot, keep=[])
        elif isinstance(effect, rp.Committed):
            self._on_committed(effect.upto)
        elif isinstance(effect, rp.RoleChanged):
            self._on_role_changed(effect)
        elif isinstance(effect, rp.Recovered):
            self.storage.mark_recovered()

    def _on_committed(self, upto: int) -> None:
        if self.replica.role is rp.Role.PRIMARY:
            for identity, (sid, req), reply in self.front.committed(upto):
                self._reply(identity, sid, req, reply)
        else:
            self._apply_log(upto)
        self._maybe_compact()

    def _apply_log(self, upto: int) -> None:
        for entry in self.replica.entries(self.applied + 1, upto):
            if entry.delta is not None:
                self.ledger.apply(entry.delta)
            self.applied = entry.index

    def _on_role_changed(self, effect: Any) -> None:
        log.info("now %s in term %d (primary: %s)", effect.role.name.lower(), effect.term,
                 effect.primary)
        if effect.role is rp.Role.PRIMARY:
            # Everything in our log is ours to commit now: the ledger must see it all.
            self._apply_log(self.replica.last)
            return
        if self.applied > self.replica.commit:
            # We held uncommitted deltas as primary; they may be overwritten. Rebuild from
            # what is certain: the last snapshot and the committed log.
            index, _, snap = self.snapshot
            self.ledger = self._ledger_from(snap)
            self.applied = index
            self._apply_log(self.replica.commit)
        for identity, (sid, req) in self.front.abandon():
            primary = self.replica.primary
            self._reply(identity, sid, req,
                        {"status": "redirect", "primary": self.endpoints.get(primary or "")})

    def _maybe_compact(self) -> None:
        index, _, _ = self.snapshot
        commit = self.replica.commit
        if commit - index < self.config.snapshot_every or self.applied != commit:
            return  # a primary's ledger holding uncommitted deltas cannot be snapshotted
        term = self.replica.term_at(commit)
        snap = self.ledger.snapshot()
        keep = [(e.index, e.term, e.delta) for e in self.replica.entries(commit + 1, self.replica.last)]
        self.storage.save_snapshot(commit, term, snap, keep=keep)
        self.snapshot = (commit, term, snap)
        self.replica.compacted(commit, term, snap)

    # --- status
    def report(self, now: Now) -> dict[str, Any]:
        own = {
            "name": self.me.name,
            "role": self.replica.role.name.lower(),
            "term": self.replica.term,
            "last": self.replica.last,
            "commit": self.replica.commit,
            "peers": sorted(self.replica.peers_alive(now.mono)),
        }
        return {
            "node": self.me.name,
            "mode": "plain",
            "nodes": [own, *self.replica.peer_view(now.mono)],
            "features": self.ledger.status(),
        }
