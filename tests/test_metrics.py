"""broker/metrics.py against fake reports (no node), and the config's ``metrics`` key.

What the loop calls (``observe``, ``refresh``) and what a scrape reads (the registry) are
driven directly: values come out as the report says, a refresh happens at most once per
``refresh_every``, scrapes never reach the node, and a backup reports its own state.
"""

from __future__ import annotations

import datetime
import socket
import threading
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from zbroker.broker import metrics as metrics_module
from zbroker.broker.config import ConfigError, load_config
from zbroker.broker.demo import free_ports, write_demo
from zbroker.broker.metrics import DENIAL_REASONS, LATENCY_BUCKETS, MAX_SCRAPES, ROLES, Metrics
from zbroker.broker.model import Now
from zbroker.broker.tallies import CHECKIN_HOWS

pytestmark = pytest.mark.unit

# 2026-11-30 12:00 UTC: the expiry cases below count from here.
NOON = datetime.datetime(2026, 11, 30, 12, tzinfo=datetime.UTC).timestamp()


def _entry(name: str, role: str, term: int | None, last: int | None, commit: int | None) -> Any:
    return {"name": name, "endpoint": f"tcp://127.0.0.1:{len(name)}", "role": role,
            "term": term, "last": last, "commit": commit}  # fmt: skip


def primary_report() -> dict[str, Any]:
    own = _entry("alpha", "primary", 3, 120, 118) | {"peers": ["beta"], "serving": True}
    return {
        "node": "alpha",
        "mode": "curve",
        "nodes": [own, _entry("beta", "backup", 3, 117, 110), _entry("gamma", "down", *[None] * 3)],
        "features": [
            {"name": "cad", "total": 15, "in_use": 12, "queued": 2, "versions": [
                {"version": "2.0", "total": 10, "in_use": 8, "expires": "2026-12-30"},
                {"version": "3.0", "total": 5, "in_use": 4, "expires": None}],
             "lingering": 2, "borrowed": 1,
             "reservations": [{"count": 3, "kind": "GROUP", "name": "eng", "unused": 1},
                              {"count": 2, "kind": "USER", "name": "ann", "unused": 0}]},
            {"name": "solver", "total": 2, "in_use": 0, "queued": 0, "versions": [
                {"version": "1.5", "total": 2, "in_use": 0, "expires": None}]},
        ],
    }  # fmt: skip


def backup_report() -> dict[str, Any]:
    own = _entry("beta", "backup", 3, 117, 110) | {"peers": ["alpha", "gamma"], "serving": False}
    report = primary_report()
    report["node"] = "beta"
    report["nodes"] = [own, _entry("alpha", "primary", 3, 120, 118),
                       _entry("gamma", "backup", 3, 117, 110)]  # fmt: skip
    for feature in report["features"]:
        feature["queued"] = 0  # the queue lives on the primary alone
    return report


class FakeCore:
    """What the metrics read of a NodeCore, counting how often the report is asked for."""

    def __init__(
        self, report: dict[str, Any], tallies: Counter[tuple[str, ...]] | None = None
    ) -> None:
        self.the_report = report
        self.tallies: Counter[tuple[str, ...]] = tallies if tallies is not None else Counter()
        self.session_count = 7
        self.reports = 0

    def report(self, now: Now) -> dict[str, Any]:
        self.reports += 1
        return self.the_report


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def refreshed(core: FakeCore, node: str = "alpha", at: float = 100.0) -> Metrics:
    metrics = Metrics(node, ("127.0.0.1", 0))
    metrics.refresh(core, Now(at, NOON))
    return metrics


def test_a_primary_reports_its_node_its_peers_and_its_features() -> None:
    m = refreshed(FakeCore(primary_report()))
    node = {"node": "alpha"}
    assert value(m, "zbroker_node_info", mode="curve", **node) == 1
    assert {r: value(m, "zbroker_node_role", role=r, **node) for r in ROLES} == {
        "primary": 1, "backup": 0, "candidate": 0, "recovering": 0}  # fmt: skip
    assert value(m, "zbroker_node_term", **node) == 3
    assert value(m, "zbroker_node_last_index", **node) == 120
    assert value(m, "zbroker_node_commit_index", **node) == 118
    assert value(m, "zbroker_node_serving", **node) == 1
    assert value(m, "zbroker_node_peers_heard", **node) == 1
    assert value(m, "zbroker_sessions", **node) == 7
    # beta is heard: its lag is our last minus its commit; gamma is down: no lag at all
    assert value(m, "zbroker_peer_up", peer="beta", **node) == 1
    assert value(m, "zbroker_peer_up", peer="gamma", **node) == 0
    assert value(m, "zbroker_replication_lag_deltas", peer="beta", **node) == 120 - 110
    assert value(m, "zbroker_replication_lag_deltas", peer="gamma", **node) is None
    cad = {"feature": "cad", **node}
    assert value(m, "zbroker_feature_seats_issued", **cad) == 15
    assert value(m, "zbroker_feature_seats_in_use", **cad) == 12
    assert value(m, "zbroker_feature_queued", **cad) == 2
    assert value(m, "zbroker_feature_seats_reserved_unused", **cad) == 1 + 0
    assert value(m, "zbroker_feature_seats_lingering", **cad) == 2
    assert value(m, "zbroker_feature_seats_borrowed", **cad) == 1
    solver = {"feature": "solver", **node}
    assert value(m, "zbroker_feature_seats_reserved_unused", **solver) == 0
    assert value(m, "zbroker_feature_seats_lingering", **solver) == 0
    assert value(m, "zbroker_feature_seats_issued", feature="solver", **node) == 2
    assert value(m, "zbroker_metrics_refreshed_timestamp_seconds", **node) == NOON


