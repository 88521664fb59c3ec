"""Snapshots taken off the loop and sent in chunks, on real nodes (issue 16, item 4).

Every node here compacts every 500 deltas and keeps no log before its snapshot, so a
node that lost its disk can only catch up from a snapshot: the primary's, written by
its snapshot taker (broker/taker.py), sent in 256 KiB chunks with acknowledgements, and
installed in steps.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from zbroker import LicenseClient
from zbroker.clients.testing import LocalTriad, wait_for
from zbroker.clients.testing.raw import RawClient

pytestmark = pytest.mark.integration

SETTINGS = {"snapshot_every": 500, "snapshot_keep": 0}
BATCH = 100  # opens in flight on one connection: its replies stay under CLIENT_SNDHWM


def _open_sessions(raw: RawClient, count: int) -> None:
    """``count`` sessions, opened ``BATCH`` at a time on one connection."""
    for start in range(0, count, BATCH):
        asked = set()
        for i in range(start, min(count, start + BATCH)):
            sid = uuid.uuid4().hex
            asked.add(sid)
            raw.send(op="open", sid=sid, req=1, user=f"user{i}", host="farm",
                     display=":0", client_version="test_snapshot_live")  # fmt: skip
        while asked:
            reply = raw.recv()
            assert reply["status"] == "ok", reply
            asked.discard(reply.get("sid"))


def _caught_up(triad: LocalTriad, name: str) -> bool:
    report = triad.status(holders=False)
    nodes = {n["name"]: n for n in report["nodes"]}
    primary = report["primary"]
    return (
        primary is not None
        and nodes[name]["role"] == "backup"
        and nodes[name]["commit"] == nodes[primary]["commit"]
    )


def _holders_on(triad: LocalTriad, name: str, feature: str) -> list[tuple[str, int]]:
    """The holders of ``feature`` in node ``name``'s own ledger (a backup answers too)."""
    raw = RawClient(triad.config.node(name).client)
    try:
        reply: dict[str, Any] = raw.call(op="status", holders=True, feature=feature)
    finally:
        raw.close()
    return sorted((h["user"], h["count"]) for h in reply["report"]["holders"])


def test_a_wiped_backup_catches_up_from_a_snapshot_of_many_chunks(tmp_path: Path) -> None:
    with LocalTriad(tmp_path, lease=60.0, settings=SETTINGS) as triad:
        primary = triad.names[0]  # failback: the first SERVER line's, once it has handed over
        wait_for(lambda: triad.primary() == primary, 10, f"{primary} serving")
        raw = RawClient(triad.config.node(primary).client, immediate=True)
        try:
            with LicenseClient(triad.endpoints, user="keeper") as keeper:
                kept = keeper.checkout("cad", count=3)
                _open_sessions(raw, 2500)
                backup = next(n for n in triad.names if n != primary)
                triad.kill(backup)
                triad.wipe(backup)
                _open_sessions(raw, 1100)  # the primary compacts past all the wiped node had
                snapshot = triad.config.node(primary).data / "snapshot"
                wait_for(lambda: snapshot.exists() and snapshot.stat().st_size > 2 * 262_144,
                         20, "the primary's snapshot of 3 chunks")  # fmt: skip
                triad.start(backup)
                wait_for(lambda: _caught_up(triad, backup), 30, f"{backup} to catch up")
                # its own ledger, from the image once the steps of its install are done
                wait_for(lambda: _holders_on(triad, backup, "cad") == [("keeper", 3)], 10,
                         f"{backup}'s ledger to hold the grant")  # fmt: skip
                log = (triad.logs / f"{backup}.log").read_text()
                assert "installed" in log, log[-3000:]
                keeper.checkin(kept)
                wait_for(lambda: _holders_on(triad, backup, "cad") == [], 10, "the checkin")
        finally:
            raw.close()
