"""The snapshot bench: compaction and a wiped backup's catch-up at 1,000,000 grants.

Issue 16 item 4's figures (``scripts/bench_snapshot.py``). On a fresh fsync triad of real
node processes on loopback, with the demo's timing (heartbeat 100 ms, peer_timeout
500 ms), plain TCP:

1. ``build``: ``fleets`` fleet processes (``fleet.py``) open ``sessions`` sessions and check
   out ``grants`` grants of the bench feature in all, a round of one grant per session at
   a time (``window`` requests in flight per fleet), through the real protocol. Opens and
   checkouts refused during an election are made up for (``_build``; the total may pass
   ``grants`` by less than a fleet's sessions); with ``build_seconds``, no round starts
   after that long. The lease is ``lease`` (3,600 s): the sessions heartbeat every lease / 3,
   about 83 heartbeats a second for 100,000 sessions, not the 10,000 a second of the
   default 30 s lease, which would be most of a primary's work on this machine and
   measure heartbeats, not snapshots.
2. Beside it all the time, the probe (``Probe``): ``probes`` sessions of their own, each
   alternating a checkout and a checkin of ``viewer`` (a demo feature of 50 seats that
   nothing else uses: the bench feature's seats are all taken), one request in flight,
   following redirects. Every checkout's latency is kept with the time it was sent;
   every reply's time, for the slowest gap between two replies.
3. ``settle``: until the first-ranked node is primary and both backups hold its commit.
   ``compaction``: a delta load (another ``Probe`` of ``load_sessions`` sessions) runs
   until every node has replaced its snapshot file ``compactions`` times (the file's
   inode, sampled every 0.2 s: no hook in the node). ``catch_up``: the lowest-ranked
   backup is killed (SIGKILL), its data directory wiped (``LocalTriad.wipe``: it starts
   as a wiped node), started again once its last heartbeats are read; done when it is a
   backup again and its commit is at least the primary's commit in the primary's last
   heartbeat before the backup's own (a 0.1 s resolution: heartbeats).
4. For each phase: the probe's checkouts, p50 / p99 / max, the slowest checkouts with
   their time in the phase, failed and redirected probe requests, the slowest gap
   between two probe replies; elections (the highest term in any heartbeat before and
   after; and the "now <role> in term <n>" lines of the node logs); compactions per node;
   each node's RSS (``/proc/<pid>/status`` VmRSS every 0.2 s: peak and final), and its
   snapshot taker's (the node's child process, broker/taker.py: peak). A node
   past ``abort_mb`` is killed (SIGKILL), to spare the shared machine, and the run says so.

The probe classifies a checkout by the time it was sent, as the other phases do; the
phases are contiguous, so none is lost between two of them. A checkout still unanswered
when its phase's figures are taken shows as ``unanswered_ms`` (its age then).
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import itertools
import json
import os
import re
import signal
import tempfile
import threading
import time
import uuid
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import zmq

from zbroker.broker.limits import MAXIMA
from zbroker.clients.testing.bench.common import (
    BENCH_FEATURE,
    Child,
    checkin_frame,
    checkout_frame,
    children,
    frame,
    grant_id,
    open_frame,
    percentiles,
    reply_of,
    sample,
)
from zbroker.clients.testing.bench.fleet import Fleet
from zbroker.clients.testing.bench.runner import machine
from zbroker.clients.testing.bench.triad import BenchTriad

Say = Callable[[str], None]

PROBE_FEATURE = "viewer"  # 50 seats: the probe and the load hold at most one per session
SAMPLE_EVERY = 0.2  # seconds between RSS and snapshot-file samples
RESEND_AFTER = 1.0  # a probe request unanswered this long is sent again (same req)
RETRY_AFTER = 0.05  # after "unavailable" or a redirect naming no primary
ROTATE_AFTER = 3  # unanswered sends of one request before trying the next node
SLOWEST = 10  # slowest checkouts listed per phase


@dataclass(frozen=True)
class SnapPlan:
    name: str
    sessions: int = 100_000
    grants: int = 1_000_000
    snapshot_every: int = 20_000
    lease: float = 3600.0  # see the module docstring
    fleets: int = 4
    window: int = 64  # requests in flight per fleet while building
    makeup: int = 3  # tries at most to make up for opens refused during elections (see _build)
    probes: int = 4
    load_sessions: int = 32  # the compaction phase's delta load
    compactions: int = 2  # per node, in the compaction phase
    phase_timeout: float = 900.0  # seconds a phase may take before the run gives up on it
    abort_mb: int = 8_192  # a node past this RSS is killed, to spare the shared machine
    build_timeout: float = 3600.0
    build_seconds: float | None = None  # no round starts after this long: measure what is held


PLANS = {
    "full": SnapPlan("full"),
    "quick": SnapPlan("quick", sessions=10_000, grants=100_000, snapshot_every=10_000),
    "tiny": SnapPlan(
        "tiny",
        sessions=200,
        grants=1_000,
        snapshot_every=300,
        fleets=2,
        window=32,
        probes=2,
        load_sessions=4,
        phase_timeout=60.0,
        build_timeout=60.0,
    ),
}


def plan_named(name: str, **overrides: Any) -> SnapPlan:
    plan = replace(PLANS[name], **{k: v for k, v in overrides.items() if v is not None})
    if plan.grants % plan.sessions:
        raise ValueError(
            f"--grants ({plan.grants}) must be a multiple of --sessions ({plan.sessions}):"
            " every session holds the same number of grants"
        )
    if plan.sessions < plan.fleets:
        raise ValueError(f"--sessions must be at least {plan.fleets}, one per fleet process")
    return plan


# --- the probe: a few sessions checking out and in, one request in flight each


class _Probe:
    def __init__(self, socks: list[zmq.Socket[bytes]], endpoints: list[str], target: int) -> None:
        self.socks, self.endpoints, self.target = socks, endpoints, target
        self.sids: list[str] = []
        self.index: dict[str, int] = {}
        self.req: list[int] = []
        self.op: list[str] = []
        self.frame: list[bytes] = []
        self.first: list[float] = []  # first send of the request in hand
        self.last: list[float] = []  # its latest send
        self.sends: list[int] = []  # sends of the request in hand
        self.retry: list[tuple[float, int, int]] = []  # heap: (when, session, req)
        self.opened = 0
        self.closing = False
        # checkouts answered ok: when first sent, and how long until the reply
        self.co_sent = array("d")
        self.co_lat = array("d")
        self.reply_at = array("d")  # every reply in order (for the gaps)
        self.events: list[tuple[float, str]] = []  # (when, "op_status") of every non-ok reply
        self.resent = array("d")  # when a request was sent again for want of a reply

    def add(self, n: int) -> None:
        for _ in range(n):
            sid = uuid.uuid4().hex
            self.index[sid] = len(self.sids)
            self.sids.append(sid)
            self.req.append(0)
            self.op.append("")
            self.frame.append(b"")
            self.first.append(0.0)
            self.last.append(0.0)
            self.sends.append(0)
            self._issue(len(self.sids) - 1, "open")

    def _issue(self, i: int, op: str, grant: int = 0) -> None:
        self.req[i] += 1
        sid, req = self.sids[i], self.req[i]
        if op == "open":
            data = open_frame(sid, req, host="probe")
        elif op == "checkout":
            data = checkout_frame(sid, req, PROBE_FEATURE)
        elif op == "checkin":
            data = checkin_frame(sid, req, grant)
        else:
            data = frame(op, sid, req, req)
        self.op[i], self.frame[i], self.sends[i] = op, data, 0
        self.first[i] = time.monotonic()
        self._send(i)

    def _send(self, i: int) -> None:
        self.sends[i] += 1
        if self.sends[i] > ROTATE_AFTER and self.sends[i] % ROTATE_AFTER == 1:
            self.target = (self.target + 1) % len(self.socks)  # that node may be gone
        self.last[i] = time.monotonic()
        self.socks[self.target].send(self.frame[i])

    def on_reply(self, data: bytes) -> None:
        reply = reply_of(data)
        i = self.index.get(reply.get("sid", ""), -1)
        if i < 0 or reply.get("req") != self.req[i] or not self.op[i]:
            return  # a late copy of a resent request
        now = time.monotonic()
        op, status = self.op[i], reply.get("status")
        self.reply_at.append(now)
        if status == "ok":
            if op == "open":
                self.opened += 1
            if op == "checkout":
                self.co_sent.append(self.first[i])
                self.co_lat.append(now - self.first[i])
            if op == "close":
                self.op[i] = ""  # done
            elif not self.closing:
                self._issue(i, "checkin" if op == "checkout" else "checkout", grant_id(reply))
            return
        self.events.append((now, f"{op}_{status}"))
        if status == "redirect":
            primary = reply.get("primary")
            if primary in self.endpoints:
                self.target = self.endpoints.index(primary)
                self._send(i)  # the same request, to the primary it names
                return
        if status in ("redirect", "unavailable"):
            heapq.heappush(self.retry, (now + RETRY_AFTER, i, self.req[i]))  # the same request
        elif op in ("checkout", "checkin") and not self.closing:
            # denied or an error: this request is answered for good, go on with a new one
            self._issue(i, "checkout")

    def tick(self) -> None:
        now = time.monotonic()
        while self.retry and self.retry[0][0] <= now:
            _, i, req = heapq.heappop(self.retry)
            if self.req[i] == req and self.op[i]:
                self._send(i)
        for i in range(len(self.sids)):
            if self.op[i] and now - self.last[i] > RESEND_AFTER:
                self.resent.append(now)
                self._send(i)

    def close_all(self) -> None:
        self.closing = True
        for i in range(len(self.sids)):
            self._issue(i, "close")

    def figures(self, t0: float, t1: float) -> dict[str, Any]:
        """The figures of [t0, t1); forgets what came before t1 (phases do not overlap)."""
        lat = [(s, x) for s, x in zip(self.co_sent, self.co_lat, strict=True) if t0 <= s < t1]
        replies = [t for t in self.reply_at if t0 <= t < t1]
        gap, gap_at = 0.0, None
        for a, b in itertools.pairwise(replies):
            if b - a > gap:
                gap, gap_at = b - a, a
        now = time.monotonic()
        unanswered = [
            now - self.first[i]
            for i in range(len(self.sids))
            if self.op[i] == "checkout" and t0 <= self.first[i] < t1
        ]
        slowest = sorted(lat, key=lambda p: -p[1])[:SLOWEST]
        events = Counter(kind for t, kind in self.events if t0 <= t < t1)
        out = {
            "checkouts": len(lat),
            "checkout_latency": percentiles([x for _, x in lat]),
            "over_50ms": sum(x > 0.05 for _, x in lat),
            "over_500ms": sum(x > 0.5 for _, x in lat),
            "slowest": [{"at_s": round(s - t0, 2), "ms": round(x * 1000, 1)} for s, x in slowest],
            "slowest_gap_ms": round(gap * 1000, 1),
            "slowest_gap_at_s": round(gap_at - t0, 2) if gap_at is not None else None,
            "redirected": sum(n for k, n in events.items() if k.endswith("_redirect")),
            "failed": sum(n for k, n in events.items() if not k.endswith("_redirect")),
            "not_ok": dict(events),
            "resent": sum(t0 <= t < t1 for t in self.resent),
            "unanswered_ms": round(max(unanswered) * 1000, 1) if unanswered else None,
        }
        keep = [k for k, s in enumerate(self.co_sent) if s >= t1]
        self.co_sent = array("d", (self.co_sent[k] for k in keep))
        self.co_lat = array("d", (self.co_lat[k] for k in keep))
        self.reply_at = array("d", (t for t in self.reply_at if t >= t1))
        self.events = [e for e in self.events if e[0] >= t1]
        self.resent = array("d", (t for t in self.resent if t >= t1))
        return out


def probe_main(endpoints: list[str], target: int, sessions: int, conn: Connection) -> None:
    """A probe process: opens ``sessions`` sessions, then checks out and in until stopped.

    Commands: ``("figures", t0, t1)`` -> ``("figures", dict)``; ``("stop",)`` closes the
    sessions (waiting up to 2 s for the answers) and ends."""
    ctx = zmq.Context()
    socks = []
    for endpoint in endpoints:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        socks.append(sock)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    poller.register(conn.fileno(), zmq.POLLIN)
    probe = _Probe(socks, endpoints, target)
    try:
        probe.add(sessions)
        ready = False
        stop_by: float | None = None
        while stop_by is None or (time.monotonic() < stop_by and any(probe.op)):
            for sock, _ in poller.poll(10):
                if sock in socks:
                    while True:
                        try:
                            data = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        probe.on_reply(data)
            if not ready and probe.opened == sessions:
                ready = True
                conn.send(("ready",))
            if conn.poll():
                msg = conn.recv()
                if msg[0] == "figures":
                    conn.send(("figures", probe.figures(msg[1], msg[2])))
                elif msg[0] == "stop" and stop_by is None:
                    probe.close_all()
                    stop_by = time.monotonic() + 2.0
            probe.tick()
    except Exception as exc:  # reported to the runner, which raises it
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.destroy(linger=0)


class Probe(Child):
    """The runner's handle on a probe (or delta load) process."""

    def __init__(self, endpoints: list[str], target: int, sessions: int, name: str) -> None:
        super().__init__(probe_main, (endpoints, target, sessions), name)

    def figures(self, t0: float, t1: float) -> dict[str, Any]:
        return dict(self.call(("figures", t0, t1), "figures", 60)[1])


