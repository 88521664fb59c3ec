"""The client's I/O thread: the only thread that touches a ZeroMQ socket.

ZeroMQ sockets belong to one thread, so one thread owns the context, every DEALER
socket (one per node endpoint, created on first use) and the poller, and drives the
``Link``s. Application threads never touch a socket: they ``post`` a job (a function
of ``now``) on a queue and wake the poller through a socketpair (a zmq socket per
application thread would be the alternative); the job completes a ``Future`` the
application thread waits on with a deadline.

Sockets: DEALER, ``LINGER`` 0 (closing never waits on a dead node), ``IMMEDIATE`` (a
message is never queued for a node that is not connected, so a send to a dead node
is refused at once and the try moves on), ``MAXMSGSIZE`` (a hostile or broken peer
cannot make us allocate without bound; big enough for a status of 100,000 holders).
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import zmq

from broker.security import ClientCurve
from clients.errors import ClientClosed
from clients.grant import _Releaser
from clients.link import Link, Report

log = logging.getLogger("zbroker.client")

MAX_REPLY = 64 * 1024 * 1024
RECV_BATCH = 256  # replies read from one socket per poll, so one node cannot starve others
POLL_CAP = 0.5  # seconds: the loop wakes at least this often even with nothing due

Job = Callable[[float], None]


class Engine:
    def __init__(
        self,
        entries: Sequence[tuple[str, ...]],
        *,
        hello: Mapping[str, str],
        owner: _Releaser,
        report: Report,
        try_timeout: float,
        recover_timeout: float,
        curve: ClientCurve | None = None,
    ) -> None:
        self._curve = curve  # CURVE keys per endpoint; None: plain TCP everywhere
        self.links = [
            Link(
                i,
                entry,
                hello=hello,
                send=self._send,
                report=report,
                owner=owner,
                new_sid=lambda: uuid.uuid4().hex,
                try_timeout=try_timeout,
                recover_timeout=recover_timeout,
            )
            for i, entry in enumerate(entries)
        ]
        self._jobs: queue.SimpleQueue[tuple[Job, Future[Any]]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._post_lock = threading.Lock()  # guards the wake socket's life, not a zmq socket
        self._alive = True
        self._ctx = zmq.Context()
        self._sockets: dict[tuple[int, int], zmq.Socket[bytes]] = {}
        self._owners: dict[zmq.Socket[bytes], tuple[Link, int]] = {}
        self._monitors: dict[zmq.Socket[bytes], tuple[Link, int]] = {}
        self._poller = zmq.Poller()
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)
        self._stop_at: float | None = None
        self._closing: list[Future[Any]] = []
        self._thread = threading.Thread(target=self._run, name="zbroker-client-io", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def post(self, job: Job, fut: Future[Any]) -> None:
        """Run ``job(now)`` on the I/O thread; raises ClientClosed once it has stopped."""
        with self._post_lock:
            if not self._alive:
                raise ClientClosed("the client is closed")
            self._jobs.put((job, fut))
            # A full socketpair already holds wake-ups: the loop will run anyway.
            with contextlib.suppress(BlockingIOError):
                self._wake_w.send(b"\0")

    def shutdown(self, timeout: float) -> None:
        """Close every session (best effort by ``timeout``), stop the thread, free sockets."""
        deadline = time.monotonic() + timeout

        def job(now: float) -> None:
            self._stop_at = deadline
            for link in self.links:
                fut: Future[Any] = Future()
                self._closing.append(fut)
                link.close(fut, now, deadline)

        with contextlib.suppress(ClientClosed):  # the thread already stopped: nothing to do
            self.post(job, Future())
        if self._thread is not threading.current_thread():
            self._thread.join(timeout + 1.0)

    # --- the thread
    def _run(self) -> None:
        try:
            while not self._should_stop(time.monotonic()):
                wait = self._next_wait(time.monotonic())
                for item, _ in self._poller.poll(math.ceil(wait * 1000)):
                    if item == self._wake_r.fileno():
                        self._drain_wake()
                    elif item in self._monitors:
                        self._disconnected(item)
                    else:
                        self._receive(item)
                now = time.monotonic()
                self._run_jobs(now)
                for link in self.links:
                    link.tick(now)
        except Exception:
            log.exception("client I/O thread failed")
        finally:
            self._stop()

    def _should_stop(self, now: float) -> bool:
        if self._stop_at is None:
            return False
        return now >= self._stop_at or all(f.done() for f in self._closing)

    def _next_wait(self, now: float) -> float:
        due = min((link.next_timer() for link in self.links), default=math.inf)
        if self._stop_at is not None:
            due = min(due, self._stop_at)
        return max(0.0, min(due - now, POLL_CAP))

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _run_jobs(self, now: float) -> None:
        while True:
            try:
                job, fut = self._jobs.get_nowait()
            except queue.Empty:
                return
            try:
                job(now)
            except Exception as exc:  # a bug: tell the waiting caller instead of hanging it
                log.exception("client job failed")
                if not fut.done():
                    fut.set_exception(exc)

    def _receive(self, sock: Any) -> None:
        link, node = self._owners[sock]
        for _ in range(RECV_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 1:
                log.warning("dropped a %d-frame reply from %s", len(frames), link.endpoints[node])
                continue
            link.on_frame(node, frames[0], time.monotonic())

    def _disconnected(self, monitor: Any) -> None:
        link, node = self._monitors[monitor]
        while True:
            try:
                monitor.recv_multipart(zmq.NOBLOCK)  # only DISCONNECTED events are asked for
            except zmq.Again:
                return
            link.on_disconnected(node, time.monotonic())

    def _send(self, link: Link, node: int, frame: bytes) -> bool:
        sock = self._sockets.get((link.entry, node))
        if sock is None:
            sock = self._connect(link, node)
            if sock is None:
                return False
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return False  # not connected (IMMEDIATE) or its queue is full
        return True

    def _connect(self, link: Link, node: int) -> zmq.Socket[bytes] | None:
        endpoint = link.endpoints[node]
        sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY)
        if self._curve is not None:
            self._curve.apply(sock, endpoint)  # the server's key from its SERVER line
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            log.error("cannot connect to %s: %s", endpoint, exc)
            sock.close(linger=0)
            return None
        self._sockets[(link.entry, node)] = sock
        self._owners[sock] = (link, node)
        self._poller.register(sock, zmq.POLLIN)
        # A node killed mid-request closes its connection at once; seeing the drop lets
        # the request move to the next node without waiting out the per-try timeout.
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._monitors[monitor] = (link, node)
        self._poller.register(monitor, zmq.POLLIN)
        return sock

    def _stop(self) -> None:
        with self._post_lock:
            self._alive = False
        while True:  # posted too late to run: nothing was sent for them
            try:
                _, fut = self._jobs.get_nowait()
            except queue.Empty:
                break
            if not fut.done():
                fut.set_exception(ClientClosed("the client was closed"))
        try:
            for link in self.links:
                link.abort(time.monotonic())
        except Exception:
            log.exception("client shutdown failed")
        for monitor in self._monitors:
            monitor.close(linger=0)
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._ctx.term()
        with self._post_lock:
            self._wake_r.close()
            self._wake_w.close()
