"""A node's sockets: opened from the config and security, read into events, written from a
``Ready``. All of them belong to the node's one thread.

- ``clients`` (ROUTER): client requests and their answers;
- ``peer_in`` (ROUTER): votes, appends, acks and catch-up from the peers;
- ``pub`` (PUB): this node's heartbeats; ``sub`` (SUB): the peers';
- one DEALER per peer, named ``peer_sockets[name]``, for messages to that peer, each with a
  monitor that says when its connection drops.

libzmq dials a refused connection again by itself, except one the other side's ZAP
handler refused: that one it never dials again (4.3.5). A node whose key a peer refused
once (a rotated key that reached one node's license before the other's) would stay cut
off from that peer until restarted, though the peer accepts its key by then. The
monitors also watch for that refusal, and ``Redial`` dials such a connection again after
a delay that doubles with each refusal.

``read`` drains the ready ones into events in a fixed order (peers first, clients last);
``send_peers`` and ``send_answers`` write never blocking: a full pipe drops the message.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import zmq

from zbroker.broker.config import Config, NodeConfig
from zbroker.broker.core import ClientMessage, Event, Outgoing, PeerHeartbeat, PeerLost, PeerMessage
from zbroker.broker.model import Now
from zbroker.broker.security import NodeSecurity
from zbroker.broker.wire import pack
from zbroker.broker.zap_policy import CLIENT_DOMAIN, PEER_DOMAIN

MAX_DRAIN = 512  # messages read from one socket per cycle, so no socket starves the others
# Frames of any message the node reads: a client's envelope (wire.MAX_ENVELOPE) and body,
# a peer's two. One with more is dropped, at most DROP_FRAMES of it a cycle: libzmq hands
# over a message whole, and no socket option bounds its frames, so one message of a
# million empty frames (2 MB on the wire) read at once would hold the loop for seconds
# and cost an election; spread over cycles, the peers are heard meanwhile.
MAX_FRAMES = 64
DROP_FRAMES = 20_000
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
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
PEER_MAX_MESSAGE = 256 * 1024 * 1024  # a snapshot of 100,000 grants is about 9 MB
# A connection a peer's ZAP handler refused is dialled again after REFUSED_RETRY seconds,
# twice that after the next refusal, and so on up to REFUSED_RETRY_MAX: soon enough for a
# key rotation done node by node, seldom enough not to flood the peer's log.
REFUSED_RETRY = 1.0
REFUSED_RETRY_MAX = 30.0
_REFUSED = int(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_ACCEPTED = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
_DROPPED = int(zmq.EVENT_DISCONNECTED)

log = logging.getLogger("zbroker.node")

Step = Callable[[Event, Now], None]  # NodeCore.step
E = TypeVar("E")  # what drain makes of a message: a node's Event
N = TypeVar("N")  # what drain hands step with it: a node's Now


@dataclass
class _Refused:
    delay: float
    due: float | None  # None: dialled again, its handshake not over yet


class Redial:
    """The connections a peer refused (by their key: a socket and an endpoint), and when
    each is to be dialled again. Pure: the caller hands in the time."""

    def __init__(self) -> None:
        self._refused: dict[tuple[zmq.Socket[bytes], str], _Refused] = {}

    def refused(self, key: tuple[zmq.Socket[bytes], str], now: float) -> tuple[float, bool]:
        """The connection ``key`` was refused: (seconds until it is dialled again, whether
        this is the first refusal since it was last accepted)."""
        entry = self._refused.get(key)
        first = entry is None
        delay = REFUSED_RETRY if entry is None else min(entry.delay * 2, REFUSED_RETRY_MAX)
        self._refused[key] = _Refused(delay, now + delay)
        return delay, first

    def accepted(self, key: tuple[zmq.Socket[bytes], str]) -> bool:
        """The connection ``key`` was accepted; True when it had been refused."""
        return self._refused.pop(key, None) is not None

    def __bool__(self) -> bool:  # any refused: the loop asks nothing else each cycle
        return bool(self._refused)

    def due(self, now: float) -> list[tuple[zmq.Socket[bytes], str]]:
        """The connections to dial again now (each once until it is refused again)."""
        out = [k for k, e in self._refused.items() if e.due is not None and e.due <= now]
        for key in out:
            self._refused[key].due = None
        return out


class NodeSockets:
    """The sockets of node ``me``, bound and connected in the constructor."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        config: Config,
        me: NodeConfig,
        security: NodeSecurity,
    ) -> None:
        # The ZAP handler first: a CURVE server socket refuses everyone until it is bound.
        self.zap = security.start(ctx)
        self.clients = ctx.socket(zmq.ROUTER)
        security.server(self.clients, CLIENT_DOMAIN)
        client_options(self.clients)
        self.clients.setsockopt(zmq.MAXMSGSIZE, config.max_message)
        self.clients.bind(me.client)
        self.peer_in = ctx.socket(zmq.ROUTER)
        self.peer_in.setsockopt(zmq.LINGER, 0)
        self.peer_in.setsockopt(zmq.MAXMSGSIZE, PEER_MAX_MESSAGE)
        security.server(self.peer_in, PEER_DOMAIN)
        self.peer_in.bind(me.peer)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        security.server(self.pub, PEER_DOMAIN)  # only the peers may listen
        self.pub.bind(me.pub)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.peer_sockets: dict[str, zmq.Socket[bytes]] = {}
        # monitor -> the socket it watches; (socket, endpoint) -> the peer it dials
        self.monitors: dict[zmq.Socket[bytes], zmq.Socket[bytes]] = {}
        self._dialled: dict[tuple[zmq.Socket[bytes], str], str] = {}
        self._security = security
        self.redial = Redial()
        handshakes = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED
        self.monitors[self.sub.get_monitor_socket(handshakes)] = self.sub
        for other in config.nodes:
            if other.name == me.name:
                continue
            security.client(self.sub, other.name)  # per connect: each PUB has its key
            self.sub.connect(other.pub)
            self._dialled[self.sub, other.pub] = other.name
            out = ctx.socket(zmq.DEALER)
            security.client(out, other.name)
            peer_options(out, me.name)
            out.connect(other.peer)
            self._dialled[out, other.peer] = other.name
            self.peer_sockets[other.name] = out
            # A killed peer's kernel closes its connections at once: seeing that drop
            # starts the election long before peer_timeout would.
            monitor = out.get_monitor_socket(zmq.EVENT_DISCONNECTED | handshakes)
            self.monitors[monitor] = out
        self.poller = zmq.Poller()
        for sock in (self.clients, self.peer_in, self.sub, *self.monitors):
            self.poller.register(sock, zmq.POLLIN)

    def poll(self, timeout_ms: int) -> dict[zmq.Socket[bytes], int]:
        for sock, endpoint in self.redial.due(time.monotonic()) if self.redial else ():
            sock.disconnect(endpoint)
            self._security.client(sock, self._dialled[sock, endpoint])  # the SUB's differ
            sock.connect(endpoint)
        return dict(self.poller.poll(timeout_ms))

    def read(self, ready: dict[zmq.Socket[bytes], int], step: Step, now: Now) -> None:
        """Every ready socket's messages as events: peers first, clients last."""
        if self.peer_in in ready:
            drain(self.peer_in, PeerMessage, step, now)
        if self.sub in ready:
            drain(self.sub, _heartbeat, step, now)
        for monitor, watched in self.monitors.items():
            if monitor in ready:
                while True:
                    try:
                        event, where = monitor.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    kind = struct.unpack("=hi", event)[0]
                    key = self._dial_of(watched, where.decode(errors="replace"))
                    if key is None:
                        continue
                    if kind == _DROPPED:
                        step(PeerLost(self._dialled[key]), now)
                    else:
                        self._handshake(key, kind)
        if self.clients in ready:
            drain(self.clients, ClientMessage, step, now)

    def _dial_of(self, sock: zmq.Socket[bytes], where: str) -> tuple[zmq.Socket[bytes], str] | None:
        """The (socket, endpoint as configured) a monitor's event is about: libzmq names
        the endpoint as it resolved it, which may differ from the config's spelling."""
        mine = [key for key in self._dialled if key[0] is sock]
        if len(mine) == 1:  # a peer's DEALER dials one endpoint
            return mine[0]
        port = where.rpartition(":")[2]
        return next((k for k in mine if k[1] == where), None) or next(
            (k for k in mine if k[1].rpartition(":")[2] == port), None
        )

    def _handshake(self, key: tuple[zmq.Socket[bytes], str], kind: int) -> None:
        peer = self._dialled[key]
        if kind == _REFUSED:
            delay, first = self.redial.refused(key, time.monotonic())
            if first:
                log.warning(
                    "%s refused this node's key (its license's SERVER line or its "
                    "[nodes] keys may still name an older one): dialling %s again, "
                    "first in %.0f s",
                    peer,
                    key[1],
                    delay,
                )
        elif kind == _ACCEPTED and self.redial.accepted(key):
            log.warning("%s accepts this node's key again at %s", peer, key[1])

    def send_peers(self, messages: list[Outgoing]) -> None:
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

    def send_answers(self, answers: list[list[bytes]]) -> None:
        send = self.clients.send
        for frames in answers:
            try:
                if len(frames) == 2:  # two sends: send_multipart costs 4 us more in Python
                    send(frames[0], _SNDMORE_NOBLOCK)
                    send(frames[1], _NOBLOCK)
                else:
                    self.clients.send_multipart(frames, _NOBLOCK)
            except zmq.Again:
                pass  # a client whose pipe is full drops it; it will retry the request


