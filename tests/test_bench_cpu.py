"""What ``zbroker bench`` counts as the CPU a request costs (clients/testing/bench/runner.py):
each server process, the load processes as one, and a triad's snapshot takers (each
node's child process) as one, since the machine spends their CPU on the requests too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zbroker.clients.testing.bench.common import ProcSample, children
from zbroker.clients.testing.bench.runner import _cpu_us


def _at(cpu: dict[str, float]) -> dict[str, ProcSample]:
    return {name: ProcSample(0.0, seconds, 0) for name, seconds in cpu.items()}


@pytest.mark.unit
def test_the_takers_count_as_one_with_a_taker_started_in_the_level_counted_whole() -> None:
    before = _at({"alpha": 1.0, "load0": 2.0, "load1": 3.0, "taker11": 5.0})
    after = _at({"alpha": 1.5, "load0": 2.25, "load1": 3.25, "taker11": 5.1, "taker12": 0.3})
    assert _cpu_us(before, after, 1_000, triad=True) == {
        "alpha": 500.0,
        "load": 500.0,
        "takers": 400.0,  # 0.1 s of the one there before, 0.3 s of the one started since
    }


@pytest.mark.unit
def test_an_echo_has_no_takers_figure() -> None:
    before, after = _at({"echo": 1.0, "load0": 0.0}), _at({"echo": 1.1, "load0": 0.2})
    assert _cpu_us(before, after, 1_000, triad=False) == {"echo": 100.0, "load": 200.0}


@pytest.mark.integration
def test_children_lists_a_live_child_and_forgets_it_once_it_is_gone() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert child.pid in children(os.getpid())
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
    assert child.pid not in children(os.getpid())