# --- what the bench watches: RSS and snapshot files (a thread), heartbeats (the caller's)


def _children_rss(pid: int) -> int:
    """The RSS of ``pid``'s child processes together: a node's is its snapshot taker."""
    total = 0
    for child in children(pid):
        with contextlib.suppress(OSError):
            total += sample(child).rss
    return total


class Sampler(threading.Thread):
    """Every node's RSS and snapshot file, every SAMPLE_EVERY s, until stopped.

    A compaction replaces the snapshot file (written aside, renamed over it): a new inode
    is a new snapshot. A restarted node is sampled under its new pid."""

    def __init__(self, triad: BenchTriad, abort_mb: int) -> None:
        super().__init__(name="bench-snapshot-sampler", daemon=True)
        self.triad = triad
        self.abort = abort_mb * 2**20
        self.killed: dict[str, tuple[float, int]] = {}  # node: (when, RSS) past ``abort``
        self.rss: dict[str, list[tuple[float, int]]] = {n: [] for n in triad.names}
        # the node's snapshot taker (broker/taker.py), a child process of the node
        self.taker_rss: dict[str, list[tuple[float, int]]] = {n: [] for n in triad.names}
        self.snapshots: dict[str, list[tuple[float, int]]] = {n: [] for n in triad.names}
        self._inode: dict[str, int | None] = dict.fromkeys(triad.names)
        self._lock = threading.Lock()  # ``once`` is also called by the runner's thread
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(SAMPLE_EVERY):
            self.once()

    def once(self) -> None:
        with self._lock:
            self._once()

    def _once(self) -> None:
        now = time.monotonic()
        for name in self.triad.names:
            proc = self.triad.local.procs.get(name)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(OSError):
                    rss = sample(proc.pid).rss
                    self.rss[name].append((now, rss))
                    self.taker_rss[name].append((now, _children_rss(proc.pid)))
                    if rss > self.abort:
                        os.kill(proc.pid, signal.SIGKILL)
                        self.killed[name] = (now, rss)
            try:
                st = (self.triad.local.config.node(name).data / "snapshot").stat()
            except OSError:
                self._inode[name] = None  # none yet, or wiped
                continue
            if st.st_ino != self._inode[name]:
                self._inode[name] = st.st_ino
                self.snapshots[name].append((now, st.st_size))

    def count(self, name: str, since: float) -> int:
        return sum(t >= since for t, _ in self.snapshots[name])

    def stop(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(5)

    def figures(self, t0: float, t1: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.triad.names:
            rss = [r for t, r in self.rss[name] if t0 <= t <= t1]
            taker = [r for t, r in self.taker_rss[name] if t0 <= t <= t1]
            snaps = [(t, size) for t, size in self.snapshots[name] if t0 <= t <= t1]
            out[name] = {
                "rss_peak_mb": _mb(max(rss)) if rss else None,
                "rss_final_mb": _mb(rss[-1]) if rss else None,
                "taker_rss_peak_mb": _mb(max(taker)) if taker else None,
                "compactions": len(snaps),
                "compaction_at_s": [round(t - t0, 2) for t, _ in snaps],
                "snapshot_mb": _mb(snaps[-1][1]) if snaps else None,
                "killed_past_mb": _mb(self.abort)
                if t0 <= self.killed.get(name, (-1, 0))[0] <= t1
                else None,
            }
        return out


def _mb(n: int) -> float:
    return round(n / 2**20, 1)


class Beats:
    """The triad's heartbeats as they come (``HeartbeatWatcher`` keeps only the latest):
    the highest term seen, and each node's recent heartbeats for the catch-up test."""

    def __init__(self, triad: BenchTriad) -> None:
        self.watch = triad.watch
        self.names = triad.names
        self.recent: dict[str, deque[tuple[float, dict[str, Any]]]] = {
            n: deque(maxlen=64) for n in triad.names
        }
        self.max_term = 0

    def pump(self, timeout: float = 0.0) -> None:
        self.watch.pump(timeout)
        for name, (at, hb) in self.watch.latest.items():
            recent = self.recent.get(name)
            if recent is not None and (not recent or recent[-1][0] != at):
                recent.append((at, hb))
                self.max_term = max(self.max_term, int(hb.get("term") or 0))

    def role(self, name: str, since: float = 0.0) -> str | None:
        hb = self.watch.fresh(name)
        at = self.watch.latest.get(name, (0.0, {}))[0]
        return hb.get("role") if hb is not None and at > since else None

    def primary(self) -> str | None:
        return next((n for n in self.names if self.role(n) == "primary"), None)

    def holds_primary_commit(self, name: str, since: float = 0.0) -> bool:
        """``name`` (heard after ``since``) is a backup at least at the commit the primary
        announced in its last heartbeat before ``name``'s latest."""
        primary = self.primary()
        if primary is None or primary == name or self.role(name, since) != "backup":
            return False
        at, hb = self.recent[name][-1]
        before = [p for t, p in self.recent[primary] if t <= at]
        return bool(before) and int(hb.get("commit") or 0) >= int(before[-1].get("commit") or 0)

    def stands(self, name: str, since: float = 0.0) -> bool:
        """``name`` (heard after ``since``) says it may stand for election: a node says it
        may not while it installs a snapshot (its ledger is the image's only then)."""
        recent = self.recent.get(name)
        if not recent:
            return False
        at, hb = recent[-1]
        return at > since and hb.get("stands") is True

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        """Pump until ``predicate()``; returns the monotonic time it became true."""
        deadline = time.monotonic() + timeout
        while True:
            self.pump(0.02)
            if predicate():
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


_ROLE_LINE = re.compile(r" now (\w+) in term (\d+)")


class Logs:
    """The role changes each node logged ("now <role> in term <n>") since a mark."""

    def __init__(self, triad: BenchTriad) -> None:
        self.paths = {n: triad.local.logs / f"{n}.log" for n in triad.names}
        self.offsets = dict.fromkeys(triad.names, 0)
        self.mark()

    def mark(self) -> None:
        for name, path in self.paths.items():
            self.offsets[name] = path.stat().st_size if path.exists() else 0

    def since_mark(self) -> list[list[Any]]:
        """[node, role, term] in log order per node; then marks again."""
        changes: list[list[Any]] = []
        for name, path in self.paths.items():
            if not path.exists():
                continue
            with open(path, "rb") as f:
                f.seek(self.offsets[name])
                text = f.read().decode(errors="replace")
            changes += [[name, m[1], int(m[2])] for m in _ROLE_LINE.finditer(text)]
        self.mark()
        return changes


# --- the run


@dataclass
class _Run:
    plan: SnapPlan
    triad: BenchTriad
    beats: Beats
    sampler: Sampler
    logs: Logs
    probe: Probe
    say: Say

    def phase(self, name: str, t0: float, extra: dict[str, Any]) -> dict[str, Any]:
        """Every figure of the phase that started at ``t0`` and ends now."""
        self.beats.pump(0.05)
        self.sampler.once()  # a phase shorter than SAMPLE_EVERY has a sample too
        t1 = time.monotonic()
        before = extra.pop("term_before", None)
        out = {
            "seconds": round(t1 - t0, 3),
            **extra,
            "probe": self.probe.figures(t0, t1),
            "term_before": before,
            "term_after": self.beats.max_term,
            "role_changes": self.logs.since_mark(),
            "nodes": self.sampler.figures(t0, t1),
        }
        out["elections"] = out["term_after"] - before if before is not None else None
        self.say(f"  {name}: {_line(out)}")
        return out

    def gather(self, children: Iterable[Child], kind: str, timeout: float) -> list[Any]:
        """Each child's ``kind`` answer (in order), pumping heartbeats while waiting."""
        todo = list(children)
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(todo):
            for k, child in enumerate(todo):
                if k not in got and child.conn.poll():
                    got[k] = child.expect(kind, 1)
            self.beats.pump(0.05)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(todo) - len(got)} processes sent no {kind!r} in time")
        return [got[k] for k in range(len(todo))]

    def in_use(self, feature: str) -> tuple[str, int]:
        """(the primary, seats of ``feature`` in use there), asked as status."""
        deadline = time.monotonic() + 120
        while True:
            primary = self.beats.primary()
            if primary is not None:
                with contextlib.suppress(TimeoutError, RuntimeError):
                    features = self.triad.status(primary, timeout=10)[2].get("features", [])
                    return primary, sum(
                        int(f.get("in_use", 0)) for f in features if f.get("name") == feature
                    )
            if time.monotonic() > deadline:
                raise TimeoutError("no primary answered status within 120 s")
            self.beats.pump(0.1)

    def first_primary(self) -> None:
        """Until the first-ranked node, which the fleets talk to, is primary (failback)."""
        first = self.triad.names[0]
        what = f"{first} to be primary"
        self.beats.wait(lambda: self.beats.role(first) == "primary", self.plan.phase_timeout, what)

    def whole(self, timeout: float) -> float:
        """Until the first-ranked node is primary and every backup holds its commit."""
        first = self.triad.names[0]

        def whole() -> bool:
            return self.beats.role(first) == "primary" and all(
                self.beats.holds_primary_commit(n) for n in self.triad.names[1:]
            )

        return self.beats.wait(whole, timeout, "the triad to be whole, first-ranked primary")


def _shares(n: int, parts: int) -> list[int]:
    return [n // parts + (k < n % parts) for k in range(parts)]


def _build(run: _Run, fleets: list[Fleet]) -> dict[str, Any]:
    """Sessions, then rounds of one grant per session, until ``grants`` are held.

    Opens and checkouts refused during an election are made up for: opens by as many new
    sessions (at most ``makeup`` times; a fleet keeps the sessions it could not open, whose
    later checkouts fail at once), grants by more rounds, on as few fleets as cover the
    shortfall (at most twice the planned rounds and ``makeup`` more)."""
    plan, say = run.plan, run.say
    opened_by = [0] * len(fleets)
    t0 = time.monotonic()
    for attempt in range(1 + plan.makeup):
        short = plan.sessions - sum(opened_by)
        if short <= 0:
            break
        run.first_primary()
        asked = [(k, n) for k, n in enumerate(_shares(short, len(fleets))) if n]
        for k, n in asked:
            fleets[k].conn.send(("open", n, plan.window))
        answers = run.gather([fleets[k] for k, _ in asked], "opened", plan.build_timeout)
        for (k, _), answer in zip(asked, answers, strict=True):
            opened_by[k] += int(answer[1])
        say(
            f"  {sum(opened_by)} sessions opened ({attempt + 1} tries), "
            f"{time.monotonic() - t0:.1f} s so far, term {run.beats.max_term}"
        )
    opened = sum(opened_by)
    open_s = time.monotonic() - t0
    for fleet in fleets:
        fleet.beat()
    rounds: list[dict[str, Any]] = []
    t1 = time.monotonic()
    held = 0
    budget_spent = False
    for k in range(2 * (plan.grants // plan.sessions) + plan.makeup):
        short = plan.grants - held
        if short <= 0:
            break
        if plan.build_seconds is not None and time.monotonic() - t0 > plan.build_seconds:
            budget_spent = True
            break
        chosen, cover = [], 0
        for fleet, n in zip(fleets, opened_by, strict=True):
            if cover < short:  # as few fleets as cover the shortfall
                chosen.append(fleet)
                cover += n
        run.first_primary()
        started = time.monotonic()
        for fleet in chosen:
            fleet.conn.send(("grants", 1, plan.window))
        answers = run.gather(chosen, "granted", plan.build_timeout)
        primary, held = run.in_use(BENCH_FEATURE)
        took = time.monotonic() - started
        ok = sum(int(a[1]) for a in answers)
        rounds.append(
            {"fleets": len(chosen), "ok": ok, "held": held, "seconds": round(took, 2)}
            | {"primary": primary, "term": run.beats.max_term}
        )
        say(
            f"  round {k + 1}: {ok} checkouts ok in {took:.1f} s, {held} grants held on "
            f"{primary} (term {run.beats.max_term}), {time.monotonic() - t1:.0f} s so far"
        )
    grants_s = time.monotonic() - t1
    counts: Counter[str] = Counter()
    for fleet in fleets:
        counts.update(fleet.report())
    counts.pop("heartbeat_interval_ms", None)
    return {
        "sessions": opened,
        "open_s": round(open_s, 2),
        "opens_per_s": round(opened / open_s, 1),
        "grants": held,
        "grants_s": round(grants_s, 2),
        "grants_per_s": round(held / grants_s, 1) if grants_s else None,
        "reached": held >= plan.grants,
        "stopped_by_build_seconds": budget_spent,
        "rounds": rounds,
        "fleet_counts": dict(counts),
    }


def _compaction(run: _Run, endpoints: list[str]) -> dict[str, Any]:
    plan = run.plan
    primary = run.beats.primary() or run.triad.names[0]
    load = Probe(
        endpoints,
        endpoints.index(run.triad.endpoint[primary]),
        plan.load_sessions,
        "the delta load",
    )
    try:
        load.expect("ready", 60)
        # Counted from here, once the load's sessions are open: the compactions while it
        # runs. The probe's own deltas compact too; counted from before the load process
        # started, they could make the count before the load had checked anything out.
        t0 = time.monotonic()

        def enough() -> bool:
            return bool(run.sampler.killed) or all(
                run.sampler.count(n, t0) >= plan.compactions for n in run.triad.names
            )

        try:
            run.beats.wait(enough, plan.phase_timeout, f"{plan.compactions} compactions per node")
            timed_out = False
        except TimeoutError:
            timed_out = True
        load_figures = load.figures(t0, time.monotonic())
    finally:
        load.close()
    return {"timed_out": timed_out, "load": load_figures}


def _catch_up(run: _Run) -> dict[str, Any]:
    triad, beats = run.triad, run.beats
    primary = beats.primary() or triad.names[0]
    victim = next(n for n in reversed(triad.names) if n != primary)
    killed = time.monotonic()
    triad.local.kill(victim)
    triad.local.wipe(victim)

    def silent() -> bool:  # the killed process's last heartbeats, still in flight, are read
        return time.monotonic() - beats.watch.latest.get(victim, (0.0, {}))[0] > 0.3

    beats.wait(silent, 10, f"the heartbeats of the killed {victim} to stop")
    started = time.monotonic()
    triad.local.start(victim)
    out: dict[str, Any] = {
        "node": victim,
        "primary": primary,
        "kill_to_start_s": round(started - killed, 3),
    }
    try:
        beats.wait(
            lambda: beats.role(victim, started) is not None, 60, f"{victim}'s first heartbeat"
        )
        out["first_heartbeat_s"] = round(time.monotonic() - started, 3)
        done = beats.wait(
            lambda: beats.holds_primary_commit(victim, started) or victim in run.sampler.killed,
            run.plan.phase_timeout,
            f"{victim} to catch up",
        )
        gone = run.sampler.killed.get(victim)
        out["caught_up_s"] = round(done - started, 3) if gone is None else None
        if gone is None:  # its log is; its ledger follows, installed in steps
            installed = beats.wait(
                lambda: beats.stands(victim, done) or victim in run.sampler.killed,
                run.plan.phase_timeout,
                f"{victim}'s ledger installed",
            )
            out["ledger_installed_s"] = round(installed - started, 3)
        if gone is not None:  # past abort_mb: the sampler killed it
            out["killed_at_s"] = round(gone[0] - started, 3)
            out["killed_rss_mb"] = _mb(gone[1])
    except TimeoutError as exc:
        out["caught_up_s"] = None
        out["timed_out"] = str(exc)
    run.sampler.once()
    snaps = [t for t, _ in run.sampler.snapshots[victim] if t >= started]
    out["snapshot_installed_s"] = round(snaps[0] - started, 3) if snaps else None
    with contextlib.suppress(TimeoutError, RuntimeError):
        own = triad.status(victim, timeout=2 if victim in run.sampler.killed else 10)[2]["nodes"][0]
        out["status"] = {k: own.get(k) for k in ("role", "term", "commit", "serving")}
    rss = [r for t, r in run.sampler.rss[victim] if t >= started]
    out["rss_peak_mb"] = _mb(max(rss)) if rss else None
    return out


def run(
    plan: SnapPlan, out: Path | None, say: Say = print, keep: Path | None = None
) -> dict[str, Any]:
    """The whole bench (see the module docstring); writes the JSON to ``out`` and returns it.

    ``keep``: the folder for the triad (config, data, node logs), left in place; by
    default a temporary one, removed at the end."""
    began = time.monotonic()
    result: dict[str, Any] = {
        "plan": asdict(plan),
        "machine": machine(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "nice": os.nice(0),
    }
    settings = {
        "snapshot_every": plan.snapshot_every,
        # room for the probe, the load, and sessions opened again after an election
        "max_sessions": min(MAXIMA["max_sessions"], max(100_000, 2 * plan.sessions + 1_000)),
    }
    with contextlib.ExitStack() as stack:
        if keep is None:
            keep = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zbroker-snap-")))
        triad = BenchTriad(keep / "triad", fsync=True, lease=plan.lease, settings=settings)
        sampler = Sampler(triad, plan.abort_mb)
        fleets: list[Fleet] = []
        probe: Probe | None = None
        try:
            triad.local.start()
            beats = Beats(triad)
            first = triad.names[0]
            beats.wait(lambda: beats.role(first) == "primary", 60, f"{first} to be primary")
            sampler.start()
            endpoints = [triad.endpoint[n] for n in triad.names]
            fleets = [Fleet(triad.endpoint[first]) for _ in range(plan.fleets)]
            probe = Probe(endpoints, 0, plan.probes, "the probe")
            probe.expect("ready", 60)
            run_ = _Run(plan, triad, beats, sampler, Logs(triad), probe, say)
            phases: dict[str, Any] = {}
            result["phases"] = phases
            say(f"snapshot bench ({plan.name}): {plan.sessions} sessions, {plan.grants} grants")
            t0 = time.monotonic()
            term = beats.max_term
            built = _build(run_, fleets)
            phases["build"] = run_.phase("build", t0, built | {"term_before": term})
            t0, term = time.monotonic(), beats.max_term
            extra: dict[str, Any] = {"term_before": term}
            try:
                run_.whole(plan.phase_timeout)
            except TimeoutError as exc:
                extra["timed_out"] = str(exc)
            phases["settle"] = run_.phase("settle", t0, extra)
            say(f"compaction: a delta load until every node compacted {plan.compactions} times")
            t0, term = time.monotonic(), beats.max_term
            phases["compaction"] = run_.phase(
                "compaction", t0, _compaction(run_, endpoints) | {"term_before": term}
            )
            say("catch-up: the lowest-ranked backup killed, wiped and started again")
            t0, term = time.monotonic(), beats.max_term
            phases["catch_up"] = run_.phase("catch_up", t0, _catch_up(run_) | {"term_before": term})
        except BaseException as exc:  # the figures so far are written all the same
            result["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            sampler.stop()
            for child in [*fleets, *([probe] if probe else [])]:
                child.close()
            triad.close()
            result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
            result["seconds"] = round(time.monotonic() - began, 1)
            if out is not None:
                out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _line(p: dict[str, Any]) -> str:
    lat = p["probe"]["checkout_latency"]
    return (
        f"{p['seconds']:.1f} s, probe {lat['n']} checkouts p50/p99/max "
        f"{lat['p50_ms']}/{lat['p99_ms']}/{lat['max_ms']} ms, slowest gap "
        f"{p['probe']['slowest_gap_ms']} ms, elections {p['elections']}"
    )


def render(r: dict[str, Any]) -> str:
    """The printed table, from the JSON ``run`` returns."""
    m, plan = r["machine"], r["plan"]
    lines = [
        f"zbroker snapshot bench ({plan['name']}) in {r['seconds']} s: {m['nproc']} x {m['cpu']}, "
        f"Python {m['python']}; load average {r['loadavg_start'][0]} -> {r['loadavg_end'][0]}",
        f"{plan['sessions']} sessions, {plan['grants']} grants asked; snapshot_every "
        f"{plan['snapshot_every']}, lease {plan['lease']:.0f} s, fsync on",
    ]
    phases = r.get("phases", {})
    build = phases.get("build")
    if build:
        budget = " (--build-seconds)" if build.get("stopped_by_build_seconds") else ""
        lines.append(
            f"build: {build['sessions']} sessions in {build['open_s']} s "
            f"({build['opens_per_s']:.0f}/s), {build['grants']} grants in {build['grants_s']} s "
            f"({build['grants_per_s']}/s)"
            + ("" if build["reached"] else "  ** target not reached" + budget + " **")
        )
    lines += [
        "",
        f"  {'phase':<11}{'s':>8}{'checkouts':>10}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>9}"
        f"{'gap ms':>9}{'redir':>6}{'failed':>7}{'elect':>6}  compactions",
    ]
    for name, p in phases.items():
        pr, lat = p["probe"], p["probe"]["checkout_latency"]
        comp = "/".join(str(n["compactions"]) for n in p["nodes"].values())
        lines.append(
            f"  {name:<11}{p['seconds']:>8.1f}{lat['n']:>10}{_f(lat['p50_ms']):>8}"
            f"{_f(lat['p99_ms']):>8}{_f(lat['max_ms']):>9}{pr['slowest_gap_ms']:>9.0f}"
            f"{pr['redirected']:>6}{pr['failed']:>7}{_f(p['elections'], '{}'):>6}  {comp}"
        )
    names = list(next(iter(phases.values()))["nodes"]) if phases else []
    lines += ["", f"  {'RSS MB, peak / final':<20}" + "".join(f"{n:>16}" for n in names)]
    for name, p in phases.items():
        cells = "".join(
            f"{_f(n['rss_peak_mb']):>7} / {_f(n['rss_final_mb']):<6}" for n in p["nodes"].values()
        )
        lines.append(f"  {name:<20}{cells}")
    lines += ["", f"  {'taker RSS MB, peak':<20}" + "".join(f"{n:>16}" for n in names)]
    for name, p in phases.items():
        cells = "".join(f"{_f(n['taker_rss_peak_mb']):>16}" for n in p["nodes"].values())
        lines.append(f"  {name:<20}{cells}")
    cu = phases.get("catch_up")
    if cu:
        lines.append(
            f"\ncatch-up of {cu['node']} (wiped): caught up "
            f"{_f(cu.get('caught_up_s'), '{:.2f}')} s "
            f"after its start (snapshot file at {_f(cu.get('snapshot_installed_s'), '{:.2f}')} s,"
            f" its ledger installed at {_f(cu.get('ledger_installed_s'), '{:.2f}')} s),"
            f" RSS peak {_f(cu.get('rss_peak_mb'), '{:.1f}')} MB"
        )
        if cu.get("killed_rss_mb") is not None:
            lines.append(
                f"  ** killed {cu['killed_at_s']} s after its start, RSS {cu['killed_rss_mb']} MB "
                f"past the abort limit of {plan['abort_mb']} MB **"
            )
        if cu.get("timed_out"):
            lines.append(f"  ** {cu['timed_out']} **")
    for name, p in phases.items():
        killed = [n for n, got in p["nodes"].items() if got.get("killed_past_mb") is not None]
        if killed:
            lines.append(f"  ** {name}: {', '.join(killed)} killed past {plan['abort_mb']} MB **")
    if r.get("error"):
        lines.append(f"\n** the run stopped: {r['error']} **")
    return "\n".join(lines)


def _f(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)
