"""One bench run: every figure of SPEC section 7 beside its baseline, in one JSON.

Phases, in order (each says what it measures in the JSON it writes):

1. ``throughput``: an echo server and one triad per fsync setting run side by side;
   for each concurrency level the same load processes drive the echo, then each
   triad (level by level, so a baseline is never more than seconds older than its
   triad figure). Figures: checkout+checkin pairs a second, checkout latency, the CPU
   each process (servers, load) spent per request, and for each triad the pairs a
   second that CPU would allow with every core busy (``cpu_bound``: a ceiling). With
   ``Plan.compiled``, ``triad_compiled`` is the fsync triad again, its nodes running a
   compiled build of the cores (``compiled.py``). With ``Plan.floor``, the replication
   floor (``floor.py``: a triad's processes, hops and syncs without its decisions) is
   measured beside the echo, and each triad is also set against it (``vs_floor``).
2. ``failover``: on the fsync triad, ``kills`` times: SIGKILL the primary, time the
   first grant by the new primary as a prober sees it, restart the killed node and
   wait until the triad is whole and the failback done.
3. ``sessions``: a fresh triad; its idle CPU; then ``sessions`` sessions heartbeating
   at the default interval: CPU and RSS of each node over a window.
4. ``grants``: the same sessions check out ``grants_per_session`` grants each: RSS of
   each node, time of a status query on the primary, time for a killed backup to
   catch up after a restart (with its disk, and with its disk wiped: a snapshot).
5. ``storm``: a fresh triad and ``storm_clients`` clients (``storm.py``), each with its
   own connections and session, holding grants. SIGKILL of the primary, and every
   client checks out once more at once, failing over with the client library's
   policy: time from the kill until each is served. Baselines: the same burst on the
   healthy triad, and the same clients starting from nothing (connect, open, checkout).
6. ``flood``: a fresh triad whose primary holds the grants of phase 4; honest load on
   it, alone and then beside ``flood_requests`` status requests from one connection
   that never reads (``flood.py``): the primary's extra RSS, the honest checkouts'
   latency, and the terms before and after (an election raises them).

``Plan.phases`` picks phases (3 and 4 are one phase, ``fleet``). Ratios are computed only
between figures of the same run.
"""

from __future__ import annotations

import datetime
import os
import platform
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgpack
import zmq

from zbroker.broker.demo import free_ports
from zbroker.clients.testing.bench import echo, floor
from zbroker.clients.testing.bench.common import (
    BENCH_FEATURE,
    ProcSample,
    children,
    cpu_percent,
    ratio,
    sample,
)
from zbroker.clients.testing.bench.compiled import check_tree
from zbroker.clients.testing.bench.failover import Prober
from zbroker.clients.testing.bench.fleet import Fleet
from zbroker.clients.testing.bench.flood import run_flood
from zbroker.clients.testing.bench.load import LevelResult, LoadPool
from zbroker.clients.testing.bench.plan import Plan
from zbroker.clients.testing.bench.storm import Storm, raise_fd_limit
from zbroker.clients.testing.bench.triad import BenchTriad

Say = Callable[[str], None]


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(str(p) for p in msgpack.version),
        "platform": platform.platform(),
    }


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- phase 1


