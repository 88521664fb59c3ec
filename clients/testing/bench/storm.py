"""A reconnect storm: many clients fail over at once, with the client library's own policy.

Each client is one ``zbroker.clients.link.Link``, the class the library's I/O thread drives for
one application: its session, its heartbeats at the interval the open reply asks, its
requests and their tries (``try_timeout`` 0.3 s, ``redirect`` followed, the next node
after ``unavailable``, a backoff after every full round). So the storm fails over the
way applications do, and no retry policy is written twice.

What the library's ``Engine`` adds around its links is mirrored here for many links in
one process: per link and node, a DEALER created on first use (``LINGER`` 0,
``IMMEDIATE``, ``MAXMSGSIZE``) with a monitor of its ``DISCONNECTED`` events, which cut
short a try sent to a node that died. The library's first send is always refused by
``IMMEDIATE`` (no connection yet), so its first round connects to every node: each
client holds three connections of its own before any kill. ``Engine`` itself is not
reused: in one process it shares a connection between up to 32 clients, and the storm
stands for 1,000 applications on as many hosts, each with connections of its own, which
is what a failover makes the nodes accept again. Here the sockets' file descriptors go
into an epoll and the links' timers into a heap, so a wake-up costs what is ready.

A worker process holds ``n`` clients. The runner steers every worker through a pipe:

    ("wave", t0, dead)  -> ("wave", figures)  every client checks out one more seat of
                           the bench feature (the first wave also opens the sessions);
                           times count from ``t0``, a monotonic reading of the runner;
                           ``dead``: the client endpoint of the node just killed
    ("check",)          -> ("check", sessions kept, grants still held, their ids,
                            grants the library reported unsafe or lost)
    ("stop",)

A client is *served* when its wave's checkout is answered ``ok``; its time is that
reply's arrival minus ``t0``. CLOCK_MONOTONIC is one clock for every process on Linux.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import math
import resource
import select
import time
import uuid
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import zmq

from zbroker.broker.wire import unpack
from zbroker.clients.client import TRY_TIMEOUT
from zbroker.clients.engine import MAX_REPLY
from zbroker.clients.grant import Grant, GrantState
from zbroker.clients.link import MAX_NODES, Link
from zbroker.clients.protocol import ErrorCode, Status
from zbroker.clients.testing.bench.common import BENCH_FEATURE, Child, percentiles

DEADLINE = 30.0  # of each wave's checkout: a client not served by then counts as failed
POLL_CAP = 0.5  # seconds: the loop wakes at least this often, as the library's does
UP_TIMEOUT = 60.0  # for a worker to start (spawned: a fresh interpreter and its imports)
SOCKETS_PER_NODE = 3  # a DEALER, its monitor's PAIR, and the PAIR libzmq binds for it
FDS_PER_NODE = 4  # the TCP connection and one mailbox (eventfd) per socket above
WAVE_OPS = ("open", "checkout")


@dataclass
class _Wave:
    """One wave in one worker: what each client sent and got, until all are answered."""

    t0: float
    dead: str | None
    n: int
    told: float = 0.0  # when this worker had the runner's command, after t0
    issued: float = 0.0  # when its clients had all made their first try, after t0
    copies: int = 0  # copies of the wave's requests handed to a connection
    # of which to the killed node, accepted before the socket saw the connection drop:
    # lost, and the DISCONNECTED event ends that try (else: try_timeout)
    to_dead: int = 0
    refused: int = 0  # sends IMMEDIATE refused: no connection to that node (yet)
    replies: Counter[str] = field(default_factory=Counter)  # not-ok answers to them
    redirected: set[int] = field(default_factory=set)  # clients that got a redirect
    unavailable: set[int] = field(default_factory=set)  # clients that got unavailable
    failed: Counter[str] = field(default_factory=Counter)
    # per client: seconds after t0 when served, and when a copy first went to a live node
    served: list[float | None] = field(init=False)
    first_live: list[float | None] = field(init=False)
    reqs: list[set[int]] = field(init=False)  # the wave's requests (open, checkout)
    pending: int = field(init=False)

    def __post_init__(self) -> None:
        self.served = [None] * self.n
        self.first_live = [None] * self.n
        self.reqs = [set() for _ in range(self.n)]
        self.pending = self.n

    def figures(self) -> dict[str, Any]:
        return {
            "served": self.served,
            "first_live": self.first_live,
            "replies": dict(self.replies),
            "redirected": len(self.redirected),
            "unavailable": len(self.unavailable),
            "failed": dict(self.failed),
            "told": self.told,
            "issued": self.issued,
            "requests": sum(len(reqs) for reqs in self.reqs),
            "copies": self.copies,
            "to_dead": self.to_dead,
            "refused": self.refused,
        }


class _Crowd:
    """``n`` clients (links) in one process, and the loop that drives them."""

    def __init__(self, first: int, n: int, endpoints: tuple[str, ...], conn: Connection) -> None:
        self.conn = conn
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        # libzmq refuses socket 1,024 of a context by default; this process stands for n
        # applications, each with sockets of its own
        self.ctx.set(zmq.MAX_SOCKETS, n * MAX_NODES * SOCKETS_PER_NODE + 64)
        self.epoll = select.epoll()
        self.epoll.register(conn.fileno(), select.EPOLLIN)
        self.links = [
            Link(
                i,
                endpoints,
                hello={
                    "user": "bench",
                    "host": f"bench-{(first + i) % 1000}",  # under max_sessions_per_host
                    "display": ":0",
                    "client_version": "bench",
                },
                send=self._send,
                report=self._reported,
                owner=self,
                new_sid=lambda: uuid.uuid4().hex,
                try_timeout=TRY_TIMEOUT,
                recover_timeout=DEADLINE,
            )
            for i in range(n)
        ]
        self.sockets: dict[tuple[int, int], zmq.Socket[bytes]] = {}
        self.fds: dict[
            int, tuple[zmq.Socket[bytes], int, int, bool]
        ] = {}  # sock, link, node, monitor
        self.unread: set[int] = set()  # fds of DEALERs sent on since they were last read
        self.timers: list[tuple[float, int]] = []  # (when, link): a heap with stale entries
        self.due = [math.inf] * n  # each link's live heap entry
        self.wave: _Wave | None = None
        self.sids: list[str | None] = [None] * n  # each client's session, once open
        self.grants: list[list[tuple[Grant, int]]] = [[] for _ in range(n)]  # grant, id got
        self.unknown_session = [False] * n
        self.lost: Counter[str] = Counter()  # grants the library reported unsafe or lost

    # --- what a Link needs from its owner
    def checkin(self, grant: Grant, timeout: float | None = None) -> None:
        """Never called: the storm's clients keep their grants."""

    def _reported(self, grants: list[Grant]) -> None:
        for grant in grants:
            self.lost[grant.state.value] += 1

    # --- sockets, as clients/engine.py makes them
    def _send(self, link: Link, node: int, frame: bytes) -> bool:
        sock = self.sockets.get((link.entry, node))
        if sock is None:
            sock = self._connect(link, node)
        wave = self.wave
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            if wave is not None:
                wave.refused += 1
            return False  # not connected (IMMEDIATE): the link moves on to the next node
        # a send may consume the signal of a reply that arrived meanwhile: read it later
        self.unread.add(sock.FD)
        if wave is not None:
            msg = unpack(frame)
            i = link.entry
            if isinstance(msg, dict) and msg.get("op") in WAVE_OPS and wave.served[i] is None:
                wave.reqs[i].add(int(msg["req"]))
                wave.copies += 1
                if link.endpoints[node] == wave.dead:
                    wave.to_dead += 1
                elif wave.first_live[i] is None:
                    wave.first_live[i] = time.monotonic() - wave.t0
        return True

    def _connect(self, link: Link, node: int) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY)
        sock.connect(link.endpoints[node])
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sockets[(link.entry, node)] = sock
        for s, is_monitor in ((sock, False), (monitor, True)):
            self.fds[s.FD] = (s, link.entry, node, is_monitor)
            self.epoll.register(s.FD, select.EPOLLIN)
            # a zmq FD signals only after a read has found the socket empty: read it once,
            # or the monitor's first event would never wake us (zmq_poll reads ZMQ_EVENTS)
            self.unread.add(s.FD)
        return sock

    def _read(self, fd: int) -> None:
        """Everything the socket holds: a zmq FD signals edges, not what is left."""
        sock, i, node, is_monitor = self.fds[fd]
        link = self.links[i]
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            now = time.monotonic()
            if is_monitor:
                link.on_disconnected(node, now)  # only DISCONNECTED events are asked for
            elif len(frames) == 1:
                self._count(i, frames[0])
                link.on_frame(node, frames[0], now)
        self._touch(i)

    def _count(self, i: int, data: bytes) -> None:
        reply = unpack(data)
        if not isinstance(reply, dict):
            return
        status = reply.get("status")
        if status == Status.ERROR and reply.get("code") == ErrorCode.UNKNOWN_SESSION:
            self.unknown_session[i] = True  # whichever request: the session was lost
        wave = self.wave
        if wave is None or reply.get("req") not in wave.reqs[i] or status == "ok":
            return
        wave.replies[f"{status}:{reply.get('code')}" if status == "error" else str(status)] += 1
        if status == "redirect":
            wave.redirected.add(i)
        elif status == "unavailable":
            wave.unavailable.add(i)

    # --- timers: each link's next_timer, in a heap
    def _touch(self, i: int) -> None:
        due = self.links[i].next_timer()
        if due < self.due[i]:
            self.due[i] = due
            heapq.heappush(self.timers, (due, i))

    def _tick(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            due, i = heapq.heappop(self.timers)
            if due != self.due[i]:
                continue  # superseded by an earlier entry, already run
            self.due[i] = math.inf
            self.links[i].tick(now)
            self._touch(i)

    # --- waves
    def _start_wave(self, t0: float, dead: str | None) -> None:
        wave = self.wave = _Wave(t0, dead, len(self.links))
        wave.told = time.monotonic() - t0
        for i, link in enumerate(self.links):
            fut: Future[Grant] = Future()
            fut.add_done_callback(functools.partial(self._served, wave, i))
            link.checkout(
                fut,
                time.monotonic(),
                feature=BENCH_FEATURE,
                count=1,
                version=None,
                wait=None,
                deadline=time.monotonic() + DEADLINE,
            )
            self._touch(i)
        wave.issued = time.monotonic() - t0

    def _served(self, wave: _Wave, i: int, fut: Future[Grant]) -> None:
        # called inside link.on_frame (or tick): the reply is in hand now
        took = time.monotonic() - wave.t0
        wave.pending -= 1
        error = fut.exception()
        if error is not None:
            wave.failed[type(error).__name__] += 1
            return
        wave.served[i] = took
        grant = fut.result()
        self.grants[i].append((grant, grant.id))
        if self.sids[i] is None:
            self.sids[i] = self.links[i].sid

    def _check(self) -> tuple[int, int, list[int], dict[str, int]]:
        """Sessions kept since they opened, grants held under their first id, those ids,
        and the grants the library reported (unsafe: lease lapsed; lost)."""
        kept = sum(
            sid is not None and link.sid == sid and not lost
            for sid, link, lost in zip(self.sids, self.links, self.unknown_session, strict=True)
        )
        held = [
            got
            for grants in self.grants
            for grant, got in grants
            if grant.state is GrantState.HELD and grant.id == got
        ]
        return kept, len(held), held, dict(self.lost)

    # --- the loop
    def _command(self) -> bool:
        while self.conn.poll():
            msg = self.conn.recv()
            if msg[0] == "stop":
                return False
            if msg[0] == "wave":
                self._start_wave(msg[1], msg[2])
            elif msg[0] == "check":
                self.conn.send(("check", *self._check()))
        return True

    def loop(self) -> None:
        self.conn.send(("up",))
        conn_fd = self.conn.fileno()
        while True:
            now = time.monotonic()
            wait = min(self.timers[0][0] - now if self.timers else POLL_CAP, POLL_CAP)
            for fd, _ in self.epoll.poll(max(0.0, wait)):
                if fd == conn_fd:
                    if not self._command():
                        return
                else:
                    self._read(fd)
            self._tick(time.monotonic())
            while self.unread:
                self._read(self.unread.pop())
            wave = self.wave
            if wave is not None and wave.pending == 0:
                self.conn.send(("wave", wave.figures()))
                self.wave = None

    def close(self) -> None:
        # as the library's engine stops: monitors first, then the DEALERs they watch
        for monitor in (s for s, *_, is_monitor in self.fds.values() if is_monitor):
            monitor.close(linger=0)
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.epoll.close()
        self.ctx.destroy(linger=0)


def main(first: int, n: int, endpoints: tuple[str, ...], conn: Connection) -> None:
    crowd = _Crowd(first, n, endpoints, conn)
    try:
        crowd.loop()
    except Exception as exc:  # reported to the runner, which raises it
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        crowd.close()


# --- the runner's side


def raise_fd_limit(clients: int, procs: int) -> dict[str, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, if the storm needs it.

    Call it before the triad and the workers start: they inherit it. A node holds a
    connection per client; a worker, ``FDS_PER_NODE`` descriptors per client and node.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(clients, math.ceil(clients / procs) * 3 * FDS_PER_NODE) + 256
    if need > soft:
        if hard != resource.RLIM_INFINITY and need > hard:
            raise RuntimeError(
                f"the storm needs about {need} file descriptors per process; the hard "
                f"limit is {hard} (ulimit -Hn): run fewer --storm-clients or more workers"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return {
        "need": need,
        "soft_before": soft,
        "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


class Storm:
    """``clients`` clients spread over ``procs`` worker processes, steered in waves."""

    def __init__(self, endpoints: tuple[str, ...], clients: int, procs: int) -> None:
        procs = min(procs, clients)
        shares = [clients // procs + (k < clients % procs) for k in range(procs)]
        firsts = [sum(shares[:k]) for k in range(procs)]
        self.children = [
            Child(main, (first, share, endpoints), f"storm process {k}")
            for k, (first, share) in enumerate(zip(firsts, shares, strict=True))
        ]
        self.clients = clients
        try:
            for child in self.children:
                child.expect("up", UP_TIMEOUT)
        except Exception:
            self.close()
            raise

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children if c.proc.pid is not None]

    def wave(self, t0: float, dead: str | None = None) -> dict[str, Any]:
        """Every client checks out one seat; its figures, times counted from ``t0``."""
        for child in self.children:
            child.conn.send(("wave", t0, dead))
        got = [child.expect("wave", DEADLINE + 30)[1] for child in self.children]
        served = [s for g in got for s in g["served"] if s is not None]
        first_live = [s for g in got for s in g["first_live"] if s is not None]
        copies = sum(g["copies"] for g in got)
        requests = sum(g["requests"] for g in got)  # the first wave's opens, and checkouts
        replies: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        for g in got:
            replies.update(g["replies"])
            failed.update(g["failed"])
        return {
            "clients": self.clients,
            "served": len(served),
            "served_within_1s": sum(s <= 1.0 for s in served),
            "first_served_ms": round(min(served) * 1000, 3) if served else None,
            # the client side: the last worker to get the runner's command, and to have
            # made every client's first try (the rest of the time is answers and retries)
            "told_ms": round(max(g["told"] for g in got) * 1000, 1),
            "issued_ms": round(max(g["issued"] for g in got) * 1000, 1),
            "time_to_served": percentiles(served),
            # from t0 to the first copy handed to a connection of a live node
            "time_to_first_live_send": percentiles(first_live),
            "clients_redirected": sum(g["redirected"] for g in got),
            "clients_unavailable": sum(g["unavailable"] for g in got),
            "replies_not_ok": dict(replies),
            "copies_sent": copies,
            "requests": requests,
            "resends": copies - requests,  # copies beyond each request's first
            "sends_refused": sum(g["refused"] for g in got),
            # accepted by a DEALER whose connection to the killed node had dropped, before
            # the socket noticed: lost, unless a DISCONNECTED event ends the try early
            "copies_to_dead_node": sum(g["to_dead"] for g in got),
            "failed": dict(failed),
        }

    def check(self) -> dict[str, Any]:
        got = [child.call(("check",), "check", 30) for child in self.children]
        return {
            "sessions_kept": sum(g[1] for g in got),
            "grants_held": sum(g[2] for g in got),
            "grant_ids": [i for g in got for i in g[3]],
            "reported": sum((Counter(g[4]) for g in got), Counter()),
        }

    def close(self) -> None:
        for child in self.children:
            child.send_stop()
        for child in self.children:
            child.join()
