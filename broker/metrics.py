"""A node's Prometheus metrics: the loop writes a snapshot, scrapes only read it.

Theory of operation. The node's loop is the only writer and the HTTP thread of
``prometheus_client`` the only reader, and they share one thing: ``Metrics._families``,
a tuple of finished metric families that the loop replaces whole (one reference
assignment, atomic under the GIL). So a scrape takes no lock the loop takes, calls
nothing of the node and costs the loop nothing, however often it comes; and the loop
pays for its metrics once a second, not per request:

- ``observe(latencies)``: each cycle, the request latencies of its ``Ready`` are counted
  into histogram buckets (plain ints, no lock: the loop alone touches them);
- ``refresh(core, now)``: each cycle, and about once a second (``REFRESH_EVERY``) it reads
  the core's status report, its tallies and its session count and builds the next
  snapshot. Between two refreshes a scrape sees the previous one: at most a second old,
  which ``zbroker_metrics_refreshed_timestamp_seconds`` tells (a node whose loop is stuck
  stops moving it: docs/metrics.md's ``ZbrokerNodeStalled``).

Every series carries ``node``, the answering node's name, so that a dashboard names
nodes as the triad does, whatever address Prometheus scraped. Every node reports its
own state, primary or not: a backup's features are those of its replica of the ledger
(it knows no queue: 0), its counters stay at 0 since only a primary decides.

The exposition is ``prometheus_client``'s own (text or OpenMetrics, gzip on request), on
a registry of the node's own rather than the library's global one, with the process
collector beside ours (memory, CPU, open files of the node's process).
"""

from __future__ import annotations

import bisect
import datetime
import logging
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

from zbroker.broker.config import ConfigError
from zbroker.broker.model import Now, Reason
from zbroker.broker.tallies import CHECKIN_HOWS, UNKNOWN_FEATURE

log = logging.getLogger("zbroker.metrics")
REFRESH_EVERY = 1.0  # seconds between two snapshots
# Scrapes answered at once, each in a thread of the node's process, and how long one
# connection may take. prometheus_client's own server gives every connection a thread
# for as long as it stays open: 400 connections at once to the metrics port (which needs
# no key) took the GIL from the node's loop long enough to cost an election, and 800 slow
# ones held 800 threads. Past MAX_SCRAPES a connection is closed unanswered (a scraper
# tries again at its next interval); a slow one is dropped after SCRAPE_TIMEOUT.
MAX_SCRAPES = 4
SCRAPE_TIMEOUT = 5.0
# Upper bounds of the latency buckets, seconds: a checkout takes about a millisecond at
# low load (ZMQ-NOTES.md) and p99 targets are tens of milliseconds; above a second is a
# failover or a stalled disk.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# The roles a node says of itself (docs/protocol.md); every one is a series, 1 for the
# current role, so that a query never meets a missing series at a change of role.
ROLES = ("primary", "backup", "candidate", "recovering")
DENIAL_REASONS = tuple(v for k, v in vars(Reason).items() if k.isupper() and isinstance(v, str))
_DAY = 86_400.0


class MetricsError(ConfigError):
    """The metrics listener cannot be opened: its address is taken or not this host's."""


class MetricsSource(Protocol):
    """What the metrics read of a node core (``zbroker.broker.core.NodeCore``), once a second."""

    @property
    def tallies(self) -> Mapping[tuple[str, ...], int]:
        """Decisions since start (broker/tallies.py): ("checkout", feature),
        ("checkin", how, feature), ("denied", reason, feature)."""
        ...

    @property
    def session_count(self) -> int:
        """Sessions open in this node's ledger."""
        ...

    def report(self, now: Now) -> dict[str, Any]:
        """The status report of docs/protocol.md, as a status request is answered."""
        ...