def throughput(plan: Plan, base: Path, pool: LoadPool, say: Say) -> dict[str, Any]:
    compiled = None if plan.compiled is None else check_tree(Path(plan.compiled))
    tree = None if compiled is None else Path(compiled["dir"])
    settings: list[tuple[str, bool, bool, Path | None]] = [("triad", True, False, None)]
    settings += [("triad_compiled", True, False, tree)] if tree is not None else []
    settings += [("triad_nofsync", False, False, None)] if plan.fsync_off else []
    settings += [("triad_curve", True, True, None)] if plan.curve else []
    echoes = ["echo"] + (["echo_tuned"] if plan.tuned_echo else [])
    baselines = [*echoes, *(["floor"] if plan.floor else [])]
    ports = free_ports(len(baselines) + (3 if plan.floor else 0))  # the floor's peers: 3 more
    endpoints = [f"tcp://127.0.0.1:{port}" for port in ports]
    endpoint_of = dict(zip(baselines, endpoints, strict=False))
    procs = {name: [echo.start(endpoint_of[name], tuned=name == "echo_tuned")] for name in echoes}
    servers_of = {name: {name: procs[name][0].pid or 0} for name in echoes}
    if plan.floor:
        procs["floor"] = floor.start(endpoint_of["floor"], endpoints[-3:], base / "floor")
        pids = [p.pid or 0 for p in procs["floor"]]
        servers_of["floor"] = dict(zip(floor.NAMES, pids, strict=True))
    loaders = {f"load{i}": c.proc.pid or 0 for i, c in enumerate(pool.children)}
    triads = {
        name: BenchTriad(base / name, fsync=fsync, secure=secure, code=code)
        for name, fsync, secure, code in settings
    }
    # what is set against the echo: the floor (floor.py), then each triad
    compared = [*(["floor"] if plan.floor else []), *triads]
    levels: dict[str, dict[str, LevelResult]] = {t: {} for t in [*echoes, *compared]}
    cpu: dict[str, dict[str, dict[str, float]]] = {t: {} for t in levels}
    try:
        for triad in triads.values():
            triad.local.start()
        for triad in triads.values():
            triad.wait_serving(30)
            triad.check_compiled()
        for c in plan.levels:
            for target in levels:
                key = None
                if target in triads:
                    triad = triads[target]
                    primary = triad.wait_serving(30)
                    endpoint, key = triad.endpoint[primary], triad.server_key.get(primary)
                    servers = {n: triad.pid(n) for n in triad.names}
                else:
                    endpoint, servers = endpoint_of[target], servers_of[target]
                is_triad = target in triads
                before = _samples(_watched(servers, loaders, takers=is_triad))
                got = pool.run(endpoint, c, plan.warmup, plan.duration, server_key=key)
                levels[target][str(c)] = got
                after = _samples(_watched(servers, loaders, takers=is_triad))
                # the warm-up's requests spent CPU too: counted at the measured rate
                requests = got.answered * (plan.warmup + plan.duration) / plan.duration
                cpu[target][str(c)] = _cpu_us(before, after, requests, triad=is_triad)
                say(
                    f"  {target:<14} {c:>3} outstanding: {got.pairs_per_s:>9.0f} pairs/s, "
                    f"checkout p50 {got.latency['p50_ms']} ms"
                )
    finally:
        for proc in (p for ps in procs.values() for p in ps):
            proc.terminate()
            proc.join(5)
        for triad in triads.values():
            triad.close()
    out: dict[str, Any] = {
        "levels": {t: {c: r.to_json() for c, r in by.items()} for t, by in levels.items()},
        "ratios": {},
        "latency": {},
        "cpu_us_per_request": cpu,
        "cpu_bound": {},
    }
    if compiled is not None:
        out["compiled"] = compiled  # the tree triad_compiled's nodes ran, and its cores
    for target in compared:
        out["ratios"][target] = {
            f"vs_{e}": {
                c: ratio(levels[target][c].pairs_per_s, levels[e][c].pairs_per_s) for c in levels[e]
            }
            for e in [*echoes, *(["floor"] if plan.floor and target in triads else [])]
        }
    low, high = str(plan.levels[0]), str(plan.levels[-1])
    cores = os.cpu_count() or 1
    for target in compared:
        # The most pairs/s the machine's cores could carry at this CPU per request (the
        # nodes' and the load's), all busy and nothing waiting: a ceiling, not a forecast.
        spent = sum(cpu[target][high].values())
        bound = cores * 1e6 / spent / 2 if spent > 0 else None
        echo_pairs = levels["echo"][high].pairs_per_s
        out["cpu_bound"][target] = {
            "concurrency": int(high),
            "pairs_per_s": None if bound is None else round(bound),
            "vs_echo": None if bound is None else ratio(bound, echo_pairs),
        }
    keys = ("p50_ms", "p99_ms", "max_ms")
    for target in compared:
        out["latency"][target] = {}
        for load, level in (("low", low), ("high", high)):
            mine, base_ = levels[target][level].latency, levels["echo"][level].latency
            out["latency"][target][load] = {
                "concurrency": int(level),
                "triad_ms": {k: mine[k] for k in keys},
                "echo_ms": {k: base_[k] for k in keys},
                "ratio": {k: ratio(mine[k], base_[k]) for k in keys},
            }
            if plan.floor and target in triads:
                floor_ = levels["floor"][level].latency
                out["latency"][target][load]["vs_floor"] = {
                    k: ratio(mine[k], floor_[k]) for k in keys
                }
    return out


