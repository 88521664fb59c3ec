"""The commands as a person runs them: init, up, status, checkout, and their exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from zbroker.broker.cli import main
from zbroker.clients.testing import wait_for

pytestmark = pytest.mark.integration


def _zbroker(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zbroker.broker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.unit
def test_init_writes_a_triad_demo_and_refuses_to_overwrite(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["init", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    config = (tmp_path / "demo" / "zbroker.toml").read_text()
    assert config.count("[nodes.") == 3
    license_text = (tmp_path / "demo" / "demo.lic").read_text()
    assert license_text.count("\nSERVER ") == 3 and "SIGN=" in license_text
    again = runner.invoke(main, ["init", str(tmp_path / "demo")])
    assert again.exit_code == 2 and "already exists" in again.output
    single = runner.invoke(main, ["init", str(tmp_path / "one"), "--servers", "1"])
    assert single.exit_code == 0
    assert (tmp_path / "one" / "demo.lic").read_text().count("\nSERVER ") == 1


def test_status_of_a_triad_that_is_down_exits_1(tmp_path: Path) -> None:
    CliRunner().invoke(main, ["init", str(tmp_path / "demo")])
    result = _zbroker(
        "status", "--config", str(tmp_path / "demo" / "zbroker.toml"), "--json", "--timeout", "0.3"
    )
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert [n["role"] for n in report["nodes"]] == ["down", "down", "down"]


def test_bad_config_exits_2_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "zbroker.toml").write_text('license = "missing.lic"\nvendor_key = "k.pub"\n')
    result = _zbroker("status", "--config", str(tmp_path / "zbroker.toml"))
    assert result.returncode == 2
    assert "k.pub" in result.stderr or "missing.lic" in result.stderr


def test_up_runs_a_triad_that_status_and_checkout_see_and_sigterm_stops(tmp_path: Path) -> None:
    CliRunner().invoke(main, ["init", str(tmp_path / "demo")])
    config = str(tmp_path / "demo" / "zbroker.toml")
    up = subprocess.Popen(
        [sys.executable, "-m", "zbroker.broker", "up", "--config", config],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def primary() -> dict[str, object] | None:
            result = _zbroker("status", "--config", config, "--json", "--timeout", "0.5")
            report = json.loads(result.stdout)
            return report if result.returncode == 0 and report["primary"] else None

        report = wait_for(primary, 20, "a primary in zbroker status")
        nodes = report["nodes"]
        assert isinstance(nodes, list)
        assert [n["name"] for n in nodes] == ["alpha", "beta", "gamma"]
        assert sorted(n["role"] for n in nodes) == ["backup", "backup", "primary"]
        assert all(isinstance(n["term"], int) for n in nodes)
        ok = _zbroker("checkout", "cad", "--count", "2", "--config", config)
        assert ok.returncode == 0, ok.stderr
        assert "granted 2 seat(s) of cad" in ok.stdout
        denied = _zbroker("checkout", "cad", "--count", "99", "--config", config)
        assert denied.returncode == 1 and "no_seats" in denied.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        output, _ = up.communicate(timeout=15)
    assert up.returncode == 0, output
    after = _zbroker("status", "--config", config, "--json", "--timeout", "0.3")
    assert [n["role"] for n in json.loads(after.stdout)["nodes"]] == ["down"] * 3


@pytest.mark.unit
def test_bootstrap_gives_a_new_node_a_state_it_votes_with_and_never_touches_one_in_use(
    tmp_path: Path,
) -> None:
    from zbroker.broker.config import load_config
    from zbroker.broker.storage import Storage

    runner = CliRunner()
    assert runner.invoke(main, ["init", str(tmp_path / "demo")]).exit_code == 0
    config_path = tmp_path / "demo" / "zbroker.toml"
    data = load_config(config_path).node("beta").data
    for f in data.iterdir():  # as a real host's new, empty directory
        f.unlink()
    data.rmdir()
    args = ["bootstrap", "--config", str(config_path), "--node", "beta"]
    done = runner.invoke(main, args)
    assert done.exit_code == 0, done.output
    storage = Storage(data, "beta", fsync=False, nodes=["alpha", "beta", "gamma"])
    try:
        assert not storage.load().fresh  # it votes: no catching up from a primary first
    finally:
        storage.close()
    before = {f.name: f.read_bytes() for f in data.iterdir() if f.is_file()}
    again = runner.invoke(main, args)
    assert again.exit_code == 3 and "not empty" in again.output
    assert {f.name: f.read_bytes() for f in data.iterdir() if f.is_file()} == before
    unknown = runner.invoke(main, ["bootstrap", "--config", str(config_path), "--node", "zeta"])
    assert unknown.exit_code == 2
