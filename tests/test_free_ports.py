"""``free_ports`` never hands out a port it is told to avoid: the ports of a stopped
triad's config, which the OS sees as free again (tests/test_metrics_prometheus.py gives
a restarted triad metrics listeners that way)."""

from __future__ import annotations

from pathlib import Path

import pytest

from zbroker.broker.demo import free_ports

pytestmark = pytest.mark.unit


def test_free_ports_are_distinct_and_none_is_one_to_avoid() -> None:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    avoid = set(range(low, (low + high) // 2))  # half the range the OS draws from
    ports = free_ports(8, avoid=avoid)
    assert len(set(ports)) == 8
    assert not set(ports) & avoid
