"""scripts/backup_cost.py replays a primary's deltas through each stage of a backup (the
append decoded, applied, reported, packed): a change that breaks any stage breaks it.
No speed is asserted: the figures belong in BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "backup_cost.py"


def test_every_stage_of_a_backup_runs_on_the_primarys_deltas() -> None:
    spec = importlib.util.spec_from_file_location("backup_cost", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cost = script.measure(rounds=1, pairs_per_session=3, batch=7)
    assert set(cost) == set(script.STAGES)
    assert all(cost[stage] > 0 for stage in ("decode", "apply", "pack"))
