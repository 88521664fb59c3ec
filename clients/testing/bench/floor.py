"""The replication floor: a triad's shape with none of its decisions, as a baseline.

Three processes, a leader and two followers, do what any triad that answers after a
quorum commit must do, and nothing else: the leader reads each client's request, sends
the cycle's requests to both followers in one append, writes them to its own log and
syncs it; a follower writes each append to its log, syncs, and acknowledges; the leader
answers a request once it is on two of the three disks, and its answer is the request
itself, as the echo's is. Four hops, the disks' syncs and the Python of three poll
cycles, as a checkout takes on a triad (docs/design.md), and every part of it the
node's own: the same socket types and options, the same drain (``broker/sockets.py``),
the same log (``Storage``: records over zeros laid ahead, one ``fdatasync`` a cycle),
the same order (a leader sends its append before writing it).

What it leaves out is everything zbroker decides: no validation, ledger, sessions,
report log, terms, elections, heartbeats or snapshots. The triad's figure against this
one is the cost of those; this one against the echo is what replicating costs on this
machine with the node's own transport, log and cycle, before any of its logic.

Each process runs until terminated, started with ``spawn`` as the echo is.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import msgpack
import zmq

from zbroker.broker.sockets import client_options, drain, peer_options
from zbroker.broker.storage import Storage

FOLLOWERS = ("f1", "f2")
NAMES = ("lead", *FOLLOWERS)  # the processes, in the order start returns them
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)


def _drain(sock: zmq.Socket[bytes]) -> list[list[bytes]]:
    """The socket's waiting messages' frames, read by the node's own ``drain``."""
    got: list[list[bytes]] = []
    drain(sock, lambda frames, _: frames, lambda frames, _: got.append(frames), None)
    return got


def _log(data: Path, name: str, fsync: bool) -> Storage:
    storage = Storage(data / name, name, fsync=fsync)
    storage.load()
    return storage


def _dealer(ctx: zmq.Context[zmq.Socket[bytes]], me: str, endpoint: str) -> zmq.Socket[bytes]:
    out = ctx.socket(zmq.DEALER)
    peer_options(out, me)
    out.connect(endpoint)
    return out


def lead(
    client: str, peer: str, followers: list[str], data: Path, fsync: bool, ready: Connection
) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    clients = ctx.socket(zmq.ROUTER)
    client_options(clients)
    clients.bind(client)
    acks = ctx.socket(zmq.ROUTER)
    acks.setsockopt(zmq.LINGER, 0)
    acks.bind(peer)
    outs = [_dealer(ctx, "lead", endpoint) for endpoint in followers]
    for out in outs:  # blocks until connected (IMMEDIATE): no follower misses an append
        out.send(b"")
    log = _log(data, "lead", fsync)
    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    poller.register(acks, zmq.POLLIN)
    ready.send("ready")
    waiting: deque[tuple[int, bytes, bytes]] = deque()  # (index, identity, request)
    acked = dict.fromkeys(FOLLOWERS, 0)
    last = 0  # the last index written
    send = clients.send
    while True:
        ready_socks = dict(poller.poll())
        if acks in ready_socks:
            for name, body in _drain(acks):
                follower = name.decode()
                acked[follower] = max(acked[follower], msgpack.unpackb(body))
        if clients in ready_socks:
            entries = []
            for identity, request in _drain(clients):
                last += 1
                entries.append((last, 1, {"k": "request", "r": request}))  # a delta is a map
                waiting.append((last, identity, request))
            if entries:
                append = msgpack.packb(entries)
                for out in outs:
                    try:  # noqa: SIM105 - as the node: a follower gone drops it
                        out.send(append, _NOBLOCK)
                    except zmq.Again:
                        pass
                log.append(entries)
                log.sync()
        # on two of the three disks: the leader's (synced above) and the best follower's
        commit = min(last, max(acked.values()))
        while waiting and waiting[0][0] <= commit:
            _, identity, request = waiting.popleft()
            try:
                send(identity, _SNDMORE_NOBLOCK)
                send(request, _NOBLOCK)
            except zmq.Again:
                pass


def follow(name: str, peer: str, leader: str, data: Path, fsync: bool, ready: Connection) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    appends = ctx.socket(zmq.ROUTER)
    appends.setsockopt(zmq.LINGER, 0)
    appends.bind(peer)
    out = _dealer(ctx, name, leader)
    out.send(msgpack.packb(0))  # blocks until connected, as the leader's hello does
    log = _log(data, name, fsync)
    ready.send("ready")
    while True:
        appends.poll()
        last = 0
        for _, body in _drain(appends):
            if not body:
                continue  # the leader's hello
            entries = msgpack.unpackb(body)  # [index, term, delta] each, as Storage takes
            log.append(entries)
            last = entries[-1][0]
        if last:
            log.sync()
            try:  # noqa: SIM105 - as the node: a leader gone drops it
                out.send(msgpack.packb(last), _NOBLOCK)
            except zmq.Again:
                pass


def start(client: str, peers: list[str], data: Path, *, fsync: bool = True) -> list[BaseProcess]:
    """The floor's three processes, serving ``client``; ``peers``: three free endpoints
    for the leader's acknowledgements and the followers' appends. Data under ``data``."""
    ctx = multiprocessing.get_context("spawn")
    lead_peer, *follower_peers = peers
    specs: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
        (lead, (client, lead_peer, follower_peers, data, fsync)),
        *(
            (follow, (name, endpoint, lead_peer, data, fsync))
            for name, endpoint in zip(FOLLOWERS, follower_peers, strict=True)
        ),
    ]
    procs: list[BaseProcess] = []
    readies = []
    for target, args in specs:  # all at once: each is ready once connected to the others
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(*args, child), daemon=True, name="bench-floor")
        proc.start()
        procs.append(proc)
        readies.append(parent)
    for parent in readies:
        if not parent.poll(30):
            for started in procs:
                started.terminate()
            raise RuntimeError("the replication floor's processes did not connect within 30 s")
        parent.recv()
    return procs
