"""A real client process cut off longer than its lease, against a real triad.

The client is frozen with SIGSTOP (its heartbeats stop), the triad expires its session
and hands one of its features to someone else; when the client thaws, the library
notices the lost lease, opens a new session, checks out again what it can, and tells
the application which grant it could not get back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest

from zbroker import LicenseClient, OutcomeUnknown
from zbroker.clients.testing import LocalTriad, wait_for

pytestmark = pytest.mark.integration

CLIENT = textwrap.dedent(
    """
    import sys, threading
    from zbroker import LicenseClient
    lost = threading.Event()
    def on_lost(grants):
        for g in grants:
            print("lost", g.feature, g.state.name, flush=True)
    client = LicenseClient(sys.argv[1:], user="frozen", on_lost=on_lost)
    client.checkout("cad", count=2)
    client.checkout("solver", count=2)
    print("held", flush=True)
    sys.stdin.readline()  # the test says when to stop
    client.close()
    """
)


def test_expired_client_checks_out_again_and_reports_what_it_lost(make_triad: Any) -> None:
    triad: LocalTriad = make_triad(servers=3, lease=3.0)
    triad.wait_for_primary()
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, *triad.endpoints],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None and proc.stdin is not None
    stdout = proc.stdout
    reader = threading.Thread(
        target=lambda: lines.extend(line.strip() for line in stdout), daemon=True
    )
    reader.start()
    try:
        wait_for(lambda: "held" in lines, 15, "the client to hold its grants")
        os.kill(proc.pid, signal.SIGSTOP)
        # The triad's lease is 3 s: wait until it has given the seats back.
        wait_for(lambda: triad.holders("solver") == [], 15, "the frozen session to expire")
        with LicenseClient(triad.endpoints, user="rival") as rival:
            taken: Any = rival.checkout("solver", count=2)
            os.kill(proc.pid, signal.SIGCONT)
            wait_for(lambda: "lost solver LOST" in lines, 15, "the client to report solver lost")
            wait_for(lambda: triad.holders("cad") == [("frozen", 2)], 10, "cad back")
            assert triad.holders("solver") == [("rival", 2)]
            rival.checkin(taken)
        proc.stdin.write("done\n")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
    # First the lapsed lease made both unsafe; then only solver could not be got back.
    assert "lost cad UNSAFE" in lines and "lost cad LOST" not in lines, lines


def _commit(triad: LocalTriad, name: str) -> int:
    node = next(n for n in triad.status()["nodes"] if n["name"] == name)
    return int(node.get("commit") or 0)


def test_unknown_checkout_is_settled_and_leaks_no_seat(make_triad: Any) -> None:
    # No failback: the new primary's term then holds only its no-op and what the library
    # does, so the grant ids below count the library's checkouts exactly.
    triad: LocalTriad = make_triad(servers=3, lease=5.0, settings={"failback": False})
    first = triad.wait_for_primary()
    with LicenseClient(triad.endpoints, user="hasty") as client:
        viewer = client.checkout("viewer")  # the session is open and the primary known
        committed = _commit(triad, first)
        triad.pause(first)
        try:
            try:
                client.checkout("cad", count=3, timeout=0.2)
            except OutcomeUnknown:
                pass  # the expected case: the frozen primary never answered
            else:
                raise AssertionError("a frozen primary cannot have granted within 0.2 s")
            second = triad.wait_for_primary(not_=first, timeout=10)
        finally:
            triad.resume(first)
        # The library re-sends the same request to the new primary, learns that it got
        # the seats, and checks them back in: the new term's no-op, that grant and its
        # release. Nothing stays held by "hasty" for cad.
        wait_for(
            lambda: _commit(triad, second) >= committed + 3 and triad.holders("cad") == [],
            10,
            "the settled grant to be returned",
        )
        assert triad.holders("viewer") == [("hasty", 1)]
        # The settled checkout took the grant id after viewer's: it did take effect once
        # (a library that gave up on it would leave the next id to this probe).
        probe = client.checkout("viewer")
        assert probe.id == viewer.id + 2, (viewer.id, probe.id)
