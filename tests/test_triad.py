"""Three real node processes on loopback, broken in the ways SPEC section 6 lists."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from zbroker import LicenseClient, LicenseUnavailable, OutcomeUnknown
from zbroker.clients.testing import LocalTriad, wait_for

pytestmark = pytest.mark.integration


def _holders(triad: LocalTriad, feature: str) -> list[tuple[str, int]]:
    report = triad.status()
    return [] if report["primary"] is None else triad.holders(feature, report)


def _caught_up(triad: LocalTriad, name: str) -> bool:
    report = triad.status()
    nodes = {n["name"]: n for n in report["nodes"]}
    primary = report["primary"]
    return (
        primary is not None
        and nodes[name]["role"] in ("backup", "primary")
        and nodes[name]["commit"] == nodes[primary]["commit"]
    )


def test_primary_killed_while_holding_and_checking_out(triad: LocalTriad) -> None:
    first = triad.wait_for_primary()
    with (
        LicenseClient(triad.endpoints, user="holder") as holder,
        LicenseClient(triad.endpoints, user="worker") as worker,
    ):
        held = holder.checkout("cad", count=2)
        granted_after: list[float] = []
        errors: list[BaseException] = []
        killed = threading.Event()
        kill_time: list[float] = []
        done = [0]

        def work() -> None:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not granted_after:
                try:
                    grant = worker.checkout("viewer", timeout=5)
                except (LicenseUnavailable, OutcomeUnknown):
                    continue  # the library settles an unknown checkout by itself
                except BaseException as exc:  # reported by the assertion below
                    errors.append(exc)
                    return
                if killed.is_set():
                    granted_after.append(time.monotonic())
                worker.checkin(grant)
                done[0] += 1

        thread = threading.Thread(target=work)
        thread.start()
        wait_for(lambda: done[0] >= 5, 10, "the worker's checkouts to flow")
        kill_time.append(time.monotonic())
        triad.kill(first)
        killed.set()
        thread.join(timeout=20)
        assert not errors, errors
        assert granted_after, "no checkout was granted after the primary was killed"
        failover = granted_after[0] - kill_time[0]
        print(f"failover seen by a client: {failover:.3f} s")
        assert failover < 1.0  # SPEC invariant 4; the benchmark measures the distribution
        second = triad.wait_for_primary(not_=first)
        assert second != first
        assert _holders(triad, "cad") == [("holder", 2)]
        holder.checkin(held)
        assert _holders(triad, "cad") == []


def test_paused_primary_grants_nothing_in_its_old_term(triad: LocalTriad, raw: Any) -> None:
    first = triad.wait_for_primary()
    old = raw(triad.config.node(first).client)
    assert old.open()["status"] == "ok"
    triad.pause(first)
    try:
        second = triad.wait_for_primary(not_=first, timeout=5)
        # Sent to the frozen primary; it reads it only when it wakes up in its old term.
        req = old.send(op="checkout", feature="solver", count=1)
        with LicenseClient(triad.endpoints) as client:
            taken = client.checkout("solver", count=2)
            triad.resume(first)
            reply = old.recv(timeout=5)
            assert reply["req"] == req
            assert reply["status"] in ("redirect", "unavailable"), reply
            wait_for(lambda: _caught_up(triad, first), 5, f"{first} to rejoin as a backup")
            assert triad.feature("solver")["in_use"] == 2
            client.checkin(taken)
        del second
    finally:
        triad.resume(first)


def test_backup_killed_restarted_and_caught_up(triad: LocalTriad) -> None:
    primary = triad.wait_for_primary()
    backup = next(n for n in triad.names if n != primary)
    triad.kill(backup)
    with LicenseClient(triad.endpoints) as client:
        grants = [client.checkout("viewer") for _ in range(20)]
        triad.start(backup)
        wait_for(lambda: _caught_up(triad, backup), 10, f"{backup} to catch up")
        for grant in grants:
            client.checkin(grant)


def test_two_nodes_down_unavailable_then_back_with_nothing_lost(triad: LocalTriad) -> None:
    primary = triad.wait_for_primary()
    backups = [n for n in triad.names if n != primary]
    with LicenseClient(triad.endpoints, user="keeper") as client:
        kept = client.checkout("cad", count=3)
        for name in backups:
            triad.kill(name)
        # Once it has heard no backup for peer_timeout, the survivor stops granting.
        wait_for(lambda: triad.primary() is None, 5, "the lone node to stop granting")
        with pytest.raises(LicenseUnavailable):
            client.checkout("viewer", timeout=2)
        triad.start(backups[0])
        triad.wait_for_primary(timeout=10)
        assert _holders(triad, "cad") == [("keeper", 3)]
        client.checkin(kept)
        assert client.checkout("viewer", timeout=5).feature == "viewer"


def test_all_three_restarted_restore_every_grant(triad: LocalTriad) -> None:
    triad.wait_for_primary()
    with LicenseClient(triad.endpoints, user="survivor") as client:
        kept = [client.checkout("cad", count=2), client.checkout("solver")]
        for name in triad.names:
            triad.kill(name)
        triad.start()
        triad.wait_for_primary(timeout=10)
        assert _holders(triad, "cad") == [("survivor", 2)]
        assert _holders(triad, "solver") == [("survivor", 1)]
        for grant in kept:
            client.checkin(grant)
        assert _holders(triad, "cad") == []


def test_failback_and_wiped_node_recovers(triad: LocalTriad) -> None:
    first = triad.wait_for_primary()
    assert first == triad.names[0]  # the highest-ranked node wins the first election
    with LicenseClient(triad.endpoints, user="steady") as client:
        kept = client.checkout("cad")
        triad.kill(first)
        triad.wait_for_primary(not_=first)
        triad.wipe(first)
        triad.start(first)
        # It must catch up from the others before it may vote, then take control back.
        wait_for(lambda: triad.primary() == first, 15, f"{first} to take control back")
        assert _holders(triad, "cad") == [("steady", 1)]
        client.checkin(kept)


def test_restarts_from_snapshots_lose_nothing(make_triad: Any) -> None:
    # Snapshots every 20 deltas: restarts load a snapshot plus the log after it, and a
    # node that was down while the others compacted catches up. (It catches up from the
    # log tail the primary keeps; catch-up by snapshot is covered in test_replica.py.)
    triad = make_triad(lease=5.0, settings={"snapshot_every": 20})
    triad.wait_for_primary()
    with LicenseClient(triad.endpoints, user="snappy") as client:
        kept = client.checkout("cad", count=2)
        for _ in range(30):
            client.checkin(client.checkout("viewer"))
        for name in triad.names:
            triad.kill(name)
        triad.start()
        primary = triad.wait_for_primary(timeout=10)
        assert _holders(triad, "cad") == [("snappy", 2)]
        lagging = next(n for n in triad.names if n != primary)
        triad.kill(lagging)
        for _ in range(30):
            client.checkin(client.checkout("viewer"))
        triad.start(lagging)
        wait_for(lambda: _caught_up(triad, lagging), 10, f"{lagging} to catch up")
        for name in triad.names:
            triad.kill(name)
        triad.start()
        triad.wait_for_primary(timeout=10)
        assert _holders(triad, "cad") == [("snappy", 2)]
        client.checkin(kept)
        assert _holders(triad, "cad") == []
