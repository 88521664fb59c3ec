"""What the bench's processes share: request frames, statistics, process and node sampling.

Frames are built by hand from docs/protocol.md (a map per frame, msgpack through
``zbroker.broker.wire``), because the load generators must cost the same per message whether
they drive the triad or the echo. Times are ``time.monotonic()`` readings, which on
Linux are one clock for every process, so a kill in the runner and a grant seen by a
prober can be subtracted.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import zmq

from zbroker.broker.wire import unpack
from zbroker.clients.curve import KeyPair, secure_client
from zbroker.clients.wire import encode_request

BENCH_FEATURE = "bench"
BENCH_SEATS = 1_000_000  # never the limit: the bench measures the server, not contention


def frame(op: str, sid: str, req: int, ack: int, **fields: Any) -> bytes:
    """One request frame (docs/protocol.md)."""
    return encode_request({"op": op, "sid": sid, "req": req, "ack": ack, **fields})


def checkout_frame(sid: str, req: int, feature: str = BENCH_FEATURE) -> bytes:
    # ack = req: one request in flight per session, every earlier reply is in hand
    return frame("checkout", sid, req, req, feature=feature, count=1, version=None, wait=None)


def checkin_frame(sid: str, req: int, grant: int) -> bytes:
    return frame("checkin", sid, req, req, grant=grant)


def open_frame(sid: str, req: int = 1, host: str = "loopback") -> bytes:
    return frame("open", sid, req, 0, user="bench", host=host, display=":0", client_version="bench")


def reply_of(data: bytes) -> dict[str, Any]:
    """A reply map (or, from the echo, the request itself); {} when it is not a map."""
    obj = unpack(data)
    return obj if isinstance(obj, dict) else {}


def grant_id(reply: dict[str, Any]) -> int:
    """The grant id of a checkout's ok reply; 1 for the echo, which has none."""
    grant = reply.get("grant")
    if isinstance(grant, dict) and isinstance(grant.get("id"), int):
        return int(grant["id"])
    return 1


def percentiles(samples: Sequence[float]) -> dict[str, float | int | None]:
    """p50, p99 and max in milliseconds (nearest-rank), and the sample count."""
    if not samples:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(samples)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)] * 1000

    return {
        "n": len(ordered),
        "p50_ms": round(rank(0.50), 3),
        "p99_ms": round(rank(0.99), 3),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


def ratio(a: float | int | None, b: float | int | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


# --- process sampling (Linux /proc)

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcSample:
    at: float  # monotonic
    cpu: float  # user + system seconds so far
    rss: int  # bytes


def sample(pid: int) -> ProcSample:
    with open(f"/proc/{pid}/stat") as f:
        # the command may hold spaces: fields count from after its closing parenthesis
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / _TICK
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    return ProcSample(time.monotonic(), cpu, rss)


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (a node's: its snapshot taker, broker/taker.py)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(child) for child in f.read().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return found


def cpu_percent(before: ProcSample, after: ProcSample) -> float:
    elapsed = after.at - before.at
    return round(100 * (after.cpu - before.cpu) / elapsed, 1) if elapsed > 0 else 0.0


# --- the triad's heartbeats, watched without asking any node anything


class HeartbeatWatcher:
    """Subscribes to every node's PUB socket and keeps each node's latest heartbeat.

    Heartbeats (every ``heartbeat_interval``, 100 ms by default) carry a node's role,
    term, last and committed index: enough to see a backup catch up without sending a
    status request, which on a large ledger would itself load the node being watched.
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        pubs: dict[str, str],
        curve: dict[str, KeyPair] | None = None,
    ) -> None:
        """``curve``: each node's key pair, for a triad in secure mode. A node's heartbeat
        PUB serves only its peers' keys, so each PUB is joined with another node's key."""
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        for name, endpoint in pubs.items():
            if curve is not None:
                peer = next(keys for other, keys in curve.items() if other != name)
                secure_client(self.sock, curve[name].public, peer)
            self.sock.connect(endpoint)
        self.latest: dict[str, tuple[float, dict[str, Any]]] = {}

    def pump(self, timeout: float = 0.0) -> None:
        """Read every heartbeat that has arrived (waiting up to ``timeout`` for the first)."""
        if not self.sock.poll(int(timeout * 1000)):
            return
        while True:
            try:
                data = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            hb = reply_of(data)
            if isinstance(hb.get("node"), str):
                self.latest[hb["node"]] = (time.monotonic(), hb)

    def fresh(self, name: str, within: float = 0.35) -> dict[str, Any] | None:
        got = self.latest.get(name)
        if got is None or time.monotonic() - got[0] > within:
            return None
        return got[1]

    def wait(self, predicate: Any, timeout: float, what: str) -> float:
        """Pump until ``predicate(self)`` is true; returns the monotonic time it became so."""
        deadline = time.monotonic() + timeout
        while True:
            self.pump(0.01)
            if predicate(self):
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

    def close(self) -> None:
        self.sock.close(linger=0)


class Child:
    """A bench helper process (spawned: a zmq context must not cross a fork) and its pipe.

    The child answers commands with tuples whose first item names the answer; an
    ``("error", text)`` answer is raised here.
    """

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc: BaseProcess = ctx.Process(
            target=target, args=(*args, child), daemon=True, name=name
        )
        self.proc.start()

    def expect(self, kind: str, timeout: float) -> tuple[Any, ...]:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.name} sent no {kind!r} within {timeout:.0f} s")
        msg: tuple[Any, ...] = self.conn.recv()
        if msg[0] == "error":
            raise RuntimeError(f"{self.name} failed: {msg[1]}")
        if msg[0] != kind:
            raise RuntimeError(f"{self.name} sent {msg[0]!r}, expected {kind!r}")
        return msg

    def call(self, msg: tuple[Any, ...], expect: str, timeout: float) -> tuple[Any, ...]:
        self.conn.send(msg)
        return self.expect(expect, timeout)

    def send_stop(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(("stop",))

    def join(self) -> None:
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)

    def close(self) -> None:
        self.send_stop()
        self.join()
