"""The queue in the status report (docs/protocol.md, "Queue"): who waits, in line order.

The ledger lists a feature's waiters (``Ledger.queue``); a page of holders carries them
per feature, bounded (``zbroker.broker.status_reply``); the summary never does. Unit tests of
each, then a live node with three checkouts in its queue.
"""

from __future__ import annotations

from typing import Any

import pytest

from zbroker.broker import status_reply
from zbroker.broker.ledger import Ledger
from zbroker.broker.model import Entitlement, Now, Request
from zbroker.broker.wire import unpack
from zbroker.clients.testing import LocalTriad, RawClient, wait_for

WALL = 1_780_000_000.0
SOLVER = (Entitlement("solver", "1.5", 2, None), Entitlement("cad", "2.0", 5, None))


def _ledger() -> Ledger:
    return Ledger(SOLVER, lease=30.0, heartbeat=10.0)


def _do(ledger: Ledger, now: Now, op: str, sid: str, req: int, **kw: Any) -> None:
    for delta, _ in ledger.handle(Request(op, sid, req, req, **kw), now).decided:
        ledger.apply(delta)


def _queued(ledger: Ledger, waiters: int, start: float = 100.0) -> None:
    """``holder`` holds both seats of solver; ``w0``, ``w1``, ... wait for one, in order."""
    now = Now(start, WALL)
    _do(ledger, now, "open", "holder", 1, user="ann", host="ws1", display=":0")
    _do(ledger, now, "checkout", "holder", 2, feature="solver", count=2)
    for i in range(waiters):
        at = Now(start + i, WALL + i)
        _do(ledger, at, "open", f"w{i}", 1, user=f"u{i}", host=f"h{i}", display=f":{i}")
        version = "1.0" if i % 2 else None
        _do(ledger, at, "checkout", f"w{i}", 2, feature="solver", count=1, wait=60.0,
            version=version)  # fmt: skip


@pytest.mark.unit
def test_the_ledger_lists_waiters_first_in_line_first_with_who_and_what() -> None:
    ledger = _ledger()
    _queued(ledger, 3)
    assert ledger.queued("solver") == 3
    assert ledger.queue("solver", 10) == [
        {"user": "u0", "host": "h0", "display": ":0", "version": None, "count": 1,
         "handle": "q2", "since": WALL},
        {"user": "u1", "host": "h1", "display": ":1", "version": "1.0", "count": 1,
         "handle": "q2", "since": WALL + 1},
        {"user": "u2", "host": "h2", "display": ":2", "version": None, "count": 1,
         "handle": "q2", "since": WALL + 2},
    ]  # fmt: skip
    assert [w["user"] for w in ledger.queue("solver", 2)] == ["u0", "u1"]
    assert ledger.queue("cad", 10) == [] and ledger.queue("nothing", 10) == []


@pytest.mark.unit
def test_a_waiter_whose_session_ended_is_not_listed() -> None:
    ledger = _ledger()
    _queued(ledger, 3)
    _do(ledger, Now(200.0, WALL + 200), "close", "w1", 3)
    assert [w["user"] for w in ledger.queue("solver", 10)] == ["u0", "u2"]


def _page(ledger: Ledger, feature: str = "") -> dict[str, Any]:
    report = {"node": "n1", "mode": "plain", "nodes": [], "features": ledger.status()}
    request = Request("status", holders=True, feature=feature)
    body = unpack(status_reply.page(report, ledger, request))
    assert isinstance(body, dict)
    return body


@pytest.mark.unit
def test_a_page_lists_the_queue_of_the_features_it_covers_and_the_summary_none() -> None:
    ledger = _ledger()
    _queued(ledger, 2)
    every = {f["name"]: f for f in _page(ledger)["features"]}
    assert [w["user"] for w in every["solver"]["queue"]] == ["u0", "u1"]
    assert every["cad"]["queue"] == []
    only = {f["name"]: f for f in _page(ledger, "solver")["features"]}
    assert len(only["solver"]["queue"]) == 2 and "queue" not in only["cad"]
    assert all("queue" not in f for f in ledger.status())