class Metrics:
    """The metrics of node ``node``: fed by its loop, served on ``listen`` (host, port) by
    ``serve``'s thread."""

    def __init__(
        self, node: str, listen: tuple[str, int], *, refresh_every: float = REFRESH_EVERY
    ) -> None:
        self.node = node
        self.listen = listen
        self.refresh_every = refresh_every
        self._families: tuple[Metric, ...] = ()  # replaced whole by refresh, read by scrapes
        self.registry = CollectorRegistry()
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        self._next_refresh = float("-inf")
        self._bucket_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: above all
        self._latency_sum = 0.0
        self._server: WSGIServer | None = None

    # --- the loop's side
    def observe(self, latencies: Iterable[float]) -> None:
        """Count request latencies (seconds) into the histogram; the next refresh shows them."""
        counts, bounds = self._bucket_counts, LATENCY_BUCKETS
        for seconds in latencies:
            counts[bisect.bisect_left(bounds, seconds)] += 1  # le: bound >= seconds
            self._latency_sum += seconds

    def refresh(self, source: MetricsSource, now: Now) -> None:
        """Build the next snapshot from ``source`` if the last is ``refresh_every`` old."""
        if now.mono < self._next_refresh:
            return
        self._next_refresh = now.mono + self.refresh_every
        self._families = tuple(
            self._build(source.report(now), source.tallies, source.session_count, now)
        )

    # --- the HTTP side
    def collect(self) -> Iterator[Metric]:
        """The registry's call, in the scrape's thread: the last snapshot, as it is."""
        return iter(self._families)

    def serve(self) -> None:
        """Serve the metrics over HTTP on ``listen`` from a thread of its own.

        MetricsError (a ConfigError: ``zbroker run`` exits 2 with its one line) when the
        port is taken or the host is not this machine's.
        """
        host, port = self.listen
        try:
            self._server = _serve(host.strip("[]"), port, make_wsgi_app(self.registry))
        except OSError as exc:
            raise MetricsError(
                f"node {self.node} cannot serve its metrics on {host}:{port}: {exc.strerror}; "
                "is another program using the port, or is the host not this machine's?"
            ) from None
        log.info("node %s serves its metrics at http://%s:%d/metrics", self.node, host, port)

    def close(self) -> None:
        """Stop serving. Takes up to half a second (the server thread notices between two
        waits of ``socketserver``'s poll interval): call it once nothing else waits."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- the snapshot
    def _build(
        self,
        report: Mapping[str, Any],
        tallies: Mapping[tuple[str, ...], int],
        sessions: int,
        now: Now,
    ) -> Iterator[Metric]:
        node = self.node
        yield from _node_families(node, report, sessions)
        yield from _feature_families(node, report.get("features", ()), now)
        features = [str(f.get("name", "")) for f in report.get("features", ())]
        yield from _tally_families(node, tallies, features)
        histogram = HistogramMetricFamily(
            "zbroker_request_latency_seconds",
            "Seconds from the loop cycle a client request whose answer waits for the quorum "
            "(open, checkout, checkin, close) arrived in to the one its answer left in; only "
            "a primary answers them.",
            labels=["node"],
        )
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self._bucket_counts, strict=True):
            cumulative += count
            buckets.append((_le(bound), cumulative))
        histogram.add_metric([node], buckets, self._latency_sum)
        yield histogram
        yield _gauge(
            "zbroker_metrics_refreshed_timestamp_seconds",
            "Unix time of this snapshot: the node refreshes it about once a second from its "
            "loop, so an old one means a stalled loop.",
            node,
            now.wall,
        )


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _gauge(name: str, documentation: str, node: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["node"])
    family.add_metric([node], value)
    return family


def _node_families(node: str, report: Mapping[str, Any], sessions: int) -> Iterator[Metric]:
    entries = list(report.get("nodes", ()))
    own: Mapping[str, Any] = entries[0] if entries else {}
    info = GaugeMetricFamily(
        "zbroker_node_info",
        "Always 1; its labels say the node's security mode (curve or plain).",
        labels=["node", "mode"],
    )
    info.add_metric([node, str(report.get("mode", ""))], 1)
    yield info
    role = GaugeMetricFamily(
        "zbroker_node_role",
        "1 for the role the node says it has now (primary, backup, candidate, recovering), "
        "0 for the others.",
        labels=["node", "role"],
    )
    current = str(own.get("role", ""))
    for name in ROLES if current in ROLES else (*ROLES, current):
        role.add_metric([node, name], 1 if name == current else 0)
    yield role
    for name, field, documentation in (
        ("zbroker_node_term", "term", "The node's election term."),
        ("zbroker_node_last_index", "last", "Index of the last delta in the node's log."),
        (
            "zbroker_node_commit_index",
            "commit",
            "Index of the last delta known committed.",
        ),
    ):
        if isinstance(own.get(field), int):
            yield _gauge(name, documentation, node, own[field])
    yield _gauge(
        "zbroker_node_serving",
        "1 on a primary that has its quorum and grants now, 0 on every other node (a triad "
        "none of whose nodes says 1 grants nothing).",
        node,
        1 if own.get("serving") else 0,
    )
    yield _gauge(
        "zbroker_node_peers_heard",
        "How many of the other nodes this node hears now (within peer_timeout).",
        node,
        len(own.get("peers", ())),
    )
    yield _gauge("zbroker_sessions", "Client sessions open in this node's ledger.", node, sessions)
    up = GaugeMetricFamily(
        "zbroker_peer_up",
        "1 when this node heard peer `peer` within peer_timeout, 0 when it counts it down.",
        labels=["node", "peer"],
    )
    lag = GaugeMetricFamily(
        "zbroker_replication_lag_deltas",
        "This node's last log index minus the commit index peer `peer` last announced in a "
        "heartbeat: on the primary, how far a backup is behind (a few batches under load "
        "is normal); absent while the peer is down.",
        labels=["node", "peer"],
    )
    last = own.get("last")
    for other in entries[1:]:
        peer = str(other.get("name", ""))
        down = other.get("role") == "down"
        up.add_metric([node, peer], 0 if down else 1)
        commit = other.get("commit")
        if not down and isinstance(last, int) and isinstance(commit, int):
            lag.add_metric([node, peer], max(0, last - commit))
    yield up
    yield lag


def _feature_families(node: str, features: Iterable[Any], now: Now) -> Iterator[Metric]:
    labels = ["node", "feature"]
    issued = GaugeMetricFamily(
        "zbroker_feature_seats_issued",
        "Seats of the feature's license lines that have not expired today.",
        labels=labels,
    )
    in_use = GaugeMetricFamily(
        "zbroker_feature_seats_in_use", "Seats of the feature granted now.", labels=labels
    )
    reserved = GaugeMetricFamily(
        "zbroker_feature_seats_reserved_unused",
        "Seats the options file's RESERVE lines keep for their users and hosts that none "
        "of them holds now: no one else may take them (they are not in use).",
        labels=labels,
    )
    lingering = GaugeMetricFamily(
        "zbroker_feature_seats_lingering",
        "Seats checked in but held on by the options file's LINGER until it ends (in use).",
        labels=labels,
    )
    borrowed = GaugeMetricFamily(
        "zbroker_feature_seats_borrowed",
        "Seats borrowed (BORROW) until the end of their borrow period (in use).",
        labels=labels,
    )
    queued = GaugeMetricFamily(
        "zbroker_feature_queued",
        "Checkouts waiting in the feature's queue; the queue lives on the primary, every "
        "other node says 0.",
        labels=labels,
    )
    expiry = GaugeMetricFamily(
        "zbroker_feature_expiry_days",
        "Days (fractional, UTC) until the next of a pool's dated lines stops granting, at "
        "the end of its expiry date; no series for a pool whose lines are all permanent.",
        labels=["node", "feature", "version"],
    )
    for feature in features:
        name = str(feature.get("name", ""))
        issued.add_metric([node, name], feature.get("total", 0))
        in_use.add_metric([node, name], feature.get("in_use", 0))
        reserved.add_metric(
            [node, name], sum(int(r.get("unused", 0)) for r in feature.get("reservations", ()))
        )
        lingering.add_metric([node, name], feature.get("lingering", 0))
        borrowed.add_metric([node, name], feature.get("borrowed", 0))
        queued.add_metric([node, name], feature.get("queued", 0))
        for pool in feature.get("versions", ()):
            days = _days_left(pool.get("expires"), now)
            if days is not None:
                expiry.add_metric([node, name, str(pool.get("version", ""))], days)
    yield from (issued, in_use, reserved, lingering, borrowed, queued, expiry)


def _days_left(expires: object, now: Now) -> float | None:
    """Days from ``now`` to the end (UTC) of the ISO date ``expires``; None if no date."""
    if not isinstance(expires, str):
        return None
    try:
        last_day = datetime.date.fromisoformat(expires)
    except ValueError:
        return None
    end = datetime.datetime.combine(
        last_day + datetime.timedelta(days=1), datetime.time(), tzinfo=datetime.UTC
    )
    return (end.timestamp() - now.wall) / _DAY


def _tally_families(
    node: str, tallies: Mapping[tuple[str, ...], int], features: Iterable[str]
) -> Iterator[Metric]:
    labels = ["node", "feature"]
    checkouts = CounterMetricFamily(
        "zbroker_checkouts",
        "Checkouts of the feature granted by this node as primary since it started, counted "
        "once committed.",
        labels=labels,
    )
    checkins = CounterMetricFamily(
        "zbroker_checkins",
        "Grants of the feature checked in by this node as primary since it started, by how: "
        "release (checked in), close (its session closed), expire (its session's lease ran "
        "out), return (a borrow returned early), timeout (idle past TIMEOUT), removed "
        "(zbroker remove).",
        labels=[*labels, "how"],
    )
    denials = CounterMetricFamily(
        "zbroker_denials",
        'Checkouts (and checkins, feature "") denied by this node as primary since it '
        "started, by reason (docs/protocol.md, Denial reasons).",
        labels=[*labels, "reason"],
    )
    # Every known label value of every feature from the start: a counter that appears
    # at its first increment hides that increment from rate().
    out = dict.fromkeys(features, 0)
    ins = {(f, how): 0 for f in out for how in CHECKIN_HOWS}
    denied = {(f, reason): 0 for f in out for reason in DENIAL_REASONS}
    denied[UNKNOWN_FEATURE, Reason.NO_SUCH_FEATURE] = 0
    for key, count in tallies.items():
        if key[0] == "checkout" and len(key) == 2:
            out[key[1]] = count
        elif key[0] == "checkin" and len(key) == 3:
            ins[key[2], key[1]] = count
        elif key[0] == "denied" and len(key) == 3:
            denied[key[2], key[1]] = count
    for feature, count in out.items():
        checkouts.add_metric([node, feature], count)
    for (feature, how), count in ins.items():
        checkins.add_metric([node, feature, how], count)
    for (feature, reason), count in denied.items():
        denials.add_metric([node, feature, reason], count)
    yield from (checkouts, checkins, denials)


class _ScrapeHandler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT  # the connection's socket timeout: a slow client is dropped

    def log_message(self, format: str, *args: Any) -> None:
        """Nothing: a scrape a second would fill the node's log."""


class _ScrapeServer(ThreadingWSGIServer):
    """prometheus_client's threading server, with at most MAX_SCRAPES handled at once."""

    request_queue_size = 128  # the listen backlog: past socketserver's 5, a burst is refused

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.slots = threading.BoundedSemaphore(MAX_SCRAPES)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # closed unanswered: every slot is busy
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Nothing: socketserver prints a traceback for each scrape that timed out or
        hung up, which a flood of them would pour into the node's log."""


def _serve(host: str, port: int, app: Any) -> WSGIServer:
    """``app`` served on ``host:port`` from a daemon thread; OSError when it cannot bind."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_ScrapeServer):
        address_family = family  # IPv6 hosts too: HTTPServer binds AF_INET otherwise

    server = make_server(str(address[0]), port, app, Server, handler_class=_ScrapeHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
