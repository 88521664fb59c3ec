"""Run the deterministic triad simulation over many seeds, or replay one.

    python scripts/simulate.py --seeds 100000            # seeds 0..99999, all cores
    python scripts/simulate.py --seeds 5000 --start 7    # seeds 7..5006
    python scripts/simulate.py --seed 65 [--steps K]     # replay one seed, with its trace

A failing seed prints the broken invariant and ``replay with: ...``; the exit status
is 1 if any seed failed. See ``tests/sim.py`` for what is simulated and checked.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/ is not a package: pytest imports it so

from sim import Simulation, Violation, seed_failures  # noqa: E402  (after the path set-up)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="replay this one seed, printing its trace")
    parser.add_argument("--steps", type=int, default=300, help="fault-phase steps per seed")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    if args.seed is not None:
        sim = Simulation(args.seed, args.steps, verbose=True)
        print(sim.timing, f"drop={sim.net.drop} dup={sim.net.dup} delay<={sim.net.max_delay}")
        try:
            stats = sim.run()
        except Violation as v:
            print(f"FAILED: {v}\nreplay with: python scripts/simulate.py --seed {args.seed}")
            return 1
        print(stats)
        return 0

    began = time.monotonic()
    size = 50
    chunks = [
        (s, min(s + size, args.start + args.seeds), args.steps)
        for s in range(args.start, args.start + args.seeds, size)
    ]
    failed = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for failures in pool.map(seed_failures, chunks):
            for text in failures:
                failed += 1
                print(text, flush=True)
    took = time.monotonic() - began
    print(f"{args.seeds} seeds, {failed} failed, {took:.1f}s, {args.seeds / took:.1f} seeds/s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
