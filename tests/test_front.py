"""The client front remembers where each pending request's answer goes, and nothing more."""

from __future__ import annotations

import pytest

from zbroker.broker.front import Front

pytestmark = pytest.mark.unit


def test_answers_leave_in_commit_order_to_the_latest_route() -> None:
    front = Front()
    front.wait(("s", 1), b"first-connection", 1.0)
    front.proposed(5, ("s", 1), {"status": "ok"})
    front.wait(("s", 1), b"after-reconnect", 2.0)  # a retry over another connection
    front.wait(("t", 1), b"t", 3.0)
    front.proposed(6, ("t", 1), {"status": "ok"})
    # Each answer carries when its request first arrived (a retry keeps that time).
    assert front.committed(5) == [(b"after-reconnect", ("s", 1), {"status": "ok"}, 1.0)]
    assert front.committed(6) == [(b"t", ("t", 1), {"status": "ok"}, 3.0)]
    assert front.route == {} and front.inflight == {}


def test_a_forgotten_waiter_leaves_no_route_behind() -> None:
    front = Front()
    front.wait(("gone", 3), b"identity", 0.0)  # queued: its session then ends
    front.forget(("gone", 3))
    assert not front.waiting(("gone", 3))
    assert front.route == {}
