"""A node's sockets: opened from the config and security, read into events, written from a
``Ready``. All of them belong to the node's one thread.

- ``clients`` (ROUTER): client requests and their answers;
- ``peer_in`` (ROUTER): votes, appends, acks and catch-up from the peers;
- ``pub`` (PUB): this node's heartbeats; ``sub`` (SUB): the peers';
- one DEALER per peer, named ``peer_sockets[name]``, for messages to that peer, each with a
  monitor that says when its connection drops.

``read`` drains the ready ones into events in a fixed order (peers first, clients last);
``send_peers`` and ``send_answers`` write never blocking: a full pipe drops the message.
"""

from __future__ import annotations

from collections.abc import Callable
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

Step = Callable[[Event, Now], None]  # NodeCore.step
E = TypeVar("E")  # what drain makes of a message: a node's Event
N = TypeVar("N")  # what drain hands step with it: a node's Now


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
        self.monitors: dict[zmq.Socket[bytes], str] = {}
        for other in config.nodes:
            if other.name == me.name:
                continue
            security.client(self.sub, other.name)  # per connect: each PUB has its key
            self.sub.connect(other.pub)
            out = ctx.socket(zmq.DEALER)
            security.client(out, other.name)
            peer_options(out, me.name)
            out.connect(other.peer)
            self.peer_sockets[other.name] = out
            # A killed peer's kernel closes its connections at once: seeing that drop
            # starts the election long before peer_timeout would.
            monitor = out.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self.monitors[monitor] = other.name
        self.poller = zmq.Poller()
        for sock in (self.clients, self.peer_in, self.sub, *self.monitors):
            self.poller.register(sock, zmq.POLLIN)

    def poll(self, timeout_ms: int) -> dict[zmq.Socket[bytes], int]:
        return dict(self.poller.poll(timeout_ms))

    def read(self, ready: dict[zmq.Socket[bytes], int], step: Step, now: Now) -> None:
        """Every ready socket's messages as events: peers first, clients last."""
        if self.peer_in in ready:
            drain(self.peer_in, PeerMessage, step, now)
        if self.sub in ready:
            drain(self.sub, _heartbeat, step, now)
        for monitor, peer in self.monitors.items():
            if monitor in ready:
                while True:
                    try:
                        monitor.recv_multipart(zmq.NOBLOCK)  # only DISCONNECTED is asked for
                    except zmq.Again:
                        break
                    step(PeerLost(peer), now)
        if self.clients in ready:
            drain(self.clients, ClientMessage, step, now)

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
