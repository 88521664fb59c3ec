"""A fleet of sessions in one process: opened in bulk, heartbeating, checking out in bulk.

What 10,000 licensed applications cost a triad while they merely stay alive: each
session heartbeats at the interval the node asked for in its ``open`` reply (lease / 3,
10 s with the default 30 s lease), spread evenly over the interval, so the triad
sees ``sessions / interval`` heartbeats a second. The fleet can also check out
``k`` grants per session (round robin over the sessions, ``window`` requests in
flight) to build a ledger of many live grants, heartbeating all the while.

The sessions share one DEALER (a real fleet would have one connection per
application; the node's cost per request does not depend on that, its memory per
connection aside). The runner steers the fleet through a pipe:

    ("open", n, window)          -> ("opened", sessions opened, seconds, latencies)
    ("beat", interval)           heartbeat from now on (interval None: the open replies')
    ("grants", k, window)        -> ("granted", grants got, seconds, latencies)
    ("report",)                  -> ("report", counters)
    ("stop",)
"""

from __future__ import annotations

import heapq
import time
import uuid
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import zmq

from zbroker.clients.testing.bench.common import (
    BENCH_FEATURE,
    Child,
    frame,
    open_frame,
    percentiles,
    reply_of,
)

RESEND_AFTER = 5.0


class _Fleet:
    def __init__(self, sock: zmq.Socket[bytes], conn: Connection) -> None:
        self.sock = sock
        self.conn = conn
        self.sids: list[str] = []
        self.index: dict[str, int] = {}
        self.next_req: list[int] = []
        self.pending: list[set[int]] = []  # reqs in flight, per session (for ack)
        self.inflight: dict[tuple[int, int], tuple[str, bytes, float]] = {}  # op, frame, sent
        self.deadlines: list[tuple[float, int, int]] = []  # resend heap: (when, session, req)
        self.counts: Counter[str] = Counter()
        self.interval = 0.0  # heartbeat interval, from the open replies
        self.beat_from: float | None = None
        self.beats_sent = 0
        # the task in hand: its op, start, total requests, window, sent, answered, ok
        self.task: str | None = None
        self.t0 = 0.0
        self.total = self.window = self.sent = self.answered = self.ok = 0
        self.latencies: list[float] = []  # of the task's requests (a resend keeps its first time)

    def _send(self, i: int, op: str) -> None:
        sid, req = self.sids[i], self.next_req[i]
        self.next_req[i] += 1
        pending = self.pending[i]
        ack = min(pending) if pending else req  # every reply below ack is in hand
        if op == "open":
            data = open_frame(sid, req, host=f"bench-{i % 1000}")  # under max_sessions_per_host
        elif op == "checkout":
            data = frame(op, sid, req, ack, feature=BENCH_FEATURE, count=1, version=None, wait=None)
        else:
            data = frame(op, sid, req, ack)
        pending.add(req)
        self.inflight[(i, req)] = (op, data, time.monotonic())
        heapq.heappush(self.deadlines, (time.monotonic() + RESEND_AFTER, i, req))
        self.sock.send(data)

    def _resend(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            _, i, req = heapq.heappop(self.deadlines)
            got = self.inflight.get((i, req))
            if got is not None:
                self.counts["resent"] += 1
                heapq.heappush(self.deadlines, (now + RESEND_AFTER, i, req))
                self.sock.send(got[1])

    def _on_reply(self, data: bytes) -> None:
        reply = reply_of(data)
        i, req = self.index.get(reply.get("sid", ""), -1), reply.get("req")
        got = self.inflight.pop((i, req), None) if isinstance(req, int) else None
        if got is None or not isinstance(req, int):
            return  # a late copy of a resent request
        self.pending[i].discard(req)
        op, status, sent = got[0], reply.get("status"), got[2]
        self.counts[f"{op}_{status}"] += 1
        if op == "open" and status == "ok":
            self.interval = float(reply.get("heartbeat", 10.0))
        if op == self.task:
            self.answered += 1
            self.ok += status == "ok"
            self.latencies.append(time.monotonic() - sent)

    def _feed(self) -> None:
        if self.task is None:
            return
        while self.sent < self.total and self.sent - self.answered < self.window:
            if self.task == "open":
                i = len(self.sids)
                sid = uuid.uuid4().hex
                self.sids.append(sid)
                self.index[sid] = i
                self.next_req.append(1)
                self.pending.append(set())
            else:
                i = self.sent % len(self.sids)  # round robin: each session gets k in turn
            self._send(i, self.task)
            self.sent += 1
        if self.answered >= self.total:
            done = "opened" if self.task == "open" else "granted"
            self.conn.send((done, self.ok, time.monotonic() - self.t0, percentiles(self.latencies)))
            self.task = None

    def _beat(self, now: float) -> None:
        if self.beat_from is None or not self.sids or self.interval <= 0:
            return
        due = int((now - self.beat_from) * len(self.sids) / self.interval)
        while self.beats_sent < due:
            self._send(self.beats_sent % len(self.sids), "heartbeat")
            self.beats_sent += 1

    def _command(self, msg: tuple[Any, ...]) -> bool:
        if msg[0] == "stop":
            return False
        if msg[0] == "report":
            interval = {"heartbeat_interval_ms": round(self.interval * 1000)}
            self.conn.send(("report", dict(self.counts) | interval))
        elif msg[0] == "beat":
            self.beat_from = time.monotonic()
            if msg[1] is not None:
                self.interval = msg[1]  # the echo's "open" reply names none
        elif msg[0] in ("open", "grants"):
            self.task = "open" if msg[0] == "open" else "checkout"
            self.total = msg[1] if msg[0] == "open" else msg[1] * len(self.sids)
            self.window, self.t0 = msg[2], time.monotonic()
            self.sent = self.answered = self.ok = 0
            self.latencies = []
        return True

    def loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.conn.fileno(), zmq.POLLIN)
        while True:
            ready = dict(poller.poll(5))
            if self.sock in ready:
                while True:
                    try:
                        data = self.sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_reply(data)
            if self.conn.poll() and not self._command(self.conn.recv()):
                return
            now = time.monotonic()
            self._beat(now)
            self._feed()
            self._resend(now)


def main(endpoint: str, conn: Connection) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 1_000_000)
    sock.setsockopt(zmq.RCVHWM, 1_000_000)
    sock.setsockopt(zmq.MAXMSGSIZE, -1)
    sock.connect(endpoint)
    try:
        _Fleet(sock, conn).loop()
    finally:
        sock.close(linger=0)
        ctx.destroy(linger=0)


class Fleet(Child):
    """The runner's handle on a fleet process."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(main, (endpoint,), "the fleet")

    def open(self, n: int, window: int, timeout: float) -> float:
        return float(self.call(("open", n, window), "opened", timeout)[2])

    def beat(self, interval: float | None = None) -> None:
        """Heartbeat from now on, every ``interval`` s (None: as the open replies said)."""
        self.conn.send(("beat", interval))

    def grants(
        self, per_session: int, window: int, timeout: float
    ) -> tuple[int, float, dict[str, Any]]:
        """Grants got, seconds taken, and the checkouts' latency percentiles."""
        got = self.call(("grants", per_session, window), "granted", timeout)
        return int(got[1]), float(got[2]), dict(got[3])

    def report(self) -> dict[str, int]:
        return dict(self.call(("report",), "report", 10)[1])