# --- phase 2


def failover(plan: Plan, base: Path, say: Say) -> dict[str, Any]:
    trials: list[dict[str, Any]] = []
    with BenchTriad(base / "failover", fsync=True) as triad:
        triad.wait_serving(30)
        prober = Prober([triad.endpoint[n] for n in triad.names])
        try:
            for trial in range(plan.kills):
                primary = triad.wait_serving(30)
                pid = triad.pid(primary)
                t_kill = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                triad.local.procs[primary].wait(10)
                took, node = prober.first_grant_after(
                    t_kill, triad.names.index(primary), timeout=20
                )
                trials.append(
                    {"killed": primary, "new_primary": triad.names[node], "seconds": round(took, 4)}
                )
                say(f"  kill {trial + 1}: {primary} -> {triad.names[node]} in {took * 1000:.0f} ms")
                triad.local.start(primary)
                triad.wait_whole(30)
        finally:
            prober.close()
    times = [t["seconds"] for t in trials]
    return {
        "kills": len(trials),
        "p50_s": round(statistics.median(times), 4) if times else None,
        "max_s": round(max(times), 4) if times else None,
        "min_s": round(min(times), 4) if times else None,
        "trials": trials,
    }


# --- phases 3 and 4


def fleet(plan: Plan, base: Path, say: Say) -> dict[str, Any]:
    sessions: dict[str, Any] = {"sessions": plan.sessions}
    grants: dict[str, Any] = {"sessions": plan.sessions}
    with BenchTriad(base / "fleet", fsync=True) as triad:
        primary = triad.wait_serving(30)
        roles = {n: ("primary" if n == primary else "backup") for n in triad.names}
        before = triad.samples()
        time.sleep(plan.idle_window)  # measuring the idle triad's CPU over this window
        after = triad.samples()
        sessions["idle"] = _usage(roles, before, after)
        crowd = Fleet(triad.endpoint[primary])
        try:
            sessions["open_s"] = round(crowd.open(plan.sessions, plan.window, 600), 3)
            crowd.beat()
            time.sleep(min(1.0, plan.beat_window))  # let the heartbeats reach their rate
            before = triad.samples()
            counts0 = crowd.report()
            time.sleep(plan.beat_window)  # the measured window
            after = triad.samples()
            counts1 = crowd.report()
            beats = counts1.get("heartbeat_ok", 0) - counts0.get("heartbeat_ok", 0)
            sessions["heartbeats_per_s"] = round(beats / (after[primary].at - before[primary].at))
            sessions["heartbeat_interval_s"] = counts1.get("heartbeat_interval_ms", 0) / 1000
            sessions["beating"] = _usage(roles, before, after)
            interval = sessions["heartbeat_interval_s"] or 10.0
            sessions["echo_cpu_percent"] = _echo_beating(plan, interval)
            sessions["primary_vs_echo_cpu"] = ratio(
                sessions["beating"][primary]["cpu_percent"], sessions["echo_cpu_percent"]
            )
            mine = sessions["beating"][primary]
            say(
                f"  {plan.sessions} sessions heartbeating: primary CPU {mine['cpu_percent']} % "
                f"(echo at the same rate {sessions['echo_cpu_percent']} %), "
                f"RSS {mine['rss_mb']} MB"
            )
            got, secs, latency = crowd.grants(plan.grants_per_session, plan.window, 1800)
            grants["grants"] = got
            grants["checkout_s"] = round(secs, 3)
            grants["checkouts_per_s"] = round(got / secs, 1) if secs else None
            # every node snapshots its ledger every snapshot_every (10,000) deltas, in its loop
            grants["checkout_latency"] = latency
            now = triad.samples()
            grants["rss_mb"] = {n: round(s.rss / 2**20, 1) for n, s in now.items()}
            grants["rss_mb_roles"] = roles
            took = []
            for _ in range(3):
                seconds, size, _ = triad.status(primary)
                took.append(seconds)
            paged, paged_bytes, pages, holders = triad.holders(primary)
            grants["status"] = {
                "seconds_median": round(statistics.median(took), 4),
                "seconds": [round(t, 4) for t in took],
                "reply_bytes": size,
                "holders": len(holders),
                "holders_seconds": round(paged, 3),
                "holders_pages": pages,
                "holders_bytes": paged_bytes,
            }
            say(
                f"  {got} grants: primary RSS {grants['rss_mb'][primary]} MB, status "
                f"{grants['status']['seconds_median'] * 1000:.1f} ms ({size} bytes); every "
                f"holder in {pages} pages, {paged:.2f} s ({paged_bytes / 1e6:.1f} MB)"
            )
            # the lowest-ranked backup: a higher one would take control back (failback)
            backup = next(n for n in reversed(triad.names) if n != primary)
            grants["catch_up"] = _catch_up(triad, crowd, primary, backup, plan, wipe=False)
            say(f"  {backup} restarted: caught up in {grants['catch_up']['seconds']} s")
            if plan.wipe:
                grants["catch_up_wiped"] = _catch_up(triad, crowd, primary, backup, plan, True)
                say(
                    f"  {backup} wiped and restarted: caught up in "
                    f"{grants['catch_up_wiped']['seconds']} s"
                )
            grants["fleet_counts"] = crowd.report()
        finally:
            crowd.close()
    return {"sessions": sessions, "grants": grants}


