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
    m = r["machine"]
    lines = [
        f"zbroker bench ({r['plan']['name']}) in {r['seconds']} s: {m['nproc']} x {m['cpu']}, "
        f"Python {m['python']}, pyzmq {m['pyzmq']}, libzmq {m['libzmq']}; load average "
        f"{r['loadavg_start'][0]} -> {r['loadavg_end'][0]}",
        "Every ratio is between figures of this run.",
        "",
    ]
    tp = r["throughput"]
    echoes = [t for t in tp["levels"] if t.startswith("echo")]
    triads = [t for t in tp["levels"] if t not in echoes]
    head = "".join(f"{e:>11}" for e in echoes)
    head += "".join(
        f"{t:>15} {'ratio':>6}" + (f" {'tuned':>6}" if len(echoes) > 1 else "") for t in triads
    )
    lines += [
        "Throughput, checkout+checkin pairs/s (triad: each answered after quorum commit;",
        "ratio: triad / echo; tuned: triad / echo_tuned)",
        f"  {'outstanding':>11}{head}",
    ]
    for c in tp["levels"]["echo"]:
        row = "".join(f"{tp['levels'][e][c]['pairs_per_s']:>11.0f}" for e in echoes)
        for t in triads:
            row += f"{tp['levels'][t][c]['pairs_per_s']:>15.0f}"
            row += "".join(f" {_f(tp['ratios'][t][f'vs_{e}'][c], '{:.2f}'):>6}" for e in echoes)
        lines.append(f"  {c:>11}{row}")
    lines += ["", "Checkout latency, ms p50/p99/max (ratio: triad / echo)"]
    for t in triads:
        for load, d in tp["latency"][t].items():
            ratios = "/".join(_f(d["ratio"][k], "{:.1f}") for k in ("p50_ms", "p99_ms", "max_ms"))
            lines.append(
                f"  {t:<14} {load:<4} ({d['concurrency']:>2} out): triad {_lat(d['triad_ms']):<20}"
                f" echo {_lat(d['echo_ms']):<18} ratio {ratios}"
            )
    fo = r["failover"]
    lines += [
        "",
        f"Failover, SIGKILL of the primary -> first grant by the new primary seen by a client "
        f"({fo['kills']} kills)",
        f"  p50 {_ms(fo['p50_s'])} ms, max {_ms(fo['max_s'])} ms, min {_ms(fo['min_s'])} ms"
        "  (targets: p50 < 500 ms, max < 1000 ms)",
    ]
    s = r["sessions"]
    lines += [
        "",
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
    g = r["grants"]
    st = g["status"]
    lines += [
        "",
        f"{g['grants']} live grants across {g['sessions']} sessions "
        f"(checked out at {g['checkouts_per_s']}/s)",
        "  checkout latency meanwhile (each node snapshots every 10,000 deltas): "
        f"{_lat(g['checkout_latency'])} ms p50/p99/max",
        "  RSS MB: "
        + ", ".join(f"{n} ({g['rss_mb_roles'][n]}) {v}" for n, v in g["rss_mb"].items()),
        f"  status query on the primary: {st['seconds_median'] * 1000:.0f} ms median "
        f"({st['reply_bytes'] / 1e6:.1f} MB, {st['holders']} holders)",
        f"  restarted backup caught up in {g['catch_up']['seconds']} s "
        f"({g['catch_up']['deltas_missed']} deltas missed while down; heartbeat resolution 0.1 s)",
    ]
    if "catch_up_wiped" in g:
        lines.append(
            f"  wiped backup caught up in {g['catch_up_wiped']['seconds']} s (from a snapshot)"
        )
    return "\n".join(lines)
