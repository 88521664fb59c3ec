"""The client library's follow-ups against real nodes: a queued checkout's wait is the
application's across a failover (the new primary takes the same request with what is left
of the wait, and does not start it over)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from zbroker import LicenseClient
from zbroker.clients.errors import LicenseDenied
from zbroker.clients.testing import LocalTriad, wait_for

pytestmark = pytest.mark.integration

WAIT = 3.0


def test_a_queued_checkouts_wait_is_not_started_over_by_a_failover(triad: LocalTriad) -> None:
    first = triad.wait_for_primary()
    with (
        LicenseClient(triad.license, user="hog") as hog,
        LicenseClient(triad.license, user="app", timeout=10) as app,
    ):
        hog.checkout("solver", count=2)  # every seat: the app's checkout queues
        ended: list[Any] = []

        def queued() -> None:
            began = time.monotonic()
            try:
                ended.append(app.checkout("solver", wait=WAIT))
            except LicenseDenied as exc:
                ended.append(exc)
            ended.append(time.monotonic() - began)

        caller = threading.Thread(target=queued)
        caller.start()

        def half_waited() -> bool:  # by the node's own account of when it joined the line
            line = triad.feature("solver").get("queue") or []
            return bool(line) and time.time() - float(line[0]["since"]) >= WAIT / 2

        wait_for(half_waited, 5.0, "the checkout half its wait in line")
        triad.kill(first)
        caller.join(WAIT + 5)
        assert ended, "the checkout did not end"
        denied, took = ended
        assert isinstance(denied, LicenseDenied) and denied.reason == "no_seats", denied
        # Before the fix the new primary counted the whole wait again from the failover.
        assert took < WAIT + 0.8, f"waited {took:.1f} s of the {WAIT} s asked"
