"""The deterministic simulation over many seeds (see tests/sim.py for what it checks).

``sim`` is imported as pytest puts it on the path (``tests/`` is not a package).

``ZB_SIM_SEEDS`` changes how many seeds the suite runs (default 300, a few seconds on
two cores); ``scripts/simulate.py`` is for long runs and replays.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import pytest
from sim import Simulation, run_seed, seed_failures

pytestmark = pytest.mark.sim

SEEDS = int(os.environ.get("ZB_SIM_SEEDS", "300"))
STEPS = 200
CHUNK = 25

# Seeds that once broke an invariant or liveness, kept as regressions: (seed, the fault
# profile of the hunt that found it, its fault rate; None: the seed's own draws).
REGRESSIONS: list[tuple[int, tuple[str, ...] | None, float | None]] = [
    # The next_grant crash of issue 11: alpha, primary, is cut off (t=1004.2) with
    # proposals no backup got, and paused before it steps down; beta is elected (term 2)
    # and commits; the partition heals while alpha sleeps; the first thing alpha reads
    # when it resumes (t=1005.8) is an append of beta's that cuts its proposals and
    # commits past them at once.
    # With the rebuild rule of NodeCore._on_role_changed reverted (only "applied past the
    # commit"), alpha keeps deltas that never committed and must start over; found by
    # `python scripts/simulate.py --seeds 5000 --faults pause,pause,partition,oneway,heal,lost
    # --fault-rate 0.1` on the reverted core (its first failing seed; the seeds' own draws
    # found none in 1,500 seeds with the rule reverted, on an earlier revision of sim.py).
    (617, ("pause", "pause", "partition", "oneway", "heal", "lost"), 0.1),
]


def test_many_seeds_keep_every_invariant_and_converge() -> None:
    chunks = [(s, min(s + CHUNK, SEEDS), STEPS, None, None) for s in range(0, SEEDS, CHUNK)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        failures = [text for found in pool.map(seed_failures, chunks) for text in found]
    assert not failures, "\n\n".join(failures[:5])


@pytest.mark.parametrize(("seed", "faults", "fault_rate"), REGRESSIONS)
def test_regression_seeds(
    seed: int, faults: tuple[str, ...] | None, fault_rate: float | None
) -> None:
    run_seed(seed, 300, faults, fault_rate)


def test_a_seed_replays_identically() -> None:
    first, second = Simulation(12345, 300), Simulation(12345, 300)
    assert first.run() == second.run()
    assert first.events == second.events and first.committed == second.committed
    assert first.history.lines == second.history.lines
