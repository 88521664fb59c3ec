"""Memory limits: the pure checks, the ledger refusing at each limit, a real node.

Each limit answers ``error`` with code ``limit`` and changes nothing: no delta, no
recorded reply, so the same request is decided afresh once the client is under it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_ledger import HEARTBEAT, LEASE, World, ent, grant_of

from zbroker import LicenseClient, LicenseUnavailable
from zbroker.broker.ledger import Ledger
from zbroker.broker.limits import Limits
from zbroker.broker.model import Request
from zbroker.clients.testing import LocalTriad

pytestmark = pytest.mark.unit


def limited(**limits: int) -> World:
    ledger = Ledger([ent(count=2)], lease=LEASE, heartbeat=HEARTBEAT, limits=Limits(**limits))
    return World([], ledger)


def is_limit(reply: Any, words: str) -> None:
    assert reply["status"] == "error" and reply["code"] == "limit", reply
    assert words in reply["detail"]


def test_limits_refuse_nonsense() -> None:
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_queue"):
            Limits(max_queue=bad)  # type: ignore[arg-type]
    assert Limits().refuse_open(0, 0, "h") is None


def test_sessions_per_host_counts_open_sessions_of_that_host() -> None:
    w = limited(max_sessions_per_host=2)
    assert w.open("a1", host="farm")["status"] == "ok"  # type: ignore[index]
    assert w.open("a2", host="farm")["status"] == "ok"  # type: ignore[index]
    before = len(w.log)
    is_limit(w.open("a3", host="farm"), "host 'farm' has 2 sessions open")
    assert len(w.log) == before and w.ledger.sessions() == ["a1", "a2"]
    assert w.open("b1", host="desk")["status"] == "ok"  # type: ignore[index]
    w.send("close", "a1")
    assert w.open("a3", host="farm")["status"] == "ok"  # type: ignore[index]
    # an expiry frees the host's slot too
    w.advance(LEASE * 2)
    w.tick()
    w.tick()
    assert w.ledger.sessions() == []
    assert w.open("a4", host="farm")["status"] == "ok"  # type: ignore[index]


def test_max_sessions_holds_whatever_hosts_are_claimed() -> None:
    w = limited(max_sessions=3)
    for i in range(3):
        w.open(f"s{i}", host=f"h{i}")
    is_limit(w.open("s9", host="h9"), "3 sessions are open")
    assert w.ledger.sessions() == ["s0", "s1", "s2"]
    assert w.send("heartbeat", "s0")["status"] == "ok"  # type: ignore[index] - others go on


def test_per_host_counts_survive_a_snapshot() -> None:
    w = limited(max_sessions_per_host=1)
    w.open("a1", host="farm")
    copy = Ledger.from_snapshot(
        w.ledger.snapshot(),
        lease=LEASE,
        heartbeat=HEARTBEAT,
        limits=Limits(max_sessions_per_host=1),
    )
    out = copy.handle(Request("open", "a2", 1, host="farm"), w.now)
    assert out.decided == [] and out.reply is not None and out.reply["code"] == "limit"


def test_queue_length_per_feature() -> None:
    w = limited(max_queue=1)
    w.open("holder")
    w.open("w1")
    w.open("w2")
    grant_of(w.checkout("holder", count=2))
    assert w.checkout("w1", wait=30.0) is None  # queued
    is_limit(w.checkout("w2", wait=30.0), "1 checkouts already wait for 'cad'")
    assert w.ledger.queued("cad") == 1
    denied = w.checkout("w2")  # without wait: decided at once, as ever
    assert denied["status"] == "denied" and denied["reason"] == "no_seats"


def test_unacknowledged_replies_per_session() -> None:
    w = limited(max_unacked=3)
    w.open("s")  # req 1: one recorded reply
    for _ in range(2):
        w.checkout("s", feature="none")  # denials are recorded too
    is_limit(w.checkout("s", feature="none"), "holds 3 replies it has not acknowledged")
    assert w.send("heartbeat", "s")["status"] == "ok"  # type: ignore[index] - not recorded
    # Acknowledging frees the table: the very same request is then served.
    reply = w.send("checkout", "s", feature="cad", count=1, version=None, ack=3)
    grant_of(reply)


def test_unacknowledged_replies_of_all_sessions_together() -> None:
    # max_sessions x max_unacked is 10^9 replies: many sessions that never ack would
    # fill every node. Past max_replies, a session at its share (6 // 3 open) stops.
    w = limited(max_replies=6)
    for sid in ("s1", "s2", "s3"):
        w.open(sid)  # one recorded reply each
    for _ in range(3):
        assert w.checkout("s1", feature="none")["reason"] == "no_such_feature"
    assert sum(len(w.ledger.session(s).replies) for s in ("s1", "s2", "s3")) == 6  # type: ignore[union-attr]
    is_limit(w.checkout("s1", feature="none"), "session s1 holds 4, at least its share (2)")
    assert w.send("heartbeat", "s1")["status"] == "ok"  # type: ignore[index] - not recorded
    grant_of(w.checkout("s2"))  # under its share: the sessions that ack still work
    is_limit(w.checkout("s2", feature="none"), "the sessions hold 7 replies")
    copy = Ledger.from_snapshot(  # the count is rebuilt from a snapshot
        w.ledger.snapshot(), lease=LEASE, heartbeat=HEARTBEAT, limits=Limits(max_replies=6)
    )
    out = copy.handle(Request("checkout", "s2", 4, ack=1, feature="none", count=1), w.now)
    assert out.reply is not None and out.reply["code"] == "limit"
    # An ack that forgets its table frees the session, whatever it held (req 6 is next),
    # and the others with it: the sessions hold 4 again.
    grant_of(w.send("checkout", "s1", feature="cad", count=1, version=None, ack=6))
    assert w.checkout("s2", feature="none")["reason"] == "no_such_feature"
    w.send("close", "s2", ack=5)  # a session's end forgets its table too
    while (reply := w.checkout("s3", feature="none"))["status"] == "denied":
        pass
    tables = sum(len(w.ledger.session(s).replies) for s in ("s1", "s3"))  # type: ignore[union-attr]
    is_limit(reply, f"the sessions hold {tables} replies")
    assert tables == 6


@pytest.mark.integration
def test_a_node_answers_limit_errors_from_its_config(tmp_path: Path, raw: Any) -> None:
    settings = {"max_sessions_per_host": 2, "max_queue": 1}
    with LocalTriad(tmp_path / "t", servers=1, settings=settings) as triad:
        triad.wait_for_primary()
        endpoint = triad.endpoints[0]
        farm = [raw(endpoint) for _ in range(3)]
        for client in farm[:2]:
            assert client.call(op="open", host="farm")["status"] == "ok"
        is_limit(farm[2].call(op="open", host="farm"), "max_sessions_per_host")
        assert farm[0].call(op="checkout", feature="solver", count=2)["status"] == "ok"
        farm[1].send(op="checkout", feature="solver", count=1, wait=30.0)  # queued
        with pytest.raises(TimeoutError):
            farm[1].recv(timeout=0.3)
        other = raw(endpoint)
        assert other.call(op="open", host="desk")["status"] == "ok"
        is_limit(other.call(op="checkout", feature="solver", wait=30.0), "max_queue")
        with LicenseClient(triad.license, host="farm", timeout=2.0) as client:
            with pytest.raises(LicenseUnavailable) as refused:
                client.checkout("viewer")
            assert refused.value.code == "limit"
