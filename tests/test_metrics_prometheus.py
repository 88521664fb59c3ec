"""A real Prometheus scrapes a live triad's metrics and reads them back through its API.

Debian's ``prometheus`` (``.ci/run`` installs it) runs as a child of the test: its config
and its database in ``tmp_path``, on a free loopback port, scraping the three nodes'
``metrics`` listeners every second and evaluating the shipped alert rules. The test
checks out seats and asks Prometheus, not the nodes, what it saw: the seats in use on
every node, which node is primary, the counters, that every rule evaluates, and that
every expression of the Grafana dashboard runs.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from zbroker import LicenseClient, LicenseDenied
from zbroker.broker.demo import free_ports, write_demo
from zbroker.clients.testing import LocalTriad, wait_for

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "zbroker-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "zbroker-dashboard.json"
# Grafana's variables, as a dashboard with every feature chosen sends them.
GRAFANA = {"$__rate_interval": "1m", "$job": "zbroker", "$feature": ".*"}


def _get(url: str, timeout: float = 2.0) -> bytes | None:
    """The body of a GET that answered 200, None otherwise (not up yet, refused)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            body: bytes = answer.read()
            return body if answer.status == 200 else None
    except (OSError, http.client.HTTPException):  # URLError, refused, reset, timed out
        return None


def _add_metrics(config: Path, listeners: dict[str, str]) -> None:
    """Give each ``[nodes.NAME]`` of ``config`` its ``metrics`` listener."""
    lines = []
    for line in config.read_text().splitlines():
        lines.append(line)
        name = line.removeprefix("[nodes.").removesuffix("]")
        if line.startswith("[nodes.") and name in listeners:
            lines.append(f'metrics = "{listeners[name]}"')
    config.write_text("\n".join(lines) + "\n")


def _with_metrics(triad: LocalTriad) -> dict[str, str]:
    """Restart ``triad`` with a metrics listener per node on a free port: node -> host:port.

    The kit's triads start at once and its settings are the top level's; a node reads
    its config when it starts, so a stop, an edit and a start give them listeners.
    """
    triad.stop()
    # Never one of the stopped nodes' own ports, which the OS now sees as free:
    # free_ports chose those for this triad's config, and never hands a port out twice.
    ports = free_ports(len(triad.names))
    listeners = {name: f"127.0.0.1:{port}" for name, port in zip(triad.names, ports, strict=True)}
    _add_metrics(triad.config_path, listeners)
    triad.start()
    for name, listener in listeners.items():
        wait_for(
            lambda listener=listener: b"zbroker_node_role" in (_get(f"http://{listener}/") or b""),
            20,
            f"node {name}'s metrics on {listener}",
        )
    return listeners


def _settled_primary(triad: LocalTriad) -> str:
    """The highest-ranked node, once primary: after a restart of all three a lower one may
    serve first, and with failback (the demo's) the highest takes control back."""
    top = triad.names[0]
    return wait_for(lambda: triad.primary() == top and top, 30, f"{top} to be primary")


