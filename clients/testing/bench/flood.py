"""The flood phase: status requests that are never read, against a primary holding many grants.

SPEC 7: "a flood of 1,000 status requests from one connection that never reads: under
100 MB more memory on the node, no election, honest checkouts p99 under 50 ms".

On a fresh fsync triad a fleet (``fleet.py``) opens ``sessions`` sessions, checks out
``grants_per_session`` grants each (the ledger of the grants phase: 100,000 grants;
checkouts refused during an election, which compaction at this size can cause on a
busy machine, are made up for) and keeps heartbeating. Then windows of the same honest
load (``load.py``: ``flood_outstanding`` sessions checking out and in on the primary),
each a warm-up and a measured window: the first without a flood (the baseline), then
one per kind of flood, sent at the start of the measured window:

- ``summary``: ``{"op": "status"}``, which an earlier node answered with every holder;
- ``pages``: ``holders: true``, the first page of holders, the largest reply a status
  request can ask for; the node answers 16 of them per loop cycle and refuses the rest
  (``limit``);
- ``paced_pages``: the same requests, 8 every 2 ms, so that the node answers nearly
  all of them and the connection's send queue (256 replies) is what bounds them.

The flooder is one DEALER without a session key (plain TCP, as the bench's triads)
that never reads: RCVHWM 1 and a small kernel receive buffer, so that the replies back
up into the node rather than into the flooder. It opens one session first (the only
reply it reads), sends the ``flood_requests`` status requests at once, and then a
checkout of one seat of ``cad`` from its session: a node reads the requests of one
connection in order, so once ``cad`` shows that seat in use, the node has read the
whole flood (``drained_s``). The primary's RSS is sampled every 10 ms from just before
the flood to the end of the window; every node's term comes from its heartbeats before
and after. If the primary's RSS passes ``flood_abort_mb`` the phase kills it, to spare
the machine, and says so (the code before issue 10 needed that).
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from zbroker.clients.testing.bench.common import BENCH_FEATURE, frame, open_frame, reply_of, sample
from zbroker.clients.testing.bench.fleet import Fleet
from zbroker.clients.testing.bench.load import LoadPool
from zbroker.clients.testing.bench.triad import BenchTriad
from zbroker.clients.wire import encode_request

if TYPE_CHECKING:
    from zbroker.clients.testing.bench.plan import Plan

PAGES = {"op": "status", "holders": True}
# name: (request, burst, gap): all at once, or paced so that each loop cycle answers all it
# reads (the node answers at most 16 page requests a cycle and refuses the others)
KINDS: dict[str, tuple[dict[str, Any], int, float]] = {
    "summary": ({"op": "status"}, 0, 0.0),
    "pages": (PAGES, 0, 0.0),
    "paced_pages": (PAGES, 8, 0.002),
}
MARKER = "cad"  # the flooder's checkout that shows its whole flood was read
SAMPLE_EVERY = 0.01  # seconds between RSS samples of the primary


class Flooder:
    """One connection that sends status requests and never reads their replies."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 1)  # 0 would be no limit
        self.sock.setsockopt(zmq.RCVBUF, 4096)  # the kernel's buffer too: replies stay queued
        self.sock.setsockopt(zmq.SNDHWM, 1_000_000)
        self.sock.connect(endpoint)
        self.sid = uuid.uuid4().hex
        self.req = 1
        deadline = time.monotonic() + 30
        while True:  # the same request again after an election: it opens once
            self.sock.send(open_frame(self.sid, self.req, host="flooder"))
            if self.sock.poll(1_000) and reply_of(self.sock.recv()).get("status") == "ok":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the flooder could not open a session at {endpoint}")
            time.sleep(0.1)  # an election in progress: ask again shortly

    def flood(self, request: dict[str, Any], n: int, burst: int = 0, gap: float = 0.0) -> None:
        """``n`` copies of ``request`` (``burst`` at a time, ``gap`` seconds apart; 0: all at
        once), then the marker checkout."""
        for i in range(n):
            if burst and i and i % burst == 0:
                time.sleep(gap)  # pacing the flood over many of the node's loop cycles
            self.sock.send(encode_request({**request, "req": i + 1}))
        self.req += 1
        marker = frame(
            "checkout", self.sid, self.req, self.req, feature=MARKER, count=1, version=None
        )
        self.sock.send(marker)

    def close(self) -> None:
        self.sock.close(linger=0)


class RssWatch(threading.Thread):
    """Samples a process's RSS until stopped; kills it past ``abort_bytes``."""

    def __init__(self, pid: int, abort_bytes: int) -> None:
        super().__init__(name="bench-rss", daemon=True)
        self.pid, self.abort_bytes = pid, abort_bytes
        self.before = self.peak = sample(pid).rss
        self.aborted = False
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(SAMPLE_EVERY):
            try:
                rss = sample(self.pid).rss
            except OSError:
                return  # the process is gone
            self.peak = max(self.peak, rss)
            if rss > self.abort_bytes and not self.aborted:
                self.aborted = True
                os.kill(self.pid, signal.SIGKILL)

    def stop(self) -> dict[str, Any]:
        self.halt.set()
        self.join(5)
        return {
            "rss_before_mb": _mb(self.before),
            "rss_peak_mb": _mb(self.peak),
            "rss_extra_mb": _mb(self.peak - self.before),
            "killed_past_mb": _mb(self.abort_bytes) if self.aborted else None,
        }


def _mb(n: int) -> float:
    return round(n / 2**20, 1)


def _terms(triad: BenchTriad) -> dict[str, int | None]:
    triad.watch.pump(0.3)
    return {
        name: (triad.watch.latest[name][1].get("term") if name in triad.watch.latest else None)
        for name in triad.names
    }


