"""The snapshot bench (scripts/bench_snapshot.py) runs end to end in its tiny mode and writes
its JSON. No speed is asserted: the figures belong in BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def test_bench_snapshot_tiny_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "snap.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_snapshot.py"), "--tiny", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "catch-up of" in done.stdout
    result = json.loads(out.read_text())
    plan, phases = result["plan"], result["phases"]
    assert list(phases) == ["build", "settle", "compaction", "catch_up"]

    build = phases["build"]
    assert build["sessions"] == plan["sessions"]
    assert build["grants"] >= plan["grants"] and build["reached"]
    for name, phase in phases.items():
        probe = phase["probe"]
        assert set(probe["checkout_latency"]) == {"n", "p50_ms", "p99_ms", "max_ms"}
        assert name == "settle" or probe["checkouts"] > 0, name
        assert phase["elections"] is not None and phase["term_after"] >= phase["term_before"]
        assert set(phase["nodes"]) == {"alpha", "beta", "gamma"}
        assert all(n["rss_peak_mb"] for n in phase["nodes"].values()), name

    # every node replaced its snapshot file at least twice while the delta load ran
    compaction = phases["compaction"]
    assert not compaction["timed_out"]
    assert all(n["compactions"] >= plan["compactions"] for n in compaction["nodes"].values())
    assert compaction["load"]["checkouts"] > 0

    catch_up = phases["catch_up"]
    assert catch_up["node"] != catch_up["primary"]
    assert catch_up["caught_up_s"] is not None and catch_up["caught_up_s"] > 0
    assert catch_up["status"]["role"] == "backup"
