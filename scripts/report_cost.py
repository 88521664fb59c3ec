"""The report log's cost on a node, in instructions per checkout+checkin pair (callgrind).

    python scripts/report_cost.py /tmp/before .        # two trees: before, after
    git archive HEAD | tar -x -C /tmp/before           # a tree of the last commit

For each tree, in a child whose ``PYTHONPATH`` is that tree, under
``valgrind --tool=callgrind``: a ledger with one session applies N checkout+checkin pairs
(grant and release deltas), alone or, with the report log on, as a node does with each
committed entry: ``derive`` before the delta applies, ``settle`` after, and the records
written by ``ReportWriter`` (sealed, buffered, flushed) 8 records a cycle. Each case runs
for 1,000 and 3,000 pairs; the difference divided by 2,000 is the cost of one pair,
with the interpreter's start and imports cancelled out. Instructions, unlike seconds,
do not change with the load other programs put on the machine (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import sys, tempfile
from pathlib import Path
from zbroker.broker.ledger import Ledger
from zbroker.broker.model import Entitlement
from zbroker.broker.seats import entitlement_to_map
from zbroker.broker import reportlog
from zbroker.broker.reportfile import ReportWriter

pairs, report = int(sys.argv[1]), sys.argv[2] == "on"
settle = getattr(reportlog, "settle", None)  # a tree from before settle worked it out
T0 = 1_795_000_000.0
SID = "0123456789abcdef0123"
lines = [Entitlement("cad", "2.0", 1_000_000, None)]
lines += [Entitlement(f"f{i}", "1.0", 10, None) for i in range(10)]
led = Ledger((), lease=30.0, heartbeat=10.0)
led.apply({"k": "reload", "entitlements": [entitlement_to_map(e) for e in lines]})
led.apply({"k": "open", "sid": SID, "req": 1, "ack": 0, "user": "ann", "host": "ann-pc",
           "display": ":0", "client_version": "1.0", "at": T0,
           "address": "tcp://127.0.0.1:5555", "project": "p"})
writer = ReportWriter(Path(tempfile.mkdtemp()), "alpha")
writer.open()
ix, req, cycle = 3, 2, []
for gid in range(1, pairs + 1):
    for delta in (
        {"k": "grant", "sid": SID, "req": req, "ack": req - 1, "grant": gid, "feature": "cad",
         "version": "2.0", "count": 1, "at": T0 + gid},
        {"k": "release", "sid": SID, "req": req + 1, "ack": req, "grant": gid,
         "at": T0 + gid + 0.5},
    ):
        records = reportlog.derive(ix, 1, delta, led) if report else []
        led.apply(delta)
        if settle is not None:
            settle(records, led)
        cycle += records
        ix += 1
    req += 2
    if len(cycle) >= 8:
        writer.write(cycle, T0)
        writer.flush()
        cycle = []
writer.close()
"""


def instructions(tree: Path, pairs: int, report: bool, script: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
           str(script), str(pairs), "on" if report else "off"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise SystemExit(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees: before, after")
    parser.add_argument("--pairs", type=int, default=1000, help="the smaller run's pairs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "pairs.py"
        script.write_text(CHILD)
        small, large = args.pairs, 3 * args.pairs
        for tree in args.trees:
            per = {}
            for report in (False, True):
                a = instructions(tree, small, report, script)
                b = instructions(tree, large, report, script)
                per[report] = (b - a) // (large - small)
            print(f"{tree}: ledger {per[False]:,} instr/pair; with the report log "
                  f"{per[True]:,}; the report log {per[True] - per[False]:,}")  # fmt: skip


if __name__ == "__main__":
    main()
