"""LINGER and TIMEOUT on a live triad: a lingering seat and an idle session's clock are
replicated wall times, so they survive a primary kill and a restart of all three, and
whichever node is primary when they come due lets the seat go (docs/admin.md)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from zbroker import LicenseClient
from zbroker.clients.grant import Grant
from zbroker.clients.testing import LocalTriad, settled, wait_for

pytestmark = pytest.mark.integration

# Both outlive a failover and a restart of all three with room to spare: those take
# about 3 s from the idle mark on a quiet 2-core machine (the test asserts they fit).
LINGER = 12.0
TIMEOUT = 10.0
OPTIONS = f"LINGER cad {LINGER:g}\nTIMEOUT viewer {TIMEOUT:g}\n"


def start(make_triad: Callable[..., LocalTriad], tmp_path: Path) -> LocalTriad:
    options = tmp_path / "site.opt"
    options.write_text(OPTIONS)
    # min_timeout low enough for a test: the floor is FlexNet's 900 s by default
    settings = {"options": f'"{options}"', "min_timeout": 1}
    return make_triad(servers=3, lease=5.0, settings=settings)


def seen(triad: LocalTriad, feature: str) -> dict[str, Any] | None:
    """The feature as a serving primary reports it, or None while there is none."""
    try:
        report = triad.status()
    except Exception:  # no node answers yet (a restart)
        return None
    serving = [n for n in report["nodes"] if n["role"] == "primary" and n.get("serving", True)]
    return triad.feature(feature, report) if serving else None


def hold_of(triad: LocalTriad, gid: int) -> dict[str, Any] | None:
    cad = seen(triad, "cad")
    if cad is None:
        return None
    return next((h for h in cad["holders"] if h["grant"] == gid), None)


def restart_all(triad: LocalTriad) -> None:
    for name in triad.names:
        triad.kill(name)
    triad.start()
    triad.wait_for_primary(timeout=20)


def test_a_lingering_seat_and_an_idle_clock_survive_a_failover_and_a_restart_of_all_three(
    make_triad: Callable[..., LocalTriad], tmp_path: Path
) -> None:
    triad = start(make_triad, tmp_path)
    first = triad.wait_for_primary()
    lost: list[Grant] = []
    got_lost = threading.Event()

    def on_lost(grants: list[Grant]) -> None:
        lost.extend(grants)
        got_lost.set()

    with (
        LicenseClient(triad.endpoints, user="ann") as ann,
        LicenseClient(triad.endpoints, user="bob", on_lost=on_lost) as bob,
    ):
        seat = settled(lambda: ann.checkout("cad", timeout=5), "ann's cad")
        settled(lambda: ann.checkin(seat, timeout=5), "ann's checkin")
        checked_in = time.time()
        hold = wait_for(lambda: hold_of(triad, seat.id), 10, "the lingering seat")
        assert hold["hold"] == "linger" and hold["user"] == "ann"
        assert checked_in - 5 <= hold["until"] - LINGER <= checked_in
        cad = triad.feature("cad")
        assert (cad["in_use"], cad["lingering"]) == (1, 1)

        viewer = settled(lambda: bob.checkout("viewer", timeout=5), "bob's viewer")
        settled(lambda: bob.set_idle(True, timeout=5), "bob idle")
        idle_at = time.time()

        triad.kill(first)
        triad.wait_for_primary(not_=first)
        again = wait_for(lambda: hold_of(triad, seat.id), 10, "the seat on the next primary")
        assert again["until"] == hold["until"]

        restart_all(triad)
        again = wait_for(lambda: hold_of(triad, seat.id), 20, "the seat after a restart")
        assert again["until"] == hold["until"]
        assert time.time() < idle_at + TIMEOUT, "the restart took longer than the test allows"
        assert viewer.state.name in ("HELD", "UNSAFE")

        # The idle clock ran on across the restart: the grant goes at idle_at + TIMEOUT.
        assert got_lost.wait(TIMEOUT + 15), "bob's idle viewer grant was never taken"
        assert time.time() >= idle_at + TIMEOUT - 1
        assert [(g.id, g.lost_reason) for g in lost] == [(viewer.id, "timeout")]
        wait_for(lambda: (seen(triad, "viewer") or {}).get("in_use") == 0, 10, "viewer free")

        # The lingering seat returns at its end, on whichever node is primary then.
        wait_for(lambda: (seen(triad, "cad") or {}).get("lingering") == 0, LINGER, "the lapse")
        assert time.time() >= hold["until"] - 1
        assert triad.feature("cad")["in_use"] == 0


def test_the_same_user_and_host_take_the_lingering_seat_back_and_others_do_not(
    make_triad: Callable[..., LocalTriad], tmp_path: Path
) -> None:
    triad = start(make_triad, tmp_path)
    triad.wait_for_primary()
    with (
        LicenseClient(triad.endpoints, user="ann") as ann,
        LicenseClient(triad.endpoints, user="bob") as bob,
    ):
        seat = settled(lambda: ann.checkout("cad", timeout=5), "ann's cad")
        settled(lambda: ann.checkin(seat, timeout=5), "ann's checkin")
        wait_for(lambda: hold_of(triad, seat.id), 10, "the lingering seat")
        settled(lambda: bob.checkout("cad", timeout=5), "bob's cad")  # a seat of its own
        cad = triad.feature("cad")
        assert (cad["in_use"], cad["lingering"]) == (2, 1)
        back = settled(lambda: ann.checkout("cad", timeout=5), "ann's cad again")
        cad = triad.feature("cad")
        assert (cad["in_use"], cad["lingering"]) == (2, 0)
        assert sorted(h["user"] for h in cad["holders"]) == ["ann", "bob"]
        assert all("hold" not in h for h in cad["holders"]) and back.id > seat.id
