"""The benchmark runs end to end in its tiny mode and writes its JSON. No speed is asserted:
the figures belong in BENCHMARKS.md, measured on a quiet machine, not in a test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from zbroker.broker.demo import NODE_NAMES
from zbroker.clients.testing import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def test_bench_tiny_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--tiny", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Throughput" in done.stdout and "Failover" in done.stdout
    assert "Reconnect storm" in done.stdout and "Flood:" in done.stdout
    result = json.loads(out.read_text())

    phases = {"throughput", "failover", "sessions", "grants", "storm", "flood"}
    assert {"plan", "machine", *phases} <= set(result)
    assert result["machine"]["nproc"] >= 1 and result["machine"]["libzmq"]
    levels = [str(c) for c in result["plan"]["levels"]]
    tp = result["throughput"]
    for target in ("echo", "floor", "triad"):
        for c in levels:
            figures = tp["levels"][target][c]
            assert figures["pairs_per_s"] > 0
            assert set(figures["checkout_latency"]) == {"n", "p50_ms", "p99_ms", "max_ms"}
    assert set(tp["ratios"]["triad"]["vs_echo"]) == set(levels)
    # the triad is set against the floor as well; the floor against the echo only
    assert set(tp["ratios"]["triad"]) == {"vs_echo", "vs_floor"}
    assert set(tp["ratios"]["floor"]) == {"vs_echo"}
    assert all(r > 0 for r in tp["ratios"]["triad"]["vs_floor"].values())
    assert set(tp["latency"]["floor"]) == {"low", "high"}
    assert set(tp["latency"]["triad"]["low"]["vs_floor"]) == {"p50_ms", "p99_ms", "max_ms"}
    assert "vs_floor" not in tp["latency"]["floor"]["low"]
    assert set(tp["latency"]["triad"]) == {"low", "high"}
    assert set(tp["latency"]["triad"]["low"]["ratio"]) == {"p50_ms", "p99_ms", "max_ms"}
    assert "CPU per request" in done.stdout
    triad_processes = {*NODE_NAMES, "load", "takers"}  # takers: 0 until a node's first snapshot
    floor_processes = {"lead", "f1", "f2", "load"}
    for target, processes in (
        ("echo", {"echo", "load"}),
        ("floor", floor_processes),
        ("triad", triad_processes),
    ):
        spent = tp["cpu_us_per_request"][target][levels[-1]]
        assert set(spent) == processes and all(v >= 0 for v in spent.values())
        assert spent["load"] > 0 and sum(spent.values()) > spent["load"], spent
    bound = tp["cpu_bound"]["triad"]
    assert bound["concurrency"] == int(levels[-1]) and bound["pairs_per_s"] > 0
    assert bound["vs_echo"] > 0

    failover = result["failover"]
    assert failover["kills"] == result["plan"]["kills"] == len(failover["trials"])
    assert failover["p50_s"] is not None and failover["max_s"] >= failover["p50_s"]

    sessions = result["sessions"]
    assert sessions["sessions"] == result["plan"]["sessions"]
    assert {"idle", "beating", "heartbeats_per_s", "open_s"} <= set(sessions)
    assert all({"role", "cpu_percent", "rss_mb"} <= set(u) for u in sessions["beating"].values())

    grants = result["grants"]
    expected = result["plan"]["sessions"] * result["plan"]["grants_per_session"]
    assert grants["grants"] == expected
    assert grants["status"]["holders"] == expected
    assert len(grants["rss_mb"]) == 3
    assert grants["catch_up"]["seconds"] > 0

    storm = result["storm"]
    clients = result["plan"]["storm_clients"]
    assert storm["clients"] == clients
    assert storm["killed"] != storm["new_primary"]
    for wave in ("storm", "baseline_warm", "baseline_cold"):
        figures = storm[wave]
        assert figures["served"] == clients, figures["failed"]
        assert figures["time_to_served"]["n"] == clients
        assert set(figures["time_to_served"]) == {"n", "p50_ms", "p99_ms", "max_ms"}
    assert set(storm["ratio_vs_warm"]) == {"p50_ms", "p99_ms", "max_ms"}
    # the failover kept every session and every grant taken before the kill
    assert storm["sessions_kept"] == clients
    assert storm["pre_kill_grants"] == 2 * clients
    assert storm["pre_kill_grants_held"] == storm["pre_kill_grants_listed"] == 2 * clients
    assert storm["holders_after"] == 3 * clients
    assert storm["grants_reported_unsafe_or_lost"] == {}

    flood = result["flood"]
    assert flood["grants"] >= expected and flood["requests"] == result["plan"]["flood_requests"]
    for window in ("baseline", "summary", "pages", "paced_pages"):
        figures = flood[window]
        assert figures["honest"]["checkout_latency"]["n"] > 0
        assert figures["rss_extra_mb"] is not None and figures["killed_past_mb"] is None
        assert window == "baseline" or figures["drained_s"] is not None  # the flood was read


def test_bench_stopped_by_sigterm_leaves_no_node_running(tmp_path: Path) -> None:
    # Its triads run in sessions of their own: killed by SIGTERM's default action, the
    # bench left their nine nodes running (a timeout, a CI job cancelled).
    temp = tmp_path / "tmp"
    temp.mkdir()
    bench = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--tiny", "--json", "b.json"],
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(temp)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert bench.stderr is not None
        for line in bench.stderr:  # the first level measured: every triad is up by then
            if "outstanding:" in line:
                break
        assert _running_under(temp), "the triads were not started"
        bench.send_signal(signal.SIGTERM)
        bench.wait(60)
        wait_for(lambda: not _running_under(temp), 15, "the bench's nodes to stop")
    finally:
        bench.kill()
        bench.wait()


def _running_under(directory: Path) -> list[int]:
    """The processes whose command line names ``directory`` (a bench's triads)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(directory) in (proc / "cmdline").read_text():
                found.append(int(proc.name))
        except OSError:  # gone meanwhile
            continue
    return found
