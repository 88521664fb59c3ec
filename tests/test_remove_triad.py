"""``zbroker remove`` and ``zbroker down --node`` on a live triad: the seats come back on
all three nodes, the holder's library hears which grant was removed and why, and one
node stops alone."""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from zbroker import LicenseClient
from zbroker.broker.cli import config_curve
from zbroker.broker.status import query_nodes
from zbroker.clients.grant import Grant
from zbroker.clients.testing import LocalTriad, settled, wait_for

pytestmark = pytest.mark.integration


def zbroker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zbroker.broker", *args], capture_output=True, text=True, timeout=60
    )


def checkout(client: LicenseClient, feature: str) -> Grant:
    """A checkout across a failover (``settled``)."""
    grant: Grant = settled(
        lambda: client.checkout(feature, timeout=5), f"a checkout of {feature}", 15
    )
    return grant


def seen_by(triad: LocalTriad, name: str, feature: str) -> dict[str, Any] | None:
    """``feature`` (with its holders) as node ``name`` alone reports it; None: no answer."""
    node = triad.config.node(name)
    report = query_nodes(
        [(name, node.client)], timeout=1.0, curve=config_curve(triad.config, admin=False)
    )
    found = [f for f in report["features"] if f["name"] == feature]
    return found[0] if found else None


def test_remove_by_user_frees_the_seats_everywhere_and_the_library_hears_removed(
    make_triad: Callable[..., LocalTriad],
) -> None:
    triad = make_triad(servers=3, lease=3.0, settings={"min_remove": 0.05})
    triad.wait_for_primary()
    lost: list[Grant] = []
    heard = threading.Lock()

    def on_lost(grants: list[Grant]) -> None:
        with heard:
            lost.extend(grants)

    with (
        LicenseClient(triad.endpoints, user="ann", on_lost=on_lost) as ann,
        LicenseClient(triad.endpoints, user="bob") as bob,
    ):
        mine = [checkout(ann, "cad"), checkout(ann, "cad")]
        kept = checkout(bob, "cad")
        done = zbroker("remove", "--config", str(triad.config_path), "--user", "ann")
        assert done.returncode == 0, done.stderr
        for grant in mine:
            assert f"removed grant {grant.id}" in done.stdout
        assert "2 grant(s) of user 'ann' removed" in done.stdout

        def freed_on(name: str) -> bool:
            cad = seen_by(triad, name, "cad")
            holders = cad and [(h["user"], h["grant"]) for h in cad["holders"]]
            return cad is not None and cad["in_use"] == 1 and holders == [("bob", kept.id)]

        for name in triad.names:
            wait_for(functools.partial(freed_on, name), 10, f"the seats free on {name}")

        def told() -> bool:
            with heard:
                return len(lost) == 2

        wait_for(told, 10, "on_lost with both removed grants")  # at the next heartbeat
        with heard:
            assert sorted(g.id for g in lost) == sorted(g.id for g in mine)
            assert all(g.lost and g.lost_reason == "removed" for g in lost)
        assert kept.safe
        ann.checkin(mine[0])  # a lost grant: nothing to do
        again = checkout(ann, "cad")  # the session lives on
        assert again.safe
        unknown = zbroker("remove", "--config", str(triad.config_path), "--grant", "999999")
        assert unknown.returncode == 1 and "grant 999999 is not out" in unknown.stdout
        with heard:
            assert len(lost) == 2  # each grant reported once


def test_down_with_node_stops_that_node_only(make_triad: Callable[..., LocalTriad]) -> None:
    triad = make_triad(servers=3, lease=3.0)
    triad.wait_for_primary()
    done = zbroker("down", "--config", str(triad.config_path), "--node", "gamma")
    assert done.returncode == 0, done.stderr
    assert "gamma: stopping" in done.stdout and "stopped gamma" in done.stdout
    wait_for(lambda: not triad.alive("gamma"), 10, "gamma to exit")
    assert triad.procs["gamma"].returncode == 0
    assert triad.alive("alpha") and triad.alive("beta")
    triad.wait_for_primary()
    with LicenseClient(triad.endpoints, user="ann") as ann:
        assert checkout(ann, "cad").safe  # the two left still serve
    roles = {n["name"]: n["role"] for n in triad.status(holders=False)["nodes"]}
    assert roles["gamma"] == "down" and "primary" in (roles["alpha"], roles["beta"])
