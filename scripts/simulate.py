"""Run the deterministic simulation of three node cores and their clients, or replay one seed.

    python scripts/simulate.py --seeds 100000            # seeds 0..99999, all cores
    python scripts/simulate.py --seeds 5000 --start 7    # seeds 7..5006
    python scripts/simulate.py --seed 65 [--steps K]     # replay one seed, with its trace
    python scripts/simulate.py --seeds 5000 --faults pause,partition,heal --fault-rate 0.1
                                                         # a hunt: these faults only, often

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

from sim import FAULTS, Simulation, Violation, replay_command, seed_failures  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="replay this one seed, printing its trace")
    parser.add_argument("--steps", type=int, default=300, help="fault-phase steps per seed")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--progress", type=int, default=1000, metavar="N", help="a line on stderr every N seeds"
    )
    parser.add_argument(
        "--faults",
        help=f"comma-separated fault kinds every seed uses instead of its own draw, of: "
        f"{', '.join(FAULTS)}",
    )
    parser.add_argument("--fault-rate", type=float, help="faults per step instead of the draw")
    args = parser.parse_args()
    faults = None if args.faults is None else tuple(args.faults.split(","))
    if faults is not None and not set(faults) <= set(FAULTS):
        parser.error(f"--faults: unknown kinds {sorted(set(faults) - set(FAULTS))}")

    if args.seed is not None:
        sim = Simulation(
            args.seed, args.steps, verbose=True, faults=faults, fault_rate=args.fault_rate
        )
        print(sim.describe())
        try:
            stats = sim.run()
        except Violation as v:
            print(f"FAILED: {v}\nreplay with: {replay_command(args.seed, faults, args.fault_rate)}")
            return 1
        print(stats)
        return 0

    began = time.monotonic()
    size = 50
    chunks = [
        (s, min(s + size, args.start + args.seeds), args.steps, faults, args.fault_rate)
        for s in range(args.start, args.start + args.seeds, size)
    ]
    failed = done = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for chunk, failures in zip(chunks, pool.map(seed_failures, chunks), strict=True):
            for text in failures:
                failed += 1
                print(text, flush=True)
            done += chunk[1] - chunk[0]
            if args.progress and done % args.progress < size:
                took = time.monotonic() - began
                print(
                    f"... {done} seeds, {failed} failed, {took:.0f}s", file=sys.stderr, flush=True
                )
    took = time.monotonic() - began
    print(f"{args.seeds} seeds, {failed} failed, {took:.1f}s, {args.seeds / took:.1f} seeds/s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
