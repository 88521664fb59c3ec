"""The process's client I/O thread: the only thread that touches a ZeroMQ socket.

Every ``LicenseClient`` of a process shares one ``Engine`` (``acquire`` / ``release``):
one ZeroMQ context, one thread that drives every client's ``Link``s, and a few DEALER
connections per node, so a client costs no thread and no file descriptor of its own.
ZeroMQ sockets belong to one thread, so this thread owns the context, every socket and
the poller. Application threads never touch a socket: they ``post`` a job (a function
of ``now``) on a queue and wake the poller through a socketpair; the job completes a
``Future`` the application thread waits on with a deadline.

Connections. Links to the same node endpoint under the same CURVE keys share one
DEALER (a ``_Conn``), up to ``LINKS_PER_CONNECTION`` of them; the next connection is
opened when those are nearly full, so that it is up when a link needs it. Every
request carries a sid (a status request its link's ``tag``), and every reply copies it
(docs/protocol.md), so a reply is routed to its link by sid: the first reply of a sid
is offered to the links of its connection and the one that claims it is remembered.
Sockets: DEALER, ``LINGER`` 0 (closing never waits on a dead node),
``IMMEDIATE`` (a message is never queued for a node that is not connected, so a send to
a dead node is refused at once and the try moves on), ``MAXMSGSIZE`` (a hostile or
broken peer cannot make us allocate without bound; big enough for a status of 100,000
holders), and a monitor of its ``DISCONNECTED`` events, passed to every link on it.

Refused keys. libzmq dials a refused connection again by itself, except one the node's
ZAP handler refused (a client key missing from its ``client_allow`` list): that one it
never dials again (4.3.5), and every client of the process sharing the connection would
stay cut off after the administrator listed the key. So the monitor also watches the
handshakes: a refused connection is dialled again after ``REFUSED_RETRY`` seconds,
doubling with each refusal up to ``REFUSED_RETRY_MAX`` (broker/sockets.py's ``Redial``
does the same for a node's peers), and its links learn the refusal (``Link.on_refused``),
so a call no node served says that the key was refused, and which one.

Timers. Each link's ``next_timer`` sits in a heap (stale entries are skipped), so a
wake-up ticks only the links that are due, not every client of the process.

Descriptors. libzmq aborts the whole process (``Too many open files
(src/epoll.cpp:38)``, exit 134) when its context starts its threads with one to three
descriptors left: ``epoll_create`` fails in a constructor that cannot report it. Its
other paths report EMFILE, and a refused TCP connect is retried. So before the engine
starts, and before each connection (the first one starts the context), the descriptors
in use are counted against ``RLIMIT_NOFILE``; what the step needs plus ``FD_MARGIN``
must be free, or the call gets ``LicenseUnavailable`` naming the cause.

What it costs (measured on Linux with /proc/self/fd; docs/client.md): the engine, 2
descriptors (the socketpair) and its thread; the context, 5 descriptors (eventfds and
epolls) and libzmq's two threads; each connection, 4 (the DEALER's mailbox, its TCP
socket, the monitor's two PAIR sockets).

Fork. A child of ``fork()`` has none of these threads; the parent's context must not
be touched there (ZMQ-NOTES.md). ``_after_fork_in_child`` drops the shared engine (kept
referenced, never closed) so that a ``LicenseClient`` made in the child starts its own;
``LicenseClient`` refuses calls on one made in the parent (``ClientForked``).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import math
import os
import queue
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import zmq

from zbroker.clients.curve import ClientCurve
from zbroker.clients.errors import ClientClosed, LicenseUnavailable, ProtocolError
from zbroker.clients.grant import Grant
from zbroker.clients.link import Link
from zbroker.clients.wire import decode_reply

if sys.platform != "win32":
    # Imported now: an import opens files, and descriptor_usage runs when none are left.
    import resource

log = logging.getLogger(__name__)  # under "zbroker.clients", which has the NullHandler

MAX_REPLY = 64 * 1024 * 1024
RECV_BATCH = 256  # replies read from one socket per poll, so one node cannot starve others
POLL_CAP = 0.5  # seconds: the loop wakes at least this often even with nothing due
# Clients' links sharing one DEALER to a node. A node bounds the replies it queues per
# connection (CLIENT_SNDHWM in broker/sockets.py: 256); 32 sessions with a few requests in
# flight each stay well under it, and 1,000 clients still need only 32 connections a node.
LINKS_PER_CONNECTION = 32
# A pool whose connections are this close to full opens the next one ahead of need: the
# first send on a connection still being made is refused (IMMEDIATE), and its link
# would go round the other nodes (connecting to them too) instead of waiting.
SPARE_WHEN_FREE = 4
FDS_ENGINE = 2  # the wake-up socketpair
FDS_CONTEXT = 5  # libzmq: the term mailbox, and an epoll and a mailbox per thread (2)
FDS_CONNECTION = 4  # the DEALER's mailbox, its TCP socket, the monitor's two PAIRs
# Kept free beyond what a step needs: libzmq's reconnects and the host's other threads
# open descriptors too, between our count and the step.
FD_MARGIN = 16
# A connection the node's ZAP handler refused is dialled again after REFUSED_RETRY
# seconds, twice that after the next refusal, and so on up to REFUSED_RETRY_MAX: soon
# after an administrator lists the key, seldom enough not to flood the node's log.
REFUSED_RETRY = 1.0
REFUSED_RETRY_MAX = 30.0
_REFUSED = int(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_ACCEPTED = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
_WATCHED = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED

Job = Callable[[float], None]
Notice = Callable[[list[Grant]], None]
ConnKey = tuple[str, str | None, str | None]  # endpoint, server key, client public key


def descriptor_usage() -> tuple[int, int] | None:
    """(descriptors open, soft RLIMIT_NOFILE) of this process; None when it cannot tell."""
    if sys.platform == "win32":
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1, soft  # less the listing's own descriptor
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                return soft, soft  # not even one left to look with
            continue
    return None


def too_many_files(what: str, need: int, usage: tuple[int, int] | None = None) -> str:
    """The cause, for a person, of a step refused for want of descriptors."""
    counted = f"{usage[0]} of {usage[1]} descriptors in use; " if usage is not None else ""
    return (
        f"too many open files (EMFILE) while {what}: {counted}it needs {need} more and "
        f"{FD_MARGIN} are kept spare: raise ulimit -n (RLIMIT_NOFILE) or close descriptors"
    )


def check_headroom(need: int, what: str) -> None:
    """Raise LicenseUnavailable unless ``need`` descriptors plus FD_MARGIN are free."""
    usage = descriptor_usage()
    if usage is not None and usage[1] - usage[0] < need + FD_MARGIN:
        raise LicenseUnavailable(too_many_files(what, need, usage))


@dataclass(eq=False)
class _Conn:
    """One DEALER to one node, shared by up to LINKS_PER_CONNECTION links."""

    key: ConnKey
    sock: zmq.Socket[bytes]
    monitor: zmq.Socket[bytes]
    users: dict[Link, int] = field(default_factory=dict)  # link -> its index of the node
    refused: str | None = None  # why the node's ZAP handler refused it, until it accepts
    redial_delay: float = 0.0  # the wait before the last redial (0: never refused)
    redial_at: float | None = None  # when to dial it again (None: not due, or dialling)


class Engine:
    """The I/O thread of every client of this process; get it with ``acquire``."""

    def __init__(self) -> None:
        check_headroom(FDS_ENGINE, "starting the client's I/O thread")
        try:
            self._wake_r, self._wake_w = socket.socketpair()
        except OSError as exc:
            raise LicenseUnavailable(
                too_many_files("starting the client's I/O thread", FDS_ENGINE)
                if exc.errno in (errno.EMFILE, errno.ENFILE)
                else f"cannot start the client's I/O thread: {exc}"
            ) from None
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._jobs: queue.SimpleQueue[tuple[Job, Future[Any], tuple[Link, ...]]] = (
            queue.SimpleQueue()
        )
        self._post_lock = threading.Lock()  # guards the wake socket's life, not a zmq socket
        self._alive = True
        self.users = 0  # clients holding it: counted by acquire / release
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None  # started with the first conn
        self._links: dict[Link, ClientCurve | None] = {}
        self._pools: dict[ConnKey, list[_Conn]] = {}
        self._conns: dict[tuple[Link, int], _Conn] = {}
        self._by_socket: dict[zmq.Socket[bytes], _Conn] = {}
        self._by_monitor: dict[zmq.Socket[bytes], _Conn] = {}
        self._routes: dict[str, Link] = {}  # sid -> the link whose requests carry it
        self._routed: dict[Link, list[str]] = {}
        self._timers: list[tuple[float, int, Link]] = []  # a heap, with stale entries
        self._due: dict[Link, float] = {}  # each link's live heap entry
        self._order = itertools.count()  # ties in the heap: Links do not compare
        self._poller = zmq.Poller()
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)
        self._halt = False
        self._notices: queue.SimpleQueue[tuple[Notice | None, Any]] = queue.SimpleQueue()
        self._notifier: threading.Thread | None = None
        self._notify_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="zbroker-client-io", daemon=True)

    @property
    def alive(self) -> bool:
        return self._alive

    def start(self) -> None:
        try:
            self._thread.start()
        except RuntimeError as exc:  # the host is out of threads
            self._alive = False
            self._wake_r.close()
            self._wake_w.close()
            raise LicenseUnavailable(f"cannot start the client's I/O thread: {exc}") from None

    # --- from application threads
    def post(self, job: Job, fut: Future[Any], links: Iterable[Link] = ()) -> None:
        """Run ``job(now)`` on the I/O thread, then reschedule ``links``.

        Raises ClientClosed once the thread has stopped; a job for a link detached
        meanwhile fails its future with ClientClosed instead of running.
        """
        with self._post_lock:
            if not self._alive:
                raise ClientClosed("the client is closed")
            self._jobs.put((job, fut, tuple(links)))
            # A full socketpair already holds wake-ups: the loop will run anyway.
            with contextlib.suppress(BlockingIOError):
                self._wake_w.send(b"\0")

    def post_from_finalizer(self, job: Job, links: Iterable[Link] = ()) -> None:
        """``post`` for a finalizer, which the collector may run on any thread, even this
        one inside ``post``: so no lock (SimpleQueue is reentrant); lost once the thread
        stopped, which closed everything anyway."""
        if not self._alive:
            return
        self._jobs.put((job, Future(), tuple(links)))
        with contextlib.suppress(OSError):  # full (a wake-up is pending) or closed (stopped)
            self._wake_w.send(b"\0")

    def attach(self, links: Sequence[Link], curve: ClientCurve | None) -> None:
        """Drive ``links`` from now on, dialling with ``curve`` (None: plain TCP)."""

        def job(now: float) -> None:
            for link in links:
                self._links[link] = curve

        self.post(job, Future())

    def detach(self, links: Sequence[Link], fut: Future[Any]) -> None:
        """End every exchange of ``links`` as its deadline would and forget them."""

        def job(now: float) -> None:
            for link in links:
                self._forget(link, now)
            fut.set_result(None)

        self.post(job, fut)

    def stop(self, timeout: float) -> None:
        """Stop the thread: close every socket and the context (no client uses it)."""

        def job(now: float) -> None:
            self._halt = True

        with contextlib.suppress(ClientClosed):  # the thread already stopped
            self.post(job, Future())
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def notify(self, callback: Notice, grants: list[Grant]) -> None:
        """Call ``callback(grants)`` on the notifier thread, shared by every client."""
        with self._notify_lock:
            if self._notifier is None:
                self._notifier = threading.Thread(
                    target=self._notify, name="zbroker-client-on-lost", daemon=True
                )
                self._notifier.start()
        self._notices.put((callback, grants))

    def flush_notices(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until every notice given so far has been delivered."""
        with self._notify_lock:
            notifier = self._notifier
        if notifier is None or notifier is threading.current_thread():
            return
        delivered = threading.Event()
        self._notices.put((None, delivered))
        delivered.wait(timeout)

    # --- called by Links, on the I/O thread
    def send(self, link: Link, node: int, frame: bytes) -> bool:
        conn = self._conns.get((link, node))
        if conn is None:
            conn = self._join(link, node)
            if conn is None:
                return False
        try:
            conn.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return False  # not connected (IMMEDIATE) or its queue is full
        return True

    # --- the thread
    def _run(self) -> None:
        try:
            while not self._halt:
                wait = self._next_wait(time.monotonic())
                for item, _ in self._poller.poll(math.ceil(wait * 1000)):
                    if item == self._wake_r.fileno():
                        self._drain_wake()
                    elif item in self._by_monitor:
                        self._monitored(self._by_monitor[item])
                    else:
                        self._receive(self._by_socket[item])
                now = time.monotonic()
                self._run_jobs(now)
                self._redial(now)
                self._tick(now)
        except Exception:
            log.exception("client I/O thread failed")
        finally:
            self._stop()

    def _next_wait(self, now: float) -> float:
        due = self._timers[0][0] if self._timers else math.inf
        redial = min(
            (c.redial_at for c in self._by_socket.values() if c.redial_at is not None), default=due
        )
        return max(0.0, min(due - now, redial - now, POLL_CAP))

    def _touch(self, link: Link) -> None:
        """Put ``link``'s next timer in the heap if it is earlier than its live entry."""
        if link not in self._links:
            return
        due = link.next_timer()
        if due < self._due.get(link, math.inf):
            self._due[link] = due
            heapq.heappush(self._timers, (due, next(self._order), link))

    def _tick(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            due, _, link = heapq.heappop(self._timers)
            if self._due.get(link) != due:
                continue  # superseded by an earlier entry (already run), or detached
            del self._due[link]
            link.tick(now)
            self._touch(link)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _run_jobs(self, now: float) -> None:
        while True:
            try:
                job, fut, links = self._jobs.get_nowait()
            except queue.Empty:
                return
            if any(link not in self._links for link in links):
                if not fut.done():
                    fut.set_exception(ClientClosed("the client was closed"))
                continue
            try:
                job(now)
            except Exception as exc:  # a bug: tell the waiting caller instead of hanging it
                log.exception("client job failed")
                if not fut.done():
                    fut.set_exception(exc)
            for link in links:
                self._touch(link)

    def _receive(self, conn: _Conn) -> None:
        for _ in range(RECV_BATCH):
            try:
                frames = conn.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            endpoint = conn.key[0]
            if len(frames) != 1:
                log.warning("dropped a %d-frame reply from %s", len(frames), endpoint)
                continue
            try:
                reply = decode_reply(frames[0])
            except ProtocolError as exc:
                log.warning("dropped a reply from %s: %s", endpoint, exc)
                continue
            now = time.monotonic()
            link = self._routes.get(reply.sid) if reply.sid is not None else None
            if link is not None:
                node = conn.users.get(link)
                if node is not None:
                    link.on_reply(node, reply, now)
                    self._touch(link)
                continue
            for link, node in list(conn.users.items()):  # a sid not seen yet, or none
                if link.on_reply(node, reply, now):
                    if reply.sid is not None:
                        self._routes[reply.sid] = link
                        self._routed.setdefault(link, []).append(reply.sid)
                    self._touch(link)
                    break

    def _monitored(self, conn: _Conn) -> None:
        while True:
            try:
                event = conn.monitor.recv_multipart(zmq.NOBLOCK)[0]
            except zmq.Again:
                return
            kind = struct.unpack("=hi", event[:6])[0]
            now = time.monotonic()
            if kind == _ACCEPTED:
                if conn.refused is not None:
                    log.warning("%s accepts this client's key now", conn.key[0])
                conn.refused, conn.redial_delay = None, 0.0
                for link, node in conn.users.items():
                    link.on_refused(node, None)
                continue
            if kind == _REFUSED:
                self._refused(conn, now)
            for link, node in list(conn.users.items()):  # refused or dropped: move on
                link.on_disconnected(node, now)
                self._touch(link)

    def _refused(self, conn: _Conn, now: float) -> None:
        """The node's ZAP handler refused the connection: say why to its links, and
        dial it again later (libzmq never does: module docstring)."""
        endpoint, _, public = conn.key
        first = conn.redial_delay == 0.0
        conn.redial_delay = (
            REFUSED_RETRY if first else min(conn.redial_delay * 2, REFUSED_RETRY_MAX)
        )
        conn.redial_at = now + conn.redial_delay
        conn.refused = (
            f"{endpoint}: the node refused this client's key (client_allow): ask the "
            f"administrator to add {public or '(none: plain TCP)'} to the node's allowed clients"
        )
        if first:
            log.warning("%s; dialling it again, first in %g s", conn.refused, conn.redial_delay)
        for link, node in conn.users.items():
            link.on_refused(node, conn.refused)

    def _redial(self, now: float) -> None:
        for conn in list(self._by_socket.values()):
            if conn.redial_at is not None and conn.redial_at <= now:
                conn.redial_at = None  # until refused again
                with contextlib.suppress(zmq.ZMQError):  # dropped meanwhile: connect anew
                    conn.sock.disconnect(conn.key[0])
                try:
                    conn.sock.connect(conn.key[0])
                except zmq.ZMQError as exc:  # no descriptor left: the I/O thread goes on
                    log.warning("cannot dial %s again: %s; trying later", conn.key[0], exc)
                    conn.redial_at = now + REFUSED_RETRY_MAX

    # --- connections
    def _join(self, link: Link, node: int) -> _Conn | None:
        """The connection ``link`` uses for ``node``: a shared one with room, or a new one."""
        endpoint = link.endpoints[node]
        curve = self._links[link]
        server = curve.servers.get(endpoint) if curve is not None else None
        key: ConnKey = (endpoint, server, curve.keys.public if curve and server else None)
        pool = self._pools.setdefault(key, [])
        conn = next((c for c in pool if len(c.users) < LINKS_PER_CONNECTION), None)
        if conn is None:
            conn = self._open(key, curve)
            if conn is None:
                return None
            pool.append(conn)
        conn.users[link] = node
        self._conns[(link, node)] = conn
        if conn.refused is not None:  # a connection shared: the refusal holds for it too
            link.on_refused(node, conn.refused)
        if all(len(c.users) > LINKS_PER_CONNECTION - SPARE_WHEN_FREE for c in pool):
            with contextlib.suppress(LicenseUnavailable):  # the link that needs it will see
                spare = self._open(key, curve)
                if spare is not None:
                    pool.append(spare)
        return conn

    def _open(self, key: ConnKey, curve: ClientCurve | None) -> _Conn | None:
        """A new DEALER to ``key``'s endpoint; None when it cannot be dialled."""
        endpoint = key[0]
        need = FDS_CONNECTION + (FDS_CONTEXT if self._ctx is None else 0)
        what = f"connecting to {endpoint}"
        check_headroom(need, what)  # before libzmq can reach its abort (module docstring)
        sock: zmq.Socket[bytes] | None = None
        try:
            ctx = self._context()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY)
            if curve is not None:
                curve.apply(sock, endpoint)  # the server's key from its SERVER line
            sock.connect(endpoint)
            # A node killed mid-request closes its connection at once; seeing the drop
            # lets the request move to the next node without waiting out the try.
            # The handshakes too: a refused key is dialled again (module docstring).
            monitor: zmq.Socket[bytes] = sock.get_monitor_socket(_WATCHED)
        except zmq.ZMQError as exc:
            if sock is not None:
                sock.close(linger=0)
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise LicenseUnavailable(too_many_files(what, need)) from None
            log.error("cannot connect to %s: %s", endpoint, exc)
            return None
        conn = _Conn(key, sock, monitor)
        self._by_socket[sock] = conn
        self._by_monitor[monitor] = conn
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(monitor, zmq.POLLIN)
        return conn

    def _context(self) -> zmq.Context[zmq.Socket[bytes]]:
        if self._ctx is None:
            ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
            # Every socket costs a descriptor, so let descriptors, not libzmq's default
            # of 1,023 sockets, be the bound (and EMFILE then means descriptors).
            usage = descriptor_usage()
            limit = usage[1] if usage is not None else ctx.get(zmq.SOCKET_LIMIT)
            wanted = min(max(limit, ctx.get(zmq.MAX_SOCKETS)), ctx.get(zmq.SOCKET_LIMIT))
            ctx.set(zmq.MAX_SOCKETS, wanted)
            self._ctx = ctx
        return self._ctx

    def _close(self, conn: _Conn) -> None:
        self._poller.unregister(conn.monitor)
        self._poller.unregister(conn.sock)
        del self._by_monitor[conn.monitor]
        del self._by_socket[conn.sock]
        conn.monitor.close(linger=0)
        conn.sock.close(linger=0)
        pool = self._pools.get(conn.key, [])
        if conn in pool:
            pool.remove(conn)
        if not pool:
            self._pools.pop(conn.key, None)

    def _forget(self, link: Link, now: float) -> None:
        """A client closed: end its link's exchanges, give up its share of connections."""
        if link not in self._links:
            return
        link.abort(now)
        del self._links[link]
        self._due.pop(link, None)  # its heap entries are skipped from now on
        for sid in self._routed.pop(link, []):
            self._routes.pop(sid, None)
        for key in [k for k in self._conns if k[0] is link]:
            conn = self._conns.pop(key)
            conn.users.pop(link, None)
            if not conn.users:
                self._close(conn)

    def _stop(self) -> None:
        with self._post_lock:
            self._alive = False
        while True:  # posted too late to run: nothing was sent for them
            try:
                _, fut, _ = self._jobs.get_nowait()
            except queue.Empty:
                break
            if not fut.done():
                fut.set_exception(ClientClosed("the client was closed"))
        try:
            for link in list(self._links):
                link.abort(time.monotonic())
        except Exception:
            log.exception("client shutdown failed")
        self._links.clear()
        for conn in list(self._by_socket.values()):
            self._close(conn)
        if self._ctx is not None:
            self._ctx.term()
        with self._post_lock:
            self._wake_r.close()
            self._wake_w.close()
        self._stop_notifier()

    # --- the notifier
    def _notify(self) -> None:
        while True:
            callback, arg = self._notices.get()
            if callback is None:
                if arg is None:
                    return
                arg.set()  # a flush: everything before it has been delivered
                continue
            try:
                callback(arg)
            except Exception:  # the application's bug must not stop later reports
                log.exception("on_lost callback failed")

    def _stop_notifier(self) -> None:
        # Not joined: a callback may be the one closing the last client, waiting for us.
        with self._notify_lock:
            if self._notifier is not None:
                self._notices.put((None, None))


# --- the one engine of the process


class _Shared:
    """The engine every client of this process uses, and the lock that guards it."""

    lock = threading.Lock()
    engine: Engine | None = None
    # engines of the parent process, in a forked child: referenced, so never collected
    # (their destructors must not touch the parent's context), and never used
    orphans: list[Engine] = []


def acquire() -> Engine:
    """The process's engine, started if needed; raises LicenseUnavailable if it cannot."""
    with _Shared.lock:
        engine = _Shared.engine
        if engine is None or not engine.alive:
            engine = Engine()
            engine.start()
            _Shared.engine = engine
        engine.users += 1
        return engine


def release(engine: Engine, timeout: float) -> None:
    """A client is done with ``engine``; the last one stops it."""
    with _Shared.lock:
        engine.users -= 1
        if engine.users > 0:
            return
        if _Shared.engine is engine:
            _Shared.engine = None
    engine.stop(timeout)


def _after_fork_in_child() -> None:
    if _Shared.engine is not None:
        _Shared.orphans.append(_Shared.engine)
    _Shared.engine = None
    _Shared.lock = threading.Lock()  # another thread may have held it across the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
