"""``free_ports`` never hands out a port it handed out before: a triad's whose nodes
are not started yet (the bench writes every triad's config before it starts any), or
are stopped, which the OS sees as free again (tests/test_metrics_prometheus.py gives a
restarted triad metrics listeners that way)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from zbroker.broker import demo
from zbroker.broker.demo import free_ports

pytestmark = pytest.mark.unit


def test_free_ports_are_distinct_and_none_is_one_handed_out_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    handed_out = set(range(low, (low + high) // 2))  # half the range the OS draws from
    monkeypatch.setattr(demo, "_HANDED_OUT", set(handed_out))
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert not set(ports) & handed_out


class _Reoffering:
    """The OS's side of ``bind(port 0)`` as it may well behave: a port closed again is
    free, and is offered again. Here each call starts over at the same ports."""

    AF_INET, SOCK_STREAM = socket.AF_INET, socket.SOCK_STREAM

    def __init__(self) -> None:
        self.next = 40_001

    def socket(self, *_: object) -> _Reoffering._Bound:
        return self._Bound(self)

    class _Bound:
        def __init__(self, os_: _Reoffering) -> None:
            self.os = os_

        def bind(self, _: object) -> None:
            self.port, self.os.next = self.os.next, self.os.next + 1

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

        def close(self) -> None:
            self.os.next = 40_001  # closed: free again, and offered first


def test_no_port_is_handed_out_twice_even_when_the_os_offers_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two triads whose configs are written before either starts: the first's ports are
    # not bound yet when the second's are chosen (the bench's throughput phase does this).
    monkeypatch.setattr(demo, "socket", _Reoffering())
    monkeypatch.setattr(demo, "_HANDED_OUT", set())  # none handed out by earlier tests
    first, second = free_ports(3), free_ports(3)
    assert first == [40_001, 40_002, 40_003]
    assert not set(first) & set(second)