def client_options(sock: zmq.Socket[bytes]) -> None:
    """A node's client ROUTER, as the bench's replication floor sets its own (floor.py)."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.BACKLOG, 1024)  # a failover is a reconnect storm
    sock.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)
    sock.setsockopt(zmq.RCVHWM, CLIENT_RCVHWM)


def peer_options(out: zmq.Socket[bytes], me: str) -> None:
    """A node's DEALER to a peer, named ``me`` to the peer's ROUTER (also floor.py's)."""
    out.setsockopt(zmq.LINGER, 0)
    out.setsockopt(zmq.ROUTING_ID, me.encode())
    # Queue nothing for a peer that is not connected: a dead peer's backlog would
    # arrive stale and late; the replica re-sends what a peer still needs.
    out.setsockopt(zmq.IMMEDIATE, 1)
    out.setsockopt(zmq.SNDHWM, 100_000)


def drain(
    sock: zmq.Socket[bytes],
    event: Callable[[list[bytes], zmq.Frame], E],
    step: Callable[[E, N], None],
    now: N,
) -> None:
    """Read ``sock``'s waiting messages, at most ``MAX_DRAIN``, each handed to ``step`` as
    ``event(frames, last frame)``. Also the bench's replication floor's (floor.py)."""
    recv = sock.recv
    if _dropping and sock in _dropping and not _drop(sock):
        return
    for n in range(MAX_DRAIN):
        # One message is the common case at low load, where a recv that raises Again
        # (3-4 us) is the dearest way to learn there is no second: ask first (1.5 us).
        if n == 1 and not cast(int, sock.get(_EVENTS)) & _POLLIN:
            return
        try:
            frame = recv(_NOBLOCK, copy=False)  # a Frame knows ``more``: no getsockopt
        except zmq.Again:
            return
        frames = [frame.bytes]
        while frame.more and len(frames) < MAX_FRAMES:
            frame = recv(_NOBLOCK, copy=False)
            frames.append(frame.bytes)
        if frame.more:
            _dropping.add(sock)
            if not _drop(sock):
                return
            continue
        # The last frame carries the connection's metadata: User-Id, Peer-Address.
        step(event(frames, frame), now)


# The sockets in the middle of dropping a message of more than MAX_FRAMES frames.
_dropping: set[zmq.Socket[bytes]] = set()


def _drop(sock: zmq.Socket[bytes]) -> bool:
    """Read and drop up to DROP_FRAMES frames of the message ``sock`` is in the middle of:
    whether its last frame was among them."""
    for _ in range(DROP_FRAMES):
        if not sock.recv(_NOBLOCK, copy=False).more:
            _dropping.discard(sock)
            return True
    return False


def _heartbeat(frames: list[bytes], frame: zmq.Frame) -> PeerHeartbeat:
    return PeerHeartbeat(frames)