def _in_use(triad: BenchTriad, name: str, feature: str) -> int:
    features = triad.status(name)[2].get("features", [])
    return sum(int(f.get("in_use", 0)) for f in features if f.get("name") == feature)


def _marker_seen(triad: BenchTriad, primary: str, want: int, deadline: float) -> float | None:
    """When the primary first showed ``want`` seats of MARKER in use; None if not by deadline."""
    while time.monotonic() < deadline:
        try:
            _, _, report = triad.status(primary, timeout=max(0.1, deadline - time.monotonic()))
        except (TimeoutError, RuntimeError):
            continue
        done = time.monotonic()
        cad: dict[str, Any] = next(
            (f for f in report.get("features", []) if f.get("name") == MARKER), {}
        )
        if int(cad.get("in_use", 0)) >= want:
            return done
        time.sleep(0.02)  # polling a condition until a deadline
    return None


def window(
    triad: BenchTriad,
    pool: LoadPool,
    primary: str,
    plan: Plan,
    flood: Callable[[], None] | None,
    marker: int,
) -> dict[str, Any]:
    """One window of honest load; ``flood`` (if any) runs at the start of the measured part."""
    pid = triad.pid(primary)
    got: dict[str, Any] = {}
    watch: list[RssWatch] = []

    def at_start(start: float) -> None:
        def run() -> None:
            time.sleep(max(0.0, start + plan.warmup - time.monotonic()))  # until the window
            rss = RssWatch(pid, plan.flood_abort_mb * 2**20)
            rss.start()
            watch.append(rss)
            if flood is None:
                return
            t0 = time.monotonic()
            flood()
            got["sent_s"] = round(time.monotonic() - t0, 4)
            seen = _marker_seen(triad, primary, marker, t0 + plan.duration + 10)
            got["drained_s"] = round(seen - t0, 3) if seen is not None else None

        thread = threading.Thread(target=run, name="bench-flood", daemon=True)
        thread.start()
        got["thread"] = thread

    terms_before = _terms(triad)
    honest = pool.run(
        triad.endpoint[primary], plan.flood_outstanding, plan.warmup, plan.duration, None, at_start
    )
    got.pop("thread").join(plan.duration + 30)
    memory = watch[0].stop() if watch else {}
    terms_after = _terms(triad)
    before = [t for t in terms_before.values() if t is not None]
    after = [t for t in terms_after.values() if t is not None]
    return {
        **got,
        **memory,
        "terms_before": terms_before,
        "terms_after": terms_after,
        "elections": (max(after) - max(before)) if before and after else None,
        "honest": honest.to_json(),
    }


def run_flood(plan: Plan, base: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """The phase (see the module docstring): the baseline window, then one per kind."""
    out: dict[str, Any] = {
        "sessions": plan.sessions,
        "requests": plan.flood_requests,
        "honest_outstanding": plan.flood_outstanding,
    }
    with BenchTriad(base / "flood", fsync=True) as triad:
        triad.wait_whole(30)  # the first-ranked node serves: no failback to come
        primary = triad.wait_serving(30)
        crowd = Fleet(triad.endpoint[primary])
        pool = LoadPool(plan.procs)
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            crowd.open(plan.sessions, plan.window, 600)
            crowd.beat()
            crowd.grants(plan.grants_per_session, plan.window, 1800)
            target = plan.sessions * plan.grants_per_session
            for _ in range(3):  # checkouts refused during an election are made up for
                triad.wait_whole(60)
                primary = triad.wait_serving(60)
                out["grants"] = _in_use(triad, primary, BENCH_FEATURE)
                if out["grants"] >= target:
                    break
                crowd.grants(1, plan.window, 1800)
            _, paged, pages, _ = triad.holders(primary)
            out["reply_bytes"] = {"summary": triad.status(primary)[1], "page": paged // pages}
            say(
                f"  {out['grants']} grants on {primary}; a status reply is "
                f"{out['reply_bytes']['summary']} bytes, a page of holders "
                f"{out['reply_bytes']['page']} bytes on average"
            )
            out["baseline"] = window(triad, pool, primary, plan, None, 0)
            say(f"  no flood:        {_line(out['baseline'])}")
            for marker, (kind, (request, burst, gap)) in enumerate(KINDS.items(), start=1):
                flooder = Flooder(ctx, triad.endpoint[primary])
                try:
                    flood = functools.partial(
                        flooder.flood, request, plan.flood_requests, burst, gap
                    )
                    got = window(triad, pool, primary, plan, flood, marker)
                finally:
                    flooder.close()
                out[kind] = got
                say(f"  {kind + ' flood:':<16} {_line(got)}")
                if got.get("killed_past_mb") is not None or not triad.local.alive(primary):
                    break
                try:
                    primary = triad.wait_serving(60)
                except TimeoutError as exc:  # the flood cost the service: say so, stop here
                    got["after"] = str(exc)
                    say(f"  after the {kind} flood: {exc}")
                    break
        finally:
            ctx.destroy(linger=0)
            pool.close()
            crowd.close()
    return out


def _line(w: dict[str, Any]) -> str:
    lat = w["honest"]["checkout_latency"]
    drained = w.get("drained_s")
    flood = f", flood read in {drained} s" if drained is not None else ""
    killed = f", KILLED past {w['killed_past_mb']} MB" if w.get("killed_past_mb") else ""
    return (
        f"RSS +{w.get('rss_extra_mb')} MB (peak {w.get('rss_peak_mb')} MB), honest checkout "
        f"p50/p99/max {lat['p50_ms']}/{lat['p99_ms']}/{lat['max_ms']} ms, "
        f"elections {w['elections']}{flood}{killed}"
    )
