"""Failover as a client sees it: SIGKILL of the primary -> first checkout granted after it.

A prober process holds one session and a DEALER to each of the three nodes. It sends
each probe (a checkout of the bench feature, a fresh request id) to all three nodes
at once, every ``PACE`` seconds whether earlier probes are answered or not: the
backups answer ``redirect`` at once, the primary grants; every granted probe is
checked back in. So the prober never has to find the
primary: the first ``ok`` after a kill comes from the new primary as soon as it
serves, and the measure includes no client retry policy, only the probe period
(``PACE``, 2 ms) as a bound on the error.

The runner kills the primary, reads ``time.monotonic()`` just before ``kill(2)``, and
tells the prober ``("mark", t_kill, node)``; the prober answers with the first grant
it receives from another node after ``t_kill``. The runner then restarts the killed
node and waits until the triad is whole again (with failback, the restarted node
catches up and takes control back) before the next trial.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from multiprocessing.connection import Connection

import zmq

from zbroker.clients.testing.bench.common import (
    Child,
    checkin_frame,
    checkout_frame,
    grant_id,
    open_frame,
    reply_of,
)

PACE = 0.002  # seconds between probes while none is granted
OPEN_TIMEOUT = 20.0


def main(endpoints: list[str], conn: Connection) -> None:
    ctx = zmq.Context()
    socks: list[zmq.Socket[bytes]] = []
    poller = zmq.Poller()
    for endpoint in endpoints:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # nothing queued for a dead node
        sock.connect(endpoint)
        poller.register(sock, zmq.POLLIN)
        socks.append(sock)
    poller.register(conn.fileno(), zmq.POLLIN)
    sid = uuid.uuid4().hex
    req = 1
    probes: dict[int, float] = {}  # checkouts in flight: req -> sent
    mark: tuple[float, int] | None = None
    opened = False
    started = time.monotonic()
    next_probe = 0.0
    try:
        while True:
            now = time.monotonic()
            if not opened and now - started > OPEN_TIMEOUT:
                conn.send(("error", "the prober could not open a session"))
                return
            if now >= next_probe:
                req += 1
                data = checkout_frame(sid, req) if opened else open_frame(sid, req)
                probes = {r: t for r, t in probes.items() if now - t < 1.0}
                probes[req] = now
                for sock in socks:
                    # not connected (the killed node): IMMEDIATE refuses
                    with contextlib.suppress(zmq.Again):
                        sock.send(data, zmq.NOBLOCK)
                next_probe = now + PACE
            ready = dict(poller.poll(max(0, int((next_probe - time.monotonic()) * 1000))))
            for node, sock in enumerate(socks):
                if sock not in ready:
                    continue
                while True:
                    try:
                        reply = reply_of(sock.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    if reply.get("status") != "ok":
                        continue  # a redirect, or unavailable
                    t = time.monotonic()
                    probe = probes.pop(reply.get("req", -1), None) is not None
                    if "grant" in reply:  # any grant, even of a probe given up on: give it back
                        req += 1
                        with contextlib.suppress(zmq.Again):
                            sock.send(checkin_frame(sid, req, grant_id(reply)), zmq.NOBLOCK)
                    if not probe:
                        continue  # the answer to a check-in, or to a probe given up on
                    if not opened:
                        opened = True
                        conn.send(("opened",))
                        continue
                    if mark is not None and node != mark[1] and t > mark[0]:
                        conn.send(("granted", t, node))
                        mark = None
            if conn.poll():
                msg = conn.recv()
                if msg[0] == "stop":
                    return
                if msg[0] == "mark":
                    mark = (msg[1], msg[2])
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.destroy(linger=0)


class Prober(Child):
    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(main, (endpoints,), "the prober")
        self.expect("opened", OPEN_TIMEOUT + 10)

    def first_grant_after(self, t_kill: float, killed: int, timeout: float) -> tuple[float, int]:
        """Seconds from ``t_kill`` to the first grant by another node, and that node."""
        self.conn.send(("mark", t_kill, killed))
        msg = self.expect("granted", timeout)
        return msg[1] - t_kill, int(msg[2])
