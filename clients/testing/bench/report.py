"""The bench's printed table, from the JSON ``runner.run`` returns (and nothing else)."""

from __future__ import annotations

from typing import Any


def _f(value: Any, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _lat(d: dict[str, Any]) -> str:
    return "/".join(_f(d[k], "{:.2f}") for k in ("p50_ms", "p99_ms", "max_ms"))


def render(r: dict[str, Any]) -> str:
    """The table of every phase the run has (``Plan.phases`` may have skipped some)."""
    m = r["machine"]
    lines = [
        f"zbroker bench ({r['plan']['name']}) in {r['seconds']} s: {m['nproc']} x {m['cpu']}, "
        f"Python {m['python']}, pyzmq {m['pyzmq']}, libzmq {m['libzmq']}; load average "
        f"{r['loadavg_start'][0]} -> {r['loadavg_end'][0]}",
        "Every ratio is between figures of this run.",
    ]
    for key, section in (
        ("throughput", _throughput),
        ("failover", _failover),
        ("sessions", _sessions),
        ("grants", _grants),
        ("storm", _storm),
        ("flood", _flood),
    ):
        if key in r:
            lines += ["", *section(r[key])]
    return "\n".join(lines)


def _throughput(tp: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    echoes = [t for t in tp["levels"] if t.startswith("echo")]
    triads = [t for t in tp["levels"] if t not in echoes]  # and the floor, if measured
    columns = {"vs_echo": "ratio", "vs_echo_tuned": "tuned", "vs_floor": "floor"}
    head = "".join(f"{e:>11}" for e in echoes)
    head += "".join(
        f"{t:>15}" + "".join(f" {columns[k]:>6}" for k in tp["ratios"][t]) for t in triads
    )
    lines += [
        "Throughput, checkout+checkin pairs/s (triad: each answered after quorum commit;",
        "ratio: / echo; tuned: / echo_tuned; floor: triad / floor, the replication floor:",
        "a triad's processes, hops and syncs without its decisions)",
        f"  {'outstanding':>11}{head}",
    ]
    for c in tp["levels"]["echo"]:
        row = "".join(f"{tp['levels'][e][c]['pairs_per_s']:>11.0f}" for e in echoes)
        for t in triads:
            row += f"{tp['levels'][t][c]['pairs_per_s']:>15.0f}"
            row += "".join(f" {_f(by[c], '{:.2f}'):>6}" for by in tp["ratios"][t].values())
        lines.append(f"  {c:>11}{row}")
    high = list(tp["levels"]["echo"])[-1]
    lines += ["", f"CPU per request at {high} outstanding, µs (user + system, each process)"]
    for t in [*echoes, *triads]:
        spent = tp["cpu_us_per_request"][t][high]
        each = ", ".join(f"{n} {v:.1f}" for n, v in spent.items())
        line = f"  {t:<14} {each} = {sum(spent.values()):.1f}"
        bound = tp["cpu_bound"].get(t)
        if bound is not None and bound["pairs_per_s"] is not None:
            line += (
                f"; every core busy at that: {bound['pairs_per_s']} pairs/s,"
                f" {_f(bound['vs_echo'], '{:.2f}')} of the echo"
            )
        lines.append(line)
    lines += ["", "Checkout latency, ms p50/p99/max (ratio: triad / echo; floor: triad / floor)"]
    for t in triads:
        for load, d in tp["latency"][t].items():
            line = (
                f"  {t:<14} {load:<4} ({d['concurrency']:>2} out): triad {_lat(d['triad_ms']):<20}"
                f" echo {_lat(d['echo_ms']):<18} ratio {_ratios(d['ratio'])}"
            )
            if "vs_floor" in d:
                line += f" floor {_ratios(d['vs_floor'])}"
            lines.append(line)
    return lines


def _ratios(d: dict[str, float | None]) -> str:
    return "/".join(_f(d[k], "{:.1f}") for k in ("p50_ms", "p99_ms", "max_ms"))


def _failover(fo: dict[str, Any]) -> list[str]:
    return [
        f"Failover, SIGKILL of the primary -> first grant by the new primary seen by a client "
        f"({fo['kills']} kills)",
        f"  p50 {_ms(fo['p50_s'])} ms, max {_ms(fo['max_s'])} ms, min {_ms(fo['min_s'])} ms"
        "  (targets: p50 < 500 ms, max < 1000 ms)",
    ]


def _sessions(s: dict[str, Any]) -> list[str]:
    lines = [
        f"{s['sessions']} sessions heartbeating every {s['heartbeat_interval_s']} s "
        f"({s['heartbeats_per_s']} heartbeats/s; opened in {s['open_s']} s); the echo "
        f"answering the same heartbeats: {s['echo_cpu_percent']} % CPU "
        f"(primary / echo: {_f(s['primary_vs_echo_cpu'], '{:.1f}')})",
        f"  {'node':<8} {'role':<8} {'idle CPU %':>10} {'CPU %':>7} {'RSS MB':>8}",
    ]
    for name, u in s["beating"].items():
        idle = s["idle"].get(name, {}).get("cpu_percent")
        lines.append(
            f"  {name:<8} {u['role']:<8} {_f(idle, '{:.1f}'):>10} {u['cpu_percent']:>7.1f} "
            f"{u['rss_mb']:>8.1f}"
        )
    return lines


def _grants(g: dict[str, Any]) -> list[str]:
    st = g["status"]
    lines = [
        f"{g['grants']} live grants across {g['sessions']} sessions "
        f"(checked out at {g['checkouts_per_s']}/s)",
        "  checkout latency meanwhile (each node snapshots every 10,000 deltas): "
        f"{_lat(g['checkout_latency'])} ms p50/p99/max",
        "  RSS MB: "
        + ", ".join(f"{n} ({g['rss_mb_roles'][n]}) {v}" for n, v in g["rss_mb"].items()),
        f"  status query on the primary: {st['seconds_median'] * 1000:.1f} ms median "
        f"({st['reply_bytes']} bytes: a summary); every holder ({st['holders']}) in "
        f"{st['holders_pages']} pages: {st['holders_seconds']} s, "
        f"{st['holders_bytes'] / 1e6:.1f} MB",
        f"  restarted backup caught up in {g['catch_up']['seconds']} s "
        f"({g['catch_up']['deltas_missed']} deltas missed while down; heartbeat resolution 0.1 s)",
    ]
    if "catch_up_wiped" in g:
        lines.append(
            f"  wiped backup caught up in {g['catch_up_wiped']['seconds']} s (from a snapshot)"
        )
    return lines


def _storm(st: dict[str, Any]) -> list[str]:
    s, warm, cold = st["storm"], st["baseline_warm"], st["baseline_cold"]
    n = st["clients"]

    def wave(w: dict[str, Any]) -> str:
        return (
            f"{_lat(w['time_to_served']):<22} (first {_f(w['first_served_ms'])}; "
            f"all clients had tried by {_f(w['issued_ms'])})"
        )

    ratios = _ratios(st["ratio_vs_warm"])
    return [
        f"Reconnect storm: {n} clients, each with its own connections, session and grants; "
        f"SIGKILL of {st['killed']}",
        f"(reaped after {st['reaped_ms']} ms), and every client checks out once more, failing "
        f"over as the client library does; {st['new_primary']} serves",
        f"  served within 1 s of the kill: {s['served_within_1s']}/{n} (target: all)"
        + ("" if s["served"] == n else f"; not served: {s['failed']}"),
        "  time to served, ms p50/p99/max:",
        f"    storm, from the kill              {wave(s)}",
        f"    the same burst, healthy triad     {wave(warm)}",
        f"    the clients starting from nothing {wave(cold)}",
        f"  storm / healthy burst: {ratios}; starting from nothing is connect, open and checkout",
        f"  storm: first copy to a live node after {_lat(s['time_to_first_live_send'])} ms; "
        f"{s['clients_redirected']} clients redirected, {s['clients_unavailable']} told "
        f"unavailable, {s['resends']} resends, {s['sends_refused']} sends refused (not connected), "
        f"{s['copies_to_dead_node']} copies into the dead node's dropped connection",
        f"  sessions kept {st['sessions_kept']}/{n}; grants held before the kill: "
        f"{st['pre_kill_grants_held']}/{st['pre_kill_grants']} still held, "
        f"{st['pre_kill_grants_listed']}/{st['pre_kill_grants']} listed by {st['new_primary']}",
        f"  CPU ms, storm: {_cpu(st['cpu_ms']['storm'])}",
        f"          healthy burst: {_cpu(st['cpu_ms']['warm'])}",
    ]


def _cpu(cpu: dict[str, int]) -> str:
    nodes = ", ".join(f"{k} {v}" for k, v in cpu.items() if k not in ("clients", "wall"))
    return f"{nodes}, client processes {cpu['clients']} (over {cpu['wall']} ms)"


def _flood(fl: dict[str, Any]) -> list[str]:
    lines = [
        f"Flood: {fl['requests']} status requests from one connection that never reads, "
        f"against a primary holding {fl['grants']} grants; {fl['honest_outstanding']} honest "
        "sessions check out and in meanwhile",
        f"  a status reply is {fl['reply_bytes']['summary']} bytes, a page of holders "
        f"{fl['reply_bytes']['page']} bytes",
        f"  {'window':<11} {'RSS extra MB':>12} {'peak MB':>8} {'elections':>9} "
        f"{'read in s':>9}  honest checkout ms p50/p99/max",
    ]
    for kind in ("baseline", "summary", "pages", "paced_pages"):
        if kind not in fl:
            continue
        w = fl[kind]
        killed = f"  KILLED past {w['killed_past_mb']} MB" if w.get("killed_past_mb") else ""
        lines.append(
            f"  {kind:<11} {_f(w.get('rss_extra_mb'), '{:.1f}'):>12} "
            f"{_f(w.get('rss_peak_mb'), '{:.1f}'):>8} {_f(w['elections']):>9} "
            f"{_f(w.get('drained_s'), '{:.3f}'):>9}  {_lat(w['honest']['checkout_latency'])}"
            f"{killed}"
        )
    lines.append("  (targets: under 100 MB extra, no election, honest p99 under 50 ms)")
    return lines
