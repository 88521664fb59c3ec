"""The report log's records from three real node cores in the deterministic simulation
(tests/sim.py): under its faults (kills, pauses, partitions, lost disks), every record
the cores hand out for an index is the same on every node and every time it is handed
out again (after a restart), and every committed grant has its ``out`` record."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import sim as simmod
from sim_node import SimNode

from zbroker.broker.config import Config

pytestmark = pytest.mark.sim

SEEDS = 40
STEPS = 200


def test_the_cores_report_the_same_record_for_each_index_under_faults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain = simmod.sim_config

    def reporting(**kw: Any) -> Config:
        config = plain(**kw)
        nodes = tuple(
            dataclasses.replace(n, report_log=Path(f"/sim/report/{n.name}")) for n in config.nodes
        )
        return dataclasses.replace(config, nodes=nodes)

    monkeypatch.setattr(simmod, "sim_config", reporting)
    seen: dict[tuple[int, int], dict[str, Any]] = {}
    carry_out = SimNode._carry_out

    def tapped(self: SimNode, core: Any, ready: Any, now: Any) -> None:
        for record in ready.report:
            key = (record["ix"], record["n"])
            first = seen.setdefault(key, record)
            if first != record:
                raise AssertionError(f"{self.name} reports {record} at {key}, before: {first}")
        return carry_out(self, core, ready, now)

    monkeypatch.setattr(SimNode, "_carry_out", tapped)
    grants = terms = 0
    for seed in range(SEEDS):
        seen.clear()
        simulation = simmod.Simulation(seed, STEPS)
        simulation.run()
        outs = {r["grant"]: ix for (ix, _), r in seen.items() if r["ev"] == "out"}
        for index, (_, delta) in simulation.committed.items():
            if delta is not None and delta.get("k") == "grant":
                assert outs.get(delta["grant"]) == index, (seed, index, delta)
                grants += 1
        # Every term a node won by election names it, with the wall time it won at.
        for (ix, _), r in seen.items():
            if r["ev"] == "term":
                assert r["primary"] in simmod.NAMES and isinstance(r["at"], float), (seed, ix, r)
                terms += 1
    assert grants > 100  # the load flowed
    assert terms >= SEEDS  # every run elected a primary at least once