def _echo_beating(plan: Plan, interval: float) -> float:
    """CPU % of the echo answering the same heartbeats (same sessions, same interval)."""
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    proc = echo.start(endpoint)
    crowd = Fleet(endpoint)
    try:
        crowd.open(plan.sessions, plan.window, 600)
        crowd.beat(interval)
        time.sleep(min(1.0, plan.beat_window))  # let the heartbeats reach their rate
        if proc.pid is None:
            raise RuntimeError("the echo process has no pid")
        before = sample(proc.pid)
        time.sleep(plan.beat_window)  # the measured window
        return cpu_percent(before, sample(proc.pid))
    finally:
        crowd.close()
        proc.terminate()
        proc.join(5)


def _usage(roles: dict[str, str], before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {
            "role": roles[name],
            "cpu_percent": cpu_percent(before[name], after[name]),
            "rss_mb": round(after[name].rss / 2**20, 1),
        }
        for name in after
        if name in before
    }


def _catch_up(
    triad: BenchTriad, crowd: Fleet, primary: str, backup: str, plan: Plan, wipe: bool
) -> dict[str, Any]:
    """Kill ``backup``, add deltas while it is down, restart it: time until it holds them."""
    triad.local.kill(backup)
    if wipe:
        triad.local.wipe(backup)
    # while it is down, work goes on: one more grant per session (a delta each)
    missed = crowd.grants(1, plan.window, 600)[0] if not wipe else 0
    watch = triad.watch
    watch.wait(lambda w: w.fresh(primary) is not None, 5, "a heartbeat of the primary")
    target = int(watch.latest[primary][1]["commit"])
    started = time.monotonic()
    triad.local.start(backup)

    def caught_up(w: Any) -> bool:
        at, hb = w.latest.get(backup, (0.0, {}))
        # a heartbeat of the new process (the killed one's may still be in flight)
        fresh = at > started and hb.get("role") in ("backup", "primary")
        return fresh and int(hb.get("commit", 0)) >= target

    done = watch.wait(caught_up, 120, f"{backup} to catch up")
    return {
        "seconds": round(done - started, 3),
        "deltas_missed": missed,
        "commit": target,
        "wiped": wipe,
        "resolution_s": 0.1,  # heartbeats show the backup's commit every heartbeat_interval
    }