@pytest.mark.unit
def test_a_page_lists_the_first_waiters_only_within_its_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ledger = _ledger()
    _queued(ledger, status_reply.QUEUE_SHOWN + 5)
    (solver,) = [f for f in _page(ledger, "solver")["features"] if f["name"] == "solver"]
    assert solver["queued"] == status_reply.QUEUE_SHOWN + 5
    assert [w["user"] for w in solver["queue"]] == [f"u{i}" for i in range(100)]
    # bytes: a budget of about three entries lists the first two or three, in line order
    monkeypatch.setattr(status_reply, "QUEUE_BYTES", 200)
    (solver,) = [f for f in _page(ledger, "solver")["features"] if f["name"] == "solver"]
    assert 1 <= len(solver["queue"]) <= 3
    assert [w["user"] for w in solver["queue"]] == [f"u{i}" for i in range(len(solver["queue"]))]


# --- a live node -------------------------------------------------------------------------


def _status(client: RawClient, **fields: Any) -> dict[str, dict[str, Any]]:
    reply = client.call(op="status", **fields)
    assert reply["status"] == "ok", reply
    return {f["name"]: f for f in reply["report"]["features"]}


@pytest.mark.integration
def test_a_live_node_lists_its_queue_with_the_holders(make_triad: Any) -> None:
    single: LocalTriad = make_triad(servers=1, lease=30.0, secure=False)
    single.wait_for_primary()
    endpoint = single.endpoints[0]
    made: list[RawClient] = []
    try:
        holder, *waiters = made = [RawClient(endpoint) for _ in range(4)]
        for i, client in enumerate(made):
            opened = client.call(
                op="open", user=f"u{i}", host=f"h{i}", display=f":{i}", client_version="raw"
            )
            assert opened["status"] == "ok", opened
        got = holder.call(op="checkout", feature="solver", count=2, ack=1)
        assert got["status"] == "ok", got
        asked = []
        for i, client in enumerate(waiters, start=1):
            version = "1.5" if i == 2 else None
            req = client.send(op="checkout", feature="solver", count=i % 2 + 1, wait=60,
                              version=version, ack=1)  # fmt: skip
            asked.append((f"u{i}", version, i % 2 + 1, f"q{req}"))  # never a grant id
            # one at a time, so that their order in line is the order sent
            wait_for(lambda: _status(holder)["solver"]["queued"] == len(asked), 10, "queued")
        summary = _status(holder)
        assert all("queue" not in f for f in summary.values())
        assert summary["solver"]["vendor"] == "demo"
        page = _status(holder, holders=True, feature="solver")
        queue = page["solver"]["queue"]
        assert [(w["user"], w["version"], w["count"], w["handle"]) for w in queue] == asked
        assert all(isinstance(w["since"], float) for w in queue)
        assert [(w["host"], w["display"]) for w in queue] == [("h1", ":1"), ("h2", ":2"),
                                                             ("h3", ":3")]  # fmt: skip
        assert [w["since"] for w in queue] == sorted(w["since"] for w in queue)
        every = _status(holder, holders=True)
        assert every["cad"]["queue"] == [] and len(every["solver"]["queue"]) == 3
        # the first in line is served first once the seats come back
        back = holder.call(op="checkin", grant=got["grant"]["id"], ack=2)
        assert back["status"] == "ok", back
        served = waiters[0].recv(10)
        assert served["status"] == "ok" and f"q{served['req']}" == asked[0][3], served
        wait_for(lambda: _status(holder)["solver"]["queued"] == 2, 10, "u1 left the queue")
        after = _status(holder, holders=True, feature="solver")["solver"]["queue"]
        assert [w["user"] for w in after] == ["u2", "u3"]
    finally:
        for client in made:
            client.close()