class Prometheus:
    """One ``prometheus`` process scraping ``targets`` every second, with the shipped rules."""

    def __init__(self, directory: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed: Debian's prometheus package (.ci/run)")
        directory.mkdir()
        config = {  # JSON is YAML: no YAML writer needed
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "zbroker", "static_configs": [{"targets": targets}]}],
        }  # fmt: skip
        (directory / "prometheus.yml").write_text(json.dumps(config, indent=2))
        (port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{port}"
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._ready, 60, "prometheus to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()}")
        return _get(f"{self.url}/-/ready") is not None

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                reply = json.load(answer)
        except urllib.error.HTTPError as exc:  # a bad query: 400 with the error in JSON
            reply = json.load(exc)
        if reply.get("status") != "success":
            raise AssertionError(f"{path} {params}: {reply}")
        return reply["data"]

    def query(self, expr: str) -> dict[str, float]:
        """An instant query: each series' value, by its ``node`` label (else its labels)."""
        found = {}
        for series in self.api("query", query=expr)["result"]:
            labels = series["metric"]
            key = labels.get("node") or json.dumps(labels, sort_keys=True)
            found[key] = float(series["value"][1])
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        started.append(Prometheus(tmp_path / f"prometheus{len(started)}", targets))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def test_prometheus_reads_a_live_triads_seats_roles_and_counters(
    make_triad: Callable[..., LocalTriad], prometheus: Callable[[list[str]], Prometheus]
) -> None:
    triad = make_triad(servers=3, lease=5.0)
    listeners = _with_metrics(triad)
    primary = _settled_primary(triad)
    prom = prometheus(sorted(listeners.values()))
    everyone = triad.names

    def until(expr: str, check: Callable[[dict[str, float]], bool], what: str) -> None:
        """Wait until the series of ``expr`` pass ``check``: Prometheus scrapes a node up to
        a second after it changed its snapshot, which is up to a second behind its ledger
        (and a primary counts a checkout when it commits, after it showed the seats)."""
        wait_for(lambda: check(prom.query(expr)), 30, f"Prometheus to see {what}: {expr}")

    with LicenseClient(triad.license, user="metrics") as client:
        grant = client.checkout("cad", count=3)
        with pytest.raises(LicenseDenied):
            client.checkout("no-such-feature")
        # Every node, the backups too, reports the seats its ledger holds: what the
        # client holds.
        cad = 'zbroker_feature_seats_in_use{job="zbroker", feature="cad"}'
        until(cad, lambda seen: seen == dict.fromkeys(everyone, 3.0), "3 seats on every node")
        role = 'zbroker_node_role{job="zbroker", role="primary"} == 1'
        until(role, lambda seen: seen == {primary: 1.0}, f"{primary} alone primary")
        serving = 'zbroker_node_serving{job="zbroker"} == 1'
        until(serving, lambda seen: seen == {primary: 1.0}, f"{primary} alone serving")
        up = 'count(up{job="zbroker"} == 1)'
        until(up, lambda seen: list(seen.values()) == [3.0], "the three nodes scraped")
        checkouts = f'zbroker_checkouts_total{{node="{primary}", feature="cad"}}'
        until(checkouts, lambda seen: seen.get(primary, 0) >= 1, "the checkout counted")
        denied = (
            'zbroker_denials_total{job="zbroker", reason="no_such_feature", '
            'feature="(unknown)"}'
        )  # a name the license lacks counts under one label, whatever it was
        until(denied, lambda seen: seen.get(primary, 0) >= 1, "the denial counted")
        sessions = 'zbroker_sessions{job="zbroker"}'
        until(sessions, lambda seen: seen == dict.fromkeys(everyone, 1.0), "one session each")
        client.checkin(grant)
        until(cad, lambda seen: seen == dict.fromkeys(everyone, 0.0), "the seats back")
        released = f'zbroker_checkins_total{{node="{primary}", how="release", feature="cad"}}'
        until(released, lambda seen: seen.get(primary, 0) >= 1, "the checkin counted")
        latency = f'zbroker_request_latency_seconds_count{{node="{primary}"}}'
        # open, checkout, the denial, checkin: each waited for the quorum
        until(latency, lambda seen: seen.get(primary, 0) >= 4, "four latencies")

    # The shipped rules load and evaluate without error against real series.
    def rules_evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        done = all(not r["lastEvaluation"].startswith("0001") for r in rules)
        return rules if done and rules else None

    rules = wait_for(rules_evaluated, 30, "every rule evaluated once")
    assert len(rules) == 11
    assert [r["name"] for r in rules if r["health"] != "ok"] == []
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert firing == [], firing  # a healthy triad with a line a year from expiry

    # Every expression of the Grafana dashboard runs, and each finds series.
    board = json.loads(DASHBOARD.read_text())
    panels = [p for row in board["panels"] for p in [row, *row.get("panels", [])]]
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA.items():
                expr = expr.replace(variable, value)
            assert prom.api("query", query=expr)["result"], f"{panel['title']}: {expr}"


def test_scrapes_without_pause_cost_the_triad_no_election_and_no_checkout(
    make_triad: Callable[..., LocalTriad],
) -> None:
    triad = make_triad(servers=3, lease=5.0)
    listeners = _with_metrics(triad)
    primary = _settled_primary(triad)

    def term() -> int:
        nodes = triad.status(holders=False)["nodes"]
        return int(next(n["term"] for n in nodes if n["name"] == primary))

    before = term()
    scrapes = Counter[str]()
    stop = threading.Event()

    def scrape(listener: str) -> None:
        while not stop.is_set():
            if _get(f"http://{listener}/metrics") is not None:
                scrapes[listener] += 1

    scrapers = [threading.Thread(target=scrape, args=(listeners[primary],)) for _ in range(4)] + [
        threading.Thread(target=scrape, args=(listeners[n],)) for n in triad.names
    ]
    for thread in scrapers:
        thread.start()
    try:
        with LicenseClient(triad.license, user="busy", timeout=5.0) as client:
            for _ in range(100):
                client.checkin(client.checkout("viewer", count=2))
    finally:
        stop.set()
        for thread in scrapers:
            thread.join(timeout=10)
    assert all(scrapes[listener] > 0 for listener in listeners.values()), scrapes
    after = triad.wait_for_primary()
    assert (after, term()) == (primary, before), f"an election happened; scrapes: {scrapes}"


def test_a_metrics_port_taken_by_another_program_exits_2_with_one_line(tmp_path: Path) -> None:
    config = write_demo(tmp_path / "one", servers=1, secure=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _add_metrics(config, {"alpha": f"127.0.0.1:{port}"})
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "zbroker.broker",
                "run",
                "--config",
                str(config),
                "--node",
                "alpha",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("zbroker: node alpha cannot serve its metrics on 127.0.0.1:"), last
    assert f":{port}: Address already in use" in last