# --- phase 5


def storm(plan: Plan, base: Path, say: Say) -> dict[str, Any]:
    # before the nodes and the client processes start: they inherit the limit
    fds = raise_fd_limit(plan.storm_clients, plan.storm_procs)
    with BenchTriad(base / "storm", fsync=True) as triad:
        primary = triad.wait_serving(30)
        crowd = Storm(
            tuple(triad.endpoint[n] for n in triad.names), plan.storm_clients, plan.storm_procs
        )
        try:
            # what each wave costs the survivors and the clients, in CPU
            pids = {n: triad.pid(n) for n in triad.names}
            pids |= {f"clients{k}": pid for k, pid in enumerate(crowd.pids())}
            survivors = {n: pid for n, pid in pids.items() if n != primary}
            cold = crowd.wave(time.monotonic())
            say(f"  {plan.storm_clients} clients started: {_served_line(cold)}")
            triad.wait_serving(30)
            before = _samples(pids)
            warm = crowd.wave(time.monotonic())
            warm_cpu = _cpu_ms(before, _samples(pids))
            say(f"  the same burst, healthy triad: {_served_line(warm)}")
            triad.wait_serving(30)
            pre = crowd.check()
            before = _samples(pids)
            t_kill = time.monotonic()
            os.kill(triad.pid(primary), signal.SIGKILL)
            # the burst starts once the primary is gone: no client can reach it any more
            triad.local.procs[primary].wait(10)
            reaped = time.monotonic() - t_kill
            stormed = crowd.wave(t_kill, dead=triad.endpoint[primary])
            storm_cpu = _cpu_ms(before, _samples(survivors))
            new = triad.wait_serving(30)
            say(f"  SIGKILL of {primary}, {new} primary: {_served_line(stormed)}")
            post = crowd.check()
        finally:
            crowd.close()
        listed = {h["grant"] for h in triad.holders(new, BENCH_FEATURE)[3]}
    before_kill = set(pre["grant_ids"])
    keys = ("p50_ms", "p99_ms", "max_ms")
    return {
        "clients": plan.storm_clients,
        "procs": len(crowd.children),
        "killed": primary,
        "new_primary": new,
        "reaped_ms": round(reaped * 1000, 1),
        "fd_limit": fds,
        "storm": stormed,
        "baseline_warm": warm,
        "baseline_cold": cold,
        "ratio_vs_warm": {
            k: ratio(stormed["time_to_served"][k], warm["time_to_served"][k]) for k in keys
        },
        "ratio_vs_cold": {
            k: ratio(stormed["time_to_served"][k], cold["time_to_served"][k]) for k in keys
        },
        "cpu_ms": {"storm": storm_cpu, "warm": warm_cpu},
        "sessions_kept": post["sessions_kept"],
        "pre_kill_grants": len(before_kill),
        "pre_kill_grants_held": len(before_kill & set(post["grant_ids"])),
        "pre_kill_grants_listed": len(before_kill & listed),
        "holders_after": len(listed),
        "grants_reported_unsafe_or_lost": dict(post["reported"]),
        "all_served_within_1s": stormed["served_within_1s"] == plan.storm_clients,
    }


