"""A node whose wall clock is 2 h fast joins a live triad (the prober's skew_failback):
it does not take control by failback, says why once, and once its clock is set right it
logs the step, stands again and takes control back; a SIGTERM's "stopped" line names it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from zbroker.clients.testing import LocalTriad, wait_for

pytestmark = pytest.mark.integration

# time.time() and time_ns() of the node's process, offset by the seconds in the file
# $ZB_TEST_SKEW_FILE (read again every 0.1 s): a step of that one host's wall clock.
SITECUSTOMIZE = """
import os, time
_file = os.environ.get("ZB_TEST_SKEW_FILE")
if _file:
    _time, _time_ns, _mono = time.time, time.time_ns, time.monotonic
    _state = [-1.0, 0.0]
    def _offset():
        if _mono() - _state[0] > 0.1:
            _state[0] = _mono()
            with open(_file) as f:
                _state[1] = float(f.read())
        return _state[1]
    time.time = lambda: _time() + _offset()
    time.time_ns = lambda: _time_ns() + int(_offset() * 1e9)
"""


def test_a_node_two_hours_fast_does_not_take_control_until_its_clock_is_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "skew"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    skew = tmp_path / "alpha.skew"
    skew.write_text("7200")
    triad = LocalTriad(tmp_path / "triad")
    try:
        triad.start("beta", "gamma")
        wait_for(lambda: triad.status(holders=False)["primary"] == "beta", 10.0, "beta primary")
        with monkeypatch.context() as env:
            env.setenv("PYTHONPATH", str(site))
            env.setenv("ZB_TEST_SKEW_FILE", str(skew))
            triad.start("alpha")
        log = triad.logs / "alpha.log"

        def said(text: str) -> bool:
            return text in log.read_text()

        wait_for(lambda: said("clock is 7200.0 s ahead of beta and gamma"), 10.0, "the note")

        def alpha_caught_up() -> bool:
            nodes = {n["name"]: n for n in triad.status(holders=False)["nodes"]}
            alpha, beta = nodes["alpha"], nodes["beta"]
            return alpha["role"] == "backup" and alpha["commit"] == beta["commit"]

        wait_for(alpha_caught_up, 10.0, "alpha caught up")
        # failback would hand alpha control within a peer_timeout of catching up
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            report = triad.status(holders=False)
            assert report["primary"] == "beta"
            (own,) = [n for n in report["nodes"] if n["name"] == "alpha"]
            assert own["not_standing"].startswith("clock is 7200.0 s ahead of beta and gamma")
        skew.write_text("0")  # the clock set right: alpha stands and takes control back
        wait_for(lambda: triad.status(holders=False)["primary"] == "alpha", 10.0, "failback")
        assert said("wall clock stepped -7200.0 s")
        assert said("clock agrees with beta and gamma again")
        triad.kill("alpha", signal.SIGTERM)
        assert said("node alpha stopped on SIGTERM")
    finally:
        triad.stop()
