"""The load generators: persistent processes that drive one endpoint with raw DEALERs.

Each worker process (``spawn``ed once, reused for every target and level, so that the
echo and the triad are driven by exactly the same processes) takes a job: connect one
DEALER to the endpoint, open ``sessions`` sessions, and once told ``go`` keep every
session busy with one request at a time, alternating checkout and checkin of the
bench feature. ``concurrency`` outstanding requests are ``concurrency`` sessions
spread over the workers. Against the echo the same frames come back unchanged: a
checkout's "reply" then has no grant, and the checkin names grant 1.

A job has a warm-up and a measured window; only requests answered inside the window
count, and only checkouts sent inside it give latency samples (send to reply, one
request in flight per session). At the end the sessions are closed, which releases
anything still held.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import zmq

from zbroker.clients.curve import generate_keypair, secure_client
from zbroker.clients.testing.bench.common import (
    Child,
    checkin_frame,
    checkout_frame,
    frame,
    grant_id,
    open_frame,
    percentiles,
    reply_of,
)

RESEND_AFTER = 1.0  # a request unanswered this long is sent again (same req: one effect)
CLOSE_REQ = 2**62  # above any req a job sends: the close that ends every session
READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Job:
    endpoint: str
    sessions: int
    warmup: float
    duration: float
    server_key: str | None = None  # Z85: talk CURVE to a node in secure mode


@dataclass
class JobResult:
    answered: int = 0  # requests answered inside the window
    not_ok: int = 0  # of which not "ok" (denied, unavailable, redirect, error)
    resent: int = 0
    latencies: list[float] = field(default_factory=list)  # checkouts, seconds


@dataclass
class LevelResult:
    concurrency: int
    duration: float
    answered: int
    not_ok: int
    resent: int
    latency: dict[str, float | int | None]

    @property
    def pairs_per_s(self) -> float:
        return self.answered / 2 / self.duration

    def to_json(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "pairs_per_s": round(self.pairs_per_s, 1),
            "requests_per_s": round(self.answered / self.duration, 1),
            "not_ok": self.not_ok,
            "resent": self.resent,
            "checkout_latency": self.latency,
        }


def _open_sessions(sock: zmq.Socket[bytes], sids: list[str], timeout: float) -> None:
    waiting = set(sids)
    deadline = time.monotonic() + timeout
    last_send = 0.0
    while waiting:
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"{len(waiting)} sessions not opened within {timeout:.0f} s")
        if now - last_send > RESEND_AFTER:
            for sid in waiting:
                sock.send(open_frame(sid))
            last_send = now
        if sock.poll(50):
            reply = reply_of(sock.recv())
            if reply.get("status", "ok") == "ok":
                waiting.discard(reply.get("sid", ""))


def _close_sessions(sock: zmq.Socket[bytes], sids: list[str]) -> None:
    for sid in sids:
        sock.send(frame("close", sid, CLOSE_REQ, CLOSE_REQ))
    deadline = time.monotonic() + 2.0
    left = len(sids)
    while left and time.monotonic() < deadline:
        if sock.poll(50):
            sock.recv()
            left -= 1


def _drive(sock: zmq.Socket[bytes], sids: list[str], start: float, job: Job) -> JobResult:
    """The hot loop: one request in flight per session until the window closes."""
    n = len(sids)
    index = {sid: i for i, sid in enumerate(sids)}
    reqs = [1] * n  # the open was req 1
    checking_in = [False] * n
    sent = [0.0] * n
    frames = [b""] * n
    result = JobResult()
    lo, hi = start + job.warmup, start + job.warmup + job.duration
    monotonic = time.monotonic
    send = sock.send

    def issue(i: int, grant: int | None) -> None:
        reqs[i] += 1
        if grant is None:
            frames[i] = checkout_frame(sids[i], reqs[i])
            checking_in[i] = False
        else:
            frames[i] = checkin_frame(sids[i], reqs[i], grant)
            checking_in[i] = True
        sent[i] = monotonic()
        send(frames[i])

    while monotonic() < start:
        time.sleep(0.001)  # until the common start: a wait, not a synchronisation
    for i in range(n):
        issue(i, None)
    next_scan = monotonic() + RESEND_AFTER
    while True:
        now = monotonic()
        if now >= hi:
            break
        if not sock.poll(max(1, min(100, int((hi - now) * 1000)))):
            continue
        while True:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            reply = reply_of(data)
            i = index.get(reply.get("sid", ""), -1)
            if i < 0 or reply.get("req") != reqs[i]:
                continue  # a late copy of a resent request
            t = monotonic()
            ok = reply.get("status", "ok") == "ok"  # the echo's "reply" has no status
            if lo <= t < hi:
                result.answered += 1
                result.not_ok += not ok
                if not checking_in[i] and sent[i] >= lo:
                    result.latencies.append(t - sent[i])
            issue(i, grant_id(reply) if ok and not checking_in[i] else None)
        if now >= next_scan:
            next_scan = now + RESEND_AFTER
            for i in range(n):
                if now - sent[i] > RESEND_AFTER:
                    sent[i] = now
                    result.resent += 1
                    send(frames[i])
    return result


def worker(conn: Connection) -> None:
    """A load process: runs jobs from ``conn`` until told to stop."""
    ctx = zmq.Context()
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                return
            job: Job = msg[1]
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            if job.server_key is not None:
                secure_client(sock, job.server_key, generate_keypair())
            sock.connect(job.endpoint)
            try:
                sids = [uuid.uuid4().hex for _ in range(job.sessions)]
                _open_sessions(sock, sids, READY_TIMEOUT)
                conn.send(("ready",))
                start = conn.recv()[1]
                result = _drive(sock, sids, start, job)
                conn.send(("result", result))
                _close_sessions(sock, sids)
            except Exception as exc:  # reported to the runner, which raises it
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
            finally:
                sock.close(linger=0)
    finally:
        ctx.destroy(linger=0)


class LoadPool:
    """``procs`` load processes, started once and reused for every measurement."""

    def __init__(self, procs: int) -> None:
        self.children = [Child(worker, (), f"load process {i}") for i in range(procs)]

    def run(
        self,
        endpoint: str,
        concurrency: int,
        warmup: float,
        duration: float,
        server_key: str | None = None,
        at_start: Callable[[float], None] | None = None,
    ) -> LevelResult:
        """Drive ``endpoint``; ``at_start`` is called with the monotonic start of the warm-up."""
        workers = min(len(self.children), concurrency)
        shares = [concurrency // workers + (i < concurrency % workers) for i in range(workers)]
        children = self.children[:workers]
        for child, share in zip(children, shares, strict=True):
            child.call(
                ("job", Job(endpoint, share, warmup, duration, server_key)), "ready", READY_TIMEOUT
            )
        start = time.monotonic() + 0.05
        for child in children:
            child.conn.send(("go", start))
        if at_start is not None:
            at_start(start)
        results: list[JobResult] = [
            child.expect("result", warmup + duration + READY_TIMEOUT)[1] for child in children
        ]
        latencies = [x for r in results for x in r.latencies]
        return LevelResult(
            concurrency=concurrency,
            duration=duration,
            answered=sum(r.answered for r in results),
            not_ok=sum(r.not_ok for r in results),
            resent=sum(r.resent for r in results),
            latency=percentiles(latencies),
        )

    def close(self) -> None:
        for child in self.children:
            child.send_stop()
        for child in self.children:
            child.join()