def _served_line(wave: dict[str, Any]) -> str:
    t = wave["time_to_served"]
    return (
        f"{wave['served_within_1s']}/{wave['clients']} served within 1 s, "
        f"p50 {t['p50_ms']} ms, max {t['max_ms']} ms"
    )


def _samples(pids: dict[str, int]) -> dict[str, ProcSample]:
    return {name: sample(pid) for name, pid in pids.items()}


def _watched(servers: dict[str, int], loaders: dict[str, int], *, takers: bool) -> dict[str, int]:
    """The processes whose CPU a level counts: the servers, the load processes and, for a
    triad, its snapshot takers (each node's child process, ``taker<pid>``), which start
    at a node's first snapshot, in whichever level that falls."""
    watched = {**servers, **loaders}
    if takers:
        watched |= {f"taker{pid}": pid for node in servers.values() for pid in children(node)}
    return watched


def _cpu_us(
    before: dict[str, ProcSample], after: dict[str, ProcSample], requests: float, *, triad: bool
) -> dict[str, float]:
    """µs of CPU each process spent per request between the samples; the load processes
    (``load0``, ``load1``, ...) as one, ``load``; a triad's snapshot takers as one,
    ``takers`` (one started between the samples spent all of its CPU within them)."""
    out = {
        n: (after[n].cpu - (before[n].cpu if n in before else 0.0)) * 1e6 / max(requests, 1.0)
        for n in after
    }
    _as_one(out, "load", "load")
    if triad:
        _as_one(out, "taker", "takers")
    return {n: round(v, 1) for n, v in out.items()}


def _as_one(figures: dict[str, Any], prefix: str, name: str) -> None:
    """Replace the figures of the processes named ``prefix...`` by their sum, as ``name``."""
    figures[name] = sum(figures.pop(n) for n in [n for n in figures if n.startswith(prefix)])


def _cpu_ms(before: dict[str, ProcSample], after: dict[str, ProcSample]) -> dict[str, int]:
    """CPU ms each process used between the samples (clock ticks: 10 ms), and the wall ms."""
    out = {n: round((after[n].cpu - before[n].cpu) * 1000) for n in before if n in after}
    _as_one(out, "clients", "clients")
    wall = [after[n].at - before[n].at for n in before if n in after]
    out["wall"] = round(max(wall) * 1000) if wall else 0
    return out


# --- the run


def run(plan: Plan, out: Path | None, say: Say = print) -> dict[str, Any]:
    """Run every phase of ``plan``; writes the JSON to ``out`` (when given) and returns it."""
    started = time.monotonic()
    result: dict[str, Any] = {
        "plan": asdict(plan),
        "machine": machine(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_start": _loadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="zbroker-bench-") as tmp:
        base = Path(tmp)
        if "throughput" in plan.phases:
            say(f"bench ({plan.name}): throughput and latency, triad against echo")
            pool = LoadPool(plan.procs)
            try:
                result["throughput"] = throughput(plan, base, pool, say)
            finally:
                pool.close()
        if "failover" in plan.phases:
            say(f"bench ({plan.name}): failover, {plan.kills} kills of the primary")
            result["failover"] = failover(plan, base, say)
        if "fleet" in plan.phases:
            say(f"bench ({plan.name}): {plan.sessions} sessions, then their grants")
            result.update(fleet(plan, base, say))
        if "storm" in plan.phases:
            say(f"bench ({plan.name}): reconnect storm, {plan.storm_clients} clients")
            result["storm"] = storm(plan, base, say)
        if "flood" in plan.phases:
            say(
                f"bench ({plan.name}): {plan.flood_requests} status requests never read, "
                f"{plan.sessions * plan.grants_per_session} grants"
            )
            result["flood"] = run_flood(plan, base, say)
    result["loadavg_end"] = _loadavg()
    result["seconds"] = round(time.monotonic() - started, 1)
    if out is not None:
        import json

        out.write_text(json.dumps(result, indent=2) + "\n")
    return result