def test_expiry_counts_to_the_end_of_the_last_day_and_permanent_pools_have_none() -> None:
    m = refreshed(FakeCore(primary_report()))
    # 2026-12-30 grants through that day: 30 days and 12 hours from noon on 2026-11-30
    cad = {"node": "alpha", "feature": "cad"}
    assert value(m, "zbroker_feature_expiry_days", version="2.0", **cad) == pytest.approx(30.5)
    assert value(m, "zbroker_feature_expiry_days", version="3.0", **cad) is None
    text = generate_latest(m.registry).decode()
    assert 'feature="solver"' not in "".join(
        line for line in text.splitlines() if line.startswith("zbroker_feature_expiry_days")
    )


def test_a_backup_reports_its_own_state() -> None:
    m = refreshed(FakeCore(backup_report()), node="beta")
    node = {"node": "beta"}
    assert value(m, "zbroker_node_role", role="backup", **node) == 1
    assert value(m, "zbroker_node_role", role="primary", **node) == 0
    assert value(m, "zbroker_node_serving", **node) == 0
    assert value(m, "zbroker_node_peers_heard", **node) == 2
    assert value(m, "zbroker_node_commit_index", **node) == 110
    # its replica of the ledger: the same seats in use; no queue; nothing decided here
    assert value(m, "zbroker_feature_seats_in_use", feature="cad", **node) == 12
    assert value(m, "zbroker_feature_queued", feature="cad", **node) == 0
    assert value(m, "zbroker_checkouts_total", feature="cad", **node) == 0
    # its own last (117) ahead of nobody: the primary's announced commit is past it
    assert value(m, "zbroker_replication_lag_deltas", peer="alpha", **node) == 0


def test_a_role_outside_the_known_ones_still_shows() -> None:
    report = primary_report()
    report["nodes"][0]["role"] = "stepping_down"
    m = refreshed(FakeCore(report))
    assert value(m, "zbroker_node_role", node="alpha", role="stepping_down") == 1
    assert all(value(m, "zbroker_node_role", node="alpha", role=r) == 0 for r in ROLES)


def test_tallies_become_counters_per_feature_with_every_known_label_from_the_start() -> None:
    tallies = Counter({("checkout", "cad"): 5, ("checkin", "release", "cad"): 3,
                       ("checkin", "expire", "cad"): 1, ("checkin", "timeout", "solver"): 2,
                       ("denied", "no_seats", "cad"): 4, ("denied", "new_reason", "cad"): 2,
                       ("denied", "not_held", ""): 1, ("checkout", "gone"): 1})  # fmt: skip
    m = refreshed(FakeCore(primary_report(), tallies))
    cad, solver = {"node": "alpha", "feature": "cad"}, {"node": "alpha", "feature": "solver"}
    assert value(m, "zbroker_checkouts_total", **cad) == 5
    assert value(m, "zbroker_checkouts_total", **solver) == 0
    assert value(m, "zbroker_checkouts_total", node="alpha", feature="gone") == 1
    assert value(m, "zbroker_checkins_total", how="release", **cad) == 3
    assert value(m, "zbroker_checkins_total", how="expire", **cad) == 1
    assert value(m, "zbroker_checkins_total", how="close", **cad) == 0
    assert value(m, "zbroker_checkins_total", how="timeout", **solver) == 2
    assert value(m, "zbroker_denials_total", reason="no_seats", **cad) == 4
    assert value(m, "zbroker_denials_total", reason="new_reason", **cad) == 2
    assert value(m, "zbroker_denials_total", node="alpha", feature="", reason="not_held") == 1
    for feature in (cad, solver):
        for reason in DENIAL_REASONS:
            assert value(m, "zbroker_denials_total", reason=reason, **feature) is not None
        for how in CHECKIN_HOWS:
            assert value(m, "zbroker_checkins_total", how=how, **feature) is not None


def test_latencies_are_counted_into_cumulative_buckets() -> None:
    m = Metrics("alpha", ("127.0.0.1", 0))
    m.observe([0.0001, 0.0005, 0.0007, 0.003])
    m.observe([])
    m.observe([3.0])
    m.refresh(FakeCore(primary_report()), Now(1.0, NOON))

    def bucket(le: str) -> float | None:
        return value(m, "zbroker_request_latency_seconds_bucket", node="alpha", le=le)

    assert bucket("0.0005") == 2  # le: 0.0005 itself counts in its bucket
    assert bucket("0.001") == 3
    assert bucket("0.005") == 4
    assert bucket(repr(LATENCY_BUCKETS[-1])) == 4
    assert bucket("+Inf") == 5
    assert value(m, "zbroker_request_latency_seconds_count", node="alpha") == 5
    assert value(m, "zbroker_request_latency_seconds_sum", node="alpha") == pytest.approx(3.0043)


