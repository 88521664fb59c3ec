"""The report log's records of lingering seats, idle sessions and their timeouts, queue
waits and borrows, made by a live triad across a primary kill: the three nodes' logs
agree record for record, each event the clients caused is there once, and ``zbroker
report`` counts them (docs/reportlog.md)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from zbroker import LicenseClient
from zbroker.broker.report_check import compare_nodes
from zbroker.broker.reportfile import log_files, read_stream
from zbroker.clients.grant import Grant
from zbroker.clients.testing import LocalTriad, settled, wait_for

pytestmark = pytest.mark.integration

LINGER = 2.0
TIMEOUT = 2.0
OPTIONS = f"LINGER cad {LINGER:g}\nTIMEOUT viewer {TIMEOUT:g}\n"


def records(triad: LocalTriad) -> list[dict[str, Any]]:
    node = triad.config.nodes[0]
    assert node.report_log is not None  # zbroker init turns it on
    return [line.record for line in read_stream(log_files(node.report_log)) if "ix" in line.record]


def test_lingering_idle_queued_and_borrowed_seats_are_in_all_three_logs_once(
    make_triad: Callable[..., LocalTriad], tmp_path: Path
) -> None:
    options = tmp_path / "site.opt"
    options.write_text(OPTIONS)
    settings = {"options": f'"{options}"', "min_timeout": 1}
    triad = make_triad(servers=3, lease=5.0, settings=settings)
    first = triad.wait_for_primary()
    lost: list[Grant] = []
    got_lost = threading.Event()

    def on_lost(grants: list[Grant]) -> None:
        lost.extend(grants)
        got_lost.set()

    with (
        LicenseClient(triad.endpoints, user="ann", host="desk") as ann,
        LicenseClient(triad.endpoints, user="bob", host="desk", on_lost=on_lost) as bob,
        LicenseClient(triad.endpoints, user="cyd", host="desk") as cyd,
        LicenseClient(triad.license, user="dan", host="lap", borrow_dir=tmp_path / "t") as dan,
    ):
        # A checkin that lingers, taken back by its user, then let go to lapse.
        seat = settled(lambda: ann.checkout("cad", timeout=5), "ann's cad")
        settled(lambda: ann.checkin(seat, timeout=5), "ann's checkin")
        back = settled(lambda: ann.checkout("cad", timeout=5), "ann's cad again")
        settled(lambda: ann.checkin(back, timeout=5), "ann's second checkin")
        # An idle session whose viewer seat TIMEOUT takes.
        viewer = settled(lambda: bob.checkout("viewer", timeout=5), "bob's viewer")
        settled(lambda: bob.set_idle(True, timeout=5), "bob idle")
        # A checkout that waits in the queue for the two solver seats.
        both = settled(lambda: ann.checkout("solver", count=2, timeout=5), "both solver seats")
        waiter: list[Grant] = []
        asking = threading.Thread(
            target=lambda: waiter.append(cyd.checkout("solver", wait=30, timeout=35))
        )
        asking.start()
        wait_for(lambda: triad.feature("solver")["queued"] == 1, 10, "cyd waiting")
        settled(lambda: ann.checkin(both, timeout=5), "ann's solver checkin")
        asking.join(35)
        assert waiter, "cyd's queued checkout was never granted"
        settled(lambda: cyd.checkin(waiter[0], timeout=5), "cyd's checkin")
        # A borrow, returned early.
        settled(lambda: dan.borrow("cad", hours=1, timeout=5), "dan's borrow")

        triad.kill(first)  # the rest is decided by the next primary
        second = triad.wait_for_primary(not_=first)
        settled(lambda: dan.return_borrow("cad", timeout=5), "dan's return")
        assert got_lost.wait(TIMEOUT + 20), "bob's idle viewer grant was never taken"
        assert [(g.id, g.lost_reason) for g in lost] == [(viewer.id, "timeout")]
        wait_for(lambda: triad.feature("cad")["lingering"] == 0, LINGER + 10, "the lapse")
        triad.start(first)

    def agreed() -> bool:
        logs = {}
        for node in triad.config.nodes:
            assert node.report_log is not None
            logs[node.name] = log_files(node.report_log) if node.report_log.exists() else []
        lasts = {max((r.record.get("ix", 0) for r in read_stream(f)), default=0)
                 for f in logs.values()}  # fmt: skip
        return len(lasts) == 1 and compare_nodes(logs) == []

    wait_for(agreed, 30, "the three report logs to hold the same records")
    got = records(triad)

    def where(ev: str, **fields: Any) -> list[dict[str, Any]]:
        return [r for r in got if r["ev"] == ev and all(r.get(k) == v for k, v in fields.items())]

    lingered = where("in", grant=seat.id, reason="checkin")
    assert len(lingered) == 1 and lingered[0]["linger"] > lingered[0]["at"]
    assert len(where("linger", grant=seat.id, reason="reclaimed")) == 1
    assert len(where("out", grant=back.id, user="ann")) == 1
    assert len(where("in", grant=back.id, reason="checkin")) == 1
    assert len(where("linger", grant=back.id, reason="lapsed")) == 1
    assert [r["user"] for r in where("idle")] == ["bob"]
    assert len(where("in", grant=viewer.id, reason="timeout")) == 1
    queued, dequeued = where("queued", user="cyd"), where("dequeued", user="cyd")
    assert len(queued) == len(dequeued) == 1 and queued[0]["ix"] == dequeued[0]["ix"]
    assert len(where("out", grant=waiter[0].id, user="cyd")) == 1
    (borrowed,) = where("borrow", user="dan")
    assert "token" not in borrowed and borrowed["until"] > borrowed["at"]
    assert len(where("return", grant=borrowed["grant"], reason="returned")) == 1
    assert {r["primary"] for r in where("term")} >= {first, second}

    directories = [str(n.report_log) for n in triad.config.nodes]
    result = subprocess.run(
        [sys.executable, "-m", "zbroker.broker", "report", *directories],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    cad = text[text.index("feature cad:") : text.index("feature solver:")]
    assert "lingering seats: 2 ended (lapsed 1, reclaimed 1)" in cad
    assert "borrows 1, back 1 (returned 1)" in cad
    solver = text[text.index("feature solver:") : text.index("feature viewer:")]
    assert "queue waits: 1," in solver
    viewer_text = text[text.index("feature viewer:") :]
    assert "timeout 1" in viewer_text and "seat-hours held while idle:" in viewer_text
    assert "(bob " in viewer_text.split("seat-hours held while idle:")[1].splitlines()[0]
