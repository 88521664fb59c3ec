"""A backup's Python per committed entry, stage by stage, in µs of CPU (best of rounds).

    python scripts/backup_cost.py                      # this tree
    python scripts/backup_cost.py /tmp/before .        # trees side by side, in turn

What a backup does with each entry of a checkout+checkin load, without sockets or disk:
``decode`` (the append message unpacked and checked: ``messages.parse``), ``apply``
(``Ledger.apply``, which checks every field again), ``report`` (``derive`` before the
delta applies, ``settle`` after, ``seal`` each record: the report log's work short of
the write), and ``pack`` (the entries framed for the log file, as ``Storage.append``
does). The deltas are a primary's own, decided by a ``Ledger`` for 64 sessions (the
bench's 64 outstanding) checking out ``--features`` features in turn (a site's license
has tens to hundreds), in appends of ``--batch`` entries (the waves a live triad makes
at 64 outstanding hold 30-40). What the sum leaves out of a live backup's CPU per entry
is the shell's share of each wave: poll, receive, sync, acknowledge (BENCHMARKS.md).

Each tree runs in a child whose ``PYTHONPATH`` is that tree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("decode", "apply", "report", "pack")


def measure(rounds: int, pairs_per_session: int, batch: int, features: int = 1) -> dict[str, float]:
    """Best µs per entry of each stage, for the tree on ``sys.path``; run in the child."""
    from zbroker.broker import wire
    from zbroker.broker.ledger import Ledger
    from zbroker.broker.model import Entitlement, Now, Request
    from zbroker.broker.reportlog import GENESIS, derive, seal, settle
    from zbroker.peers import messages
    from zbroker.peers.types import Entry

    noon = 1_780_315_200.0  # 2026-06-01 12:00 UTC: no day boundary within the run

    names = [f"bench{n}" for n in range(features)]

    def ledger() -> Ledger:
        lines = [Entitlement(name, "1.0", 1_000, None, source=f"bench.lic:{n + 1}")
                 for n, name in enumerate(names)]  # fmt: skip
        return Ledger(lines, lease=30.0, heartbeat=10.0)

    primary, deltas = ledger(), list[dict[str, Any]]()

    def decide(request: Request, at: float) -> None:
        for delta, _ in primary.handle(request, Now(100.0 + at, noon + at)).decided:
            deltas.append(wire.unpack(wire.pack(delta)))  # as a backup receives it
            primary.apply_decided(delta)

    sids = [f"{n:032x}" for n in range(64)]
    for sid in sids:
        decide(Request("open", sid, 1, user="bench", host="benchhost"), 0.0)
    opens, req, held = len(deltas), dict.fromkeys(sids, 1), dict.fromkeys(sids, 0)
    for wave in range(pairs_per_session):
        at = wave / 100
        for n, sid in enumerate(sids):
            req[sid] += 1
            feature = names[(wave * len(sids) + n) % features]  # each in use, in turn
            decide(Request("checkout", sid, req[sid], req[sid] - 1, feature=feature), at)
            held[sid] = deltas[-1]["grant"]
        for sid in sids:
            req[sid] += 1
            decide(Request("checkin", sid, req[sid], req[sid] - 1, grant=held[sid]), at)
    body = deltas[opens:]
    first = opens + 1
    appends = [
        wire.pack(
            messages.Append(
                1,
                first + k - 1,
                1,
                tuple(Entry(1, first + k + j, d) for j, d in enumerate(body[k : k + batch])),
                first + k - 1,
            ).to_wire()
        )
        for k in range(0, len(body), batch)
    ]

    def replayed() -> Any:
        backup = ledger()
        for delta in deltas[:opens]:
            backup.apply(delta)
        return backup

    def once(stage: str) -> float:
        backup = replayed()
        started = time.process_time()
        if stage == "decode":
            for data in appends:
                messages.parse(wire.unpack(data))
        elif stage == "apply":
            for delta in body:
                backup.apply(delta)
        elif stage == "report":  # with the apply between derive and settle, taken out below
            prev = GENESIS
            for index, delta in enumerate(body, first):
                records = derive(index, 1, delta, backup)
                backup.apply(delta)
                settle(records, backup)
                for record in records:
                    _, prev = seal(record, prev)
        else:
            for k in range(0, len(body), batch):
                wire.pack({"e": [(first + k + j, 1, d) for j, d in enumerate(body[k : k + batch])]})
        return (time.process_time() - started) / len(body) * 1e6

    best = {stage: min(once(stage) for _ in range(rounds)) for stage in STAGES}
    best["report"] -= best["apply"]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", type=Path, help="source trees (default: this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=100, help="checkout+checkin per session")
    parser.add_argument("--batch", type=int, default=36, help="entries per append")
    parser.add_argument("--features", type=int, default=1, help="features on the license")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.rounds, args.pairs, args.batch, args.features)))
        return
    trees = args.trees or [Path(__file__).resolve().parent.parent]
    print(f"{'tree':40s}" + "".join(f"{s:>9s}" for s in STAGES) + f"{'sum':>9s}   µs/entry")
    for tree in trees:
        flags = ["--rounds", str(args.rounds), "--pairs", str(args.pairs)]
        flags += ["--batch", str(args.batch), "--features", str(args.features)]
        child = subprocess.run(
            [sys.executable, __file__, "--measure", *flags],
            env={**os.environ, "PYTHONPATH": str(tree.resolve())},
            cwd=tree.resolve(),
            capture_output=True,
            text=True,
            check=True,
        )
        cost = json.loads(child.stdout)
        cells = "".join(f"{cost[s]:9.2f}" for s in STAGES)
        print(f"{tree!s:40s}{cells}{sum(cost.values()):9.2f}")


if __name__ == "__main__":
    main()