def test_the_loop_refreshes_at_most_once_a_second_and_scrapes_never_reach_the_core() -> None:
    core = FakeCore(primary_report(), Counter({("checkout", "cad"): 1}))
    m = Metrics("alpha", ("127.0.0.1", 0), refresh_every=1.0)
    cad = {"node": "alpha", "feature": "cad"}
    assert value(m, "zbroker_checkouts_total", **cad) is None  # nothing before one
    m.refresh(core, Now(10.0, NOON))
    core.tallies["checkout", "cad"] += 1
    for mono in (10.1, 10.5, 10.99):
        m.refresh(core, Now(mono, NOON))
    assert core.reports == 1
    for _ in range(50):  # scrapes read the snapshot; none asks the core for anything
        assert value(m, "zbroker_checkouts_total", **cad) == 1
        generate_latest(m.registry)
    assert core.reports == 1
    m.refresh(core, Now(11.0, NOON))
    assert core.reports == 2
    assert value(m, "zbroker_checkouts_total", **cad) == 2


def test_a_feature_gone_from_the_report_is_gone_from_the_metrics() -> None:
    core = FakeCore(primary_report())
    m = refreshed(core)
    assert value(m, "zbroker_feature_seats_issued", node="alpha", feature="solver") == 2
    core.the_report = primary_report()
    core.the_report["features"] = core.the_report["features"][:1]
    m.refresh(core, Now(200.0, NOON))
    assert value(m, "zbroker_feature_seats_issued", node="alpha", feature="solver") is None
    assert value(m, "zbroker_feature_seats_issued", node="alpha", feature="cad") == 15


def test_the_process_collector_is_on_the_nodes_own_registry_only() -> None:
    from prometheus_client import REGISTRY

    m = refreshed(FakeCore(primary_report()))
    assert value(m, "process_resident_memory_bytes") is not None
    assert REGISTRY.get_sample_value("zbroker_node_term", {"node": "alpha"}) is None


# --- the config key ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo(tmp_path_factory.mktemp("metrics") / "demo", secure=False)


def _with_metrics(demo: Path, listeners: dict[str, str], name: str) -> Path:
    lines = []
    for line in demo.read_text().splitlines():
        lines.append(line)
        node = line.removeprefix("[nodes.").removesuffix("]")
        if line.startswith("[nodes.") and node in listeners:
            lines.append(f'metrics = "{listeners[node]}"')
    path = demo.parent / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_metrics_key_is_optional_per_node(demo: Path) -> None:
    listeners = {"alpha": "127.0.0.1:9101", "beta": "[::1]:9102"}
    config = load_config(_with_metrics(demo, listeners, "ok"))
    assert config.node("alpha").metrics == ("127.0.0.1", 9101)
    assert config.node("beta").metrics == ("[::1]", 9102)
    assert config.node("gamma").metrics is None


def test_a_metrics_listener_on_another_endpoints_port_is_refused(demo: Path) -> None:
    config = load_config(demo)
    peer = config.node("beta").peer.removeprefix("tcp://")
    client = config.node("gamma").client.removeprefix("tcp://")
    cases = {
        "peer": ({"alpha": peer}, ("metrics of alpha", "peer of beta")),
        "client": ({"gamma": client}, ("metrics of gamma", "client endpoint (SERVER line)")),
        "twice": ({"alpha": "127.0.0.1:9101", "beta": "127.0.0.1:9101"},
                  ("metrics of alpha", "metrics of beta")),
    }  # fmt: skip
    for name, (listeners, words) in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(_with_metrics(demo, listeners, name))
        message = str(info.value)
        assert all(word in message for word in words), message
        assert "each endpoint needs its own port" in message and "\n" not in message


def test_scrapes_are_answered_a_few_at_a_time_and_slow_ones_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The metrics port needs no key: 400 connections at once, each given a thread of the
    # node's process for as long as it stayed open, took the loop's GIL and an election.
    monkeypatch.setattr(metrics_module._ScrapeHandler, "timeout", 0.5)
    (port,) = free_ports(1)
    m = Metrics("alpha", ("127.0.0.1", port))
    m.serve()
    before = threading.active_count()
    slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
    try:
        # Each is either given one of the few slots or closed unanswered at once.
        for conn in slow[MAX_SCRAPES:]:
            assert conn.recv(1) == b""
        assert threading.active_count() <= before + MAX_SCRAPES
        # The slow ones holding slots are dropped at their timeout; then a scrape is served.
        for conn in slow[:MAX_SCRAPES]:
            assert conn.recv(1) == b""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert b"process_resident_memory_bytes" in answer.read()
    finally:
        for conn in slow:
            conn.close()
        m.close()
