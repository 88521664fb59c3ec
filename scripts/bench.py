"""Benchmark zbroker against a bare ZeroMQ echo in one run: ``python scripts/bench.py [--quick]``.

The same as ``zbroker bench``; everything lives in ``clients/testing/bench`` (see its docstring).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from zbroker.clients.testing.bench.cli import bench

if __name__ == "__main__":
    bench()
