"""Two sites: two triads on their own hosts, one client whose license path names both.

Each triad's nodes are network namespaces (``zbroker.clients.testing.hosts``), site 1 at
10.77.1.x and site 2 at 10.77.2.x; the client is a process on the clients' host. It is
served by the first site; when the first site loses its quorum (every link between its
nodes cut) it is served by the second; each site's ledger holds exactly the seats
checked out there, and gives them back when they are checked in. Needs root.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from zbroker.clients.testing.hosts import PREFIX, HostClient, Hosts, HostTriad, Observer, namespaces
from zbroker.clients.testing.kit import wait_for

pytestmark = pytest.mark.integration

USER = "site-user"
SETTINGS = {"heartbeat_interval": 0.05, "peer_timeout": 0.3}


def _in_use(triad: HostTriad, feature: str) -> int:
    return int(triad.feature(feature)["in_use"])


def _mine(triad: HostTriad, feature: str) -> list[tuple[str, int]]:
    return [h for h in triad.holders(feature) if h[0] == USER]


def test_a_client_moves_to_the_second_site_when_the_first_has_no_quorum(tmp_path: Path) -> None:
    with Hosts() as hosts:
        observer = Observer(hosts)
        first = HostTriad(tmp_path / "a", hosts, site=1, settings=SETTINGS, observer=observer)
        second = HostTriad(tmp_path / "b", hosts, site=2, settings=SETTINGS, observer=observer)
        try:
            first.start()
            second.start()
            first.wait_for_primary(timeout=20)
            second.wait_for_primary(timeout=20)
            assert first.endpoints[0].startswith("tcp://10.77.1.")
            assert second.endpoints[0].startswith("tcp://10.77.2.")
            path = f"{first.license}:{second.license}"
            with HostClient(hosts, path, user=USER, timeout=4.0) as client:
                there = client.checkout("cad", 3)
                assert _mine(first, "cad") == [(USER, 3)]
                assert _in_use(second, "cad") == 0

                for a, b in itertools.combinations(first.names, 2):
                    first.cut(a, b)  # every node of site 1 alone: no quorum anywhere
                wait_for(lambda: first.primary() is None, 10, "site 1 to stop serving")
                here = client.checkout("cad", 2)
                assert _mine(second, "cad") == [(USER, 2)]
                assert _in_use(second, "cad") == 2
                assert _mine(first, "cad") == [(USER, 3)]  # still held on site 1's ledger

                for a, b in itertools.combinations(first.names, 2):
                    first.heal(a, b)
                first.wait_for_primary(timeout=20)
                assert _mine(first, "cad") == [(USER, 3)]  # the quorum lost nothing
                again = client.checkout("cad", 1)  # site 1 serves again: it comes first
                assert _mine(first, "cad") == [(USER, 1), (USER, 3)]
                assert _in_use(second, "cad") == 2

                for grant in (there, here, again):
                    client.checkin(grant)
                wait_for(lambda: _in_use(first, "cad") == 0, 10, "site 1's seats back")
                wait_for(lambda: _in_use(second, "cad") == 0, 10, "site 2's seats back")
        except BaseException:
            print(first.log_text(), second.log_text())
            raise
        finally:
            first.stop()
            second.stop()
            observer.close()
    assert not [n for n in namespaces() if n.startswith(f"{PREFIX}{os.getpid()}-")], "left behind"
