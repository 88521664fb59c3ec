"""What deploy/ ships: the alert rules, the Grafana dashboard and the systemd units.

The rules and the dashboard may only name metrics a node exports (a renamed metric
would leave an alert that never fires and a panel that stays empty), and the dashboard
shows every family the node exports. The real tools then check the files: Debian's
``promtool`` (``check rules``, and ``test rules`` with the cases beside the rules) and
``systemd-analyze verify``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from zbroker.broker.cli import EXIT_CONFIG, EXIT_DATA
from zbroker.broker.metrics import Metrics
from zbroker.broker.model import Now

pytestmark = pytest.mark.unit

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "zbroker-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "zbroker-rules.test.yml"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "zbroker-dashboard.json"
UNITS = DEPLOY / "systemd"
# A metric name in PromQL: what the node exports is zbroker_* and process_*; `up` is
# Prometheus' own, for every target.
NAME = re.compile(r"\b(?:zbroker|process)_[a-z_]+\b")


class _Core:
    """A primary whose report has every kind of series (a dated pool, a backup heard)."""

    tallies = Counter({("checkout", "cad"): 1})
    session_count = 1

    def report(self, now: Now) -> dict[str, Any]:
        own = {"name": "alpha", "role": "primary", "term": 1, "last": 2, "commit": 2,
               "peers": ["beta"], "serving": True}  # fmt: skip
        beta = {"name": "beta", "role": "backup", "term": 1, "last": 2, "commit": 2}
        pool = {"version": "2.0", "total": 1, "in_use": 1, "expires": "2099-01-01"}
        cad = {"name": "cad", "total": 1, "in_use": 1, "queued": 0, "versions": [pool]}
        return {"node": "alpha", "mode": "plain", "nodes": [own, beta], "features": [cad]}


def exported() -> dict[str, set[str]]:
    """Each family the node exports, with the names of its samples."""
    metrics = Metrics("alpha", ("127.0.0.1", 0))
    metrics.observe([0.001])
    metrics.refresh(_Core(), Now(0.0, 0.0))
    return {f.name: {s.name for s in f.samples} for f in metrics.registry.collect()}


def sample_names() -> set[str]:
    return set().union(*exported().values())


def dashboard_exprs() -> list[str]:
    def walk(panels: list[dict[str, Any]]) -> list[str]:
        exprs = []
        for panel in panels:
            exprs += [t["expr"] for t in panel.get("targets", [])]
            exprs += walk(panel.get("panels", []))
        return exprs

    board = json.loads(DASHBOARD.read_text())
    variables = [v.get("definition", "") for v in board["templating"]["list"]]
    return walk(board["panels"]) + [v for v in variables if v]


def test_the_rules_name_only_metrics_a_node_exports() -> None:
    named = set(NAME.findall(RULES.read_text() + RULE_TESTS.read_text()))
    assert named, "no metric found in the rules"
    assert named <= sample_names(), f"not exported: {sorted(named - sample_names())}"


def test_every_dashboard_expression_names_exported_metrics() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    names = sample_names()
    for expr in exprs:
        named = set(NAME.findall(expr))
        assert named or re.search(r"\bup\b", expr), f"names no metric: {expr}"
        assert named <= names, f"{expr}: not exported: {sorted(named - names)}"


def test_the_dashboard_shows_every_family_the_node_exports() -> None:
    text = "\n".join(dashboard_exprs())
    missing = [
        family
        for family, samples in exported().items()
        if family.startswith("zbroker_") and family != "zbroker_node_info"
        and not any(re.search(rf"\b{s}\b", text) for s in samples)
    ]  # fmt: skip
    assert not missing, f"families with no panel: {missing}"
    # zbroker_node_info says the mode and gives the job variable its values
    assert "zbroker_node_info" in text


def test_the_dashboard_is_one_grafana_dashboard_with_unique_panels() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"type", "title", "gridPos"} <= panel.keys()
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "job", "feature"]


def _unit(name: str) -> dict[str, list[str]]:
    """``key -> values`` of a unit file (every section; a key may repeat)."""
    values: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_the_node_unit_restarts_on_failure_but_not_on_exits_2_and_3() -> None:
    unit = _unit("zbroker@.service")
    assert unit["Restart"] == ["on-failure"]
    prevented = {int(code) for code in unit["RestartPreventExitStatus"][0].split()}
    assert prevented == {EXIT_CONFIG, EXIT_DATA}
    assert unit["User"] == ["zbroker"] and unit["StateDirectory"] == ["zbroker/%i"]
    assert "--node %i" in unit["ExecStart"][0] and unit["PartOf"] == ["zbroker.target"]
    assert unit["WantedBy"] == ["zbroker.target"]
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]


@pytest.mark.integration
def test_promtool_accepts_the_rules_and_the_scrape_config_and_the_rule_tests_pass() -> None:
    promtool = _tool("promtool", "Debian's prometheus package (.ci/run installs it)")
    for what, path in (("rules", RULES), ("config", SCRAPE)):
        check = subprocess.run(
            [promtool, "check", what, str(path)], capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert "SUCCESS: 11 rules found" in check.stdout
    tests = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout


@pytest.mark.integration
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze", "systemd")
    zbroker = _tool("zbroker", "this project (pip install -e .)")
    # An instance of the template, with ExecStart on this machine's zbroker: verify
    # insists that the program exists.
    text = (UNITS / "zbroker@.service").read_text()
    assert "/opt/zbroker/bin/zbroker run" in text
    (tmp_path / "zbroker@alpha.service").write_text(
        text.replace("/opt/zbroker/bin/zbroker", zbroker)
    )
    shutil.copy(UNITS / "zbroker.target", tmp_path)
    verify = subprocess.run(
        [analyze, "verify", "--man=no", "zbroker@alpha.service", "zbroker.target"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=true", "zbroker@alpha.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert level is not None, security.stdout + security.stderr
    assert float(level.group(1)) <= 2.0, security.stdout  # 1.7 when written ("OK")


def _tool(name: str, source: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: it comes with {source}")
    return path
