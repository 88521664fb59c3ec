"""``zbroker reread`` on a live triad after the SERVER lines were edited (the prober's
repro_rank_flap.py and repro_endpoint_reread.py): the order swapped and alpha's endpoint
moved in the file. The command finds alpha where the running triad says it serves, and
says the SERVER lines change only when the nodes restart, with exit 1, rather than
"serving the files read"."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from zbroker.broker.demo import free_ports
from zbroker.clients.testing import LocalTriad, wait_for

pytestmark = pytest.mark.integration


def test_a_reread_says_the_server_lines_change_only_at_a_restart(tmp_path: Path) -> None:
    triad = LocalTriad(tmp_path / "triad", secure=False)
    try:
        triad.start()
        wait_for(lambda: triad.status(holders=False)["primary"] is not None, 10.0, "a primary")
        lic = Path(triad.license)
        lines = lic.read_text().splitlines()
        servers = [i for i, line in enumerate(lines) if line.startswith("SERVER")]
        alpha, beta, gamma = (lines[i] for i in servers)
        old = alpha.split()[3]
        (port,) = free_ports(1)
        new = f"tcp://127.0.0.1:{port}"
        for i, line in zip(servers, (gamma, alpha.replace(old, new), beta), strict=True):
            lines[i] = line
        lic.write_text("\n".join(lines) + "\n")
        done = subprocess.run(
            ["zbroker", "reread", "--config", str(triad.config_path), "--timeout", "3"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        said = done.stdout + done.stderr
        assert done.returncode == 1, said
        assert f"alpha: no answer at {new}; the triad's nodes know it at {old}" in said
        assert "SERVER lines change the order gamma, alpha, beta (it runs by alpha, beta" in said
        assert f"alpha's endpoint {new} (it runs by {old})" in said
        assert "serving the files read" not in said
        assert "alpha: rereading" in said
    finally:
        triad.stop()
