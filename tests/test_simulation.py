"""The deterministic simulation over many seeds (see tests/sim.py for what it checks).

``sim`` is imported as pytest puts it on the path (``tests/`` is not a package).

``ZB_SIM_SEEDS`` changes how many seeds the suite runs (default 2000, about half a
minute on two cores); ``scripts/simulate.py`` is for long runs and replays.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import pytest
from sim import Simulation, run_seed, seed_failures

pytestmark = pytest.mark.sim

SEEDS = int(os.environ.get("ZB_SIM_SEEDS", "2000"))
STEPS = 200
CHUNK = 50

# seeds that once broke an invariant or liveness, kept as regressions (long runs)
REGRESSIONS = [65, 250, 1302, 1379, 3874]


def test_many_seeds_keep_every_invariant_and_converge() -> None:
    chunks = [(s, min(s + CHUNK, SEEDS), STEPS) for s in range(0, SEEDS, CHUNK)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        failures = [text for found in pool.map(seed_failures, chunks) for text in found]
    assert not failures, "\n\n".join(failures[:5])


@pytest.mark.parametrize("seed", REGRESSIONS)
def test_regression_seeds(seed: int) -> None:
    run_seed(seed, 600)


def test_a_seed_replays_identically() -> None:
    first, second = Simulation(12345, 300), Simulation(12345, 300)
    assert first.run() == second.run()
    assert first.events == second.events and first.committed == second.committed
