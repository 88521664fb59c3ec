"""The client library against scripted ROUTER servers speaking docs/protocol.md.

Each ``FakeNode`` is a real ROUTER socket on loopback, served by a thread, in front of
a ``FakeLedger`` that a whole fake triad shares (replication is not the point here).
A node's ``mode`` scripts its role: ``primary`` answers from the ledger, ``redirect``
names another node (or none), ``unavailable`` refuses, ``silent`` drops everything.
``swallow`` drops chosen replies after the ledger acted: an unknown outcome.
No test sleeps to synchronise: every wait polls a condition until a deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import pytest
import zmq

from zbroker import (
    Grant,
    GrantState,
    LeaseLost,
    LicenseClient,
    LicenseDenied,
    LicenseUnavailable,
    OutcomeUnknown,
)
from zbroker.clients.errors import ClientClosed, LicenseError

pytestmark = pytest.mark.unit


def wait_until(condition: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.005)  # polling interval of a condition with a deadline


class FakeLedger:
    """Just enough of the ledger: sessions, seats, grants, replies recorded by (sid, req)."""

    def __init__(self, features: dict[str, int], lease: float = 5.0, heartbeat: float = 0.5):
        self.lock = threading.Lock()
        self.total = dict(features)
        self.sessions: dict[str, dict[int, tuple[str, int]]] = {}  # sid -> grant -> (f, n)
        self.recorded: dict[tuple[str, int], dict[str, Any]] = {}
        self.taken: dict[str, int] = {}  # seats held outside any of our sessions
        self.next_grant = 1
        self.lease, self.heartbeat = lease, heartbeat
        self.checkins: list[int] = []

    def in_use(self, feature: str) -> int:
        with self.lock:
            return self._in_use(feature)

    def _in_use(self, feature: str) -> int:
        held = sum(
            n for grants in self.sessions.values() for f, n in grants.values() if f == feature
        )
        return held + self.taken.get(feature, 0)

    def expire(self, sid: str) -> None:
        with self.lock:
            self.sessions.pop(sid, None)

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            op, sid, req = msg.get("op"), str(msg.get("sid")), int(msg.get("req") or 0)
            key = (sid, req)
            if key in self.recorded:
                return self.recorded[key]
            if op == "open":
                self.sessions[sid] = {}
                reply = {"status": "ok", "lease": self.lease, "heartbeat": self.heartbeat}
            elif sid not in self.sessions:
                return {"status": "error", "code": "unknown_session", "detail": "no such session"}
            elif op == "heartbeat":
                return {"status": "ok", "lease": self.lease}
            elif op == "checkout":
                feature, count = msg["feature"], msg["count"]
                if feature not in self.total:
                    reply = {"status": "denied", "reason": "no_such_feature", "detail": "none"}
                elif self._in_use(feature) + count > self.total[feature]:
                    reply = {"status": "denied", "reason": "no_seats", "detail": "all in use"}
                else:
                    gid, self.next_grant = self.next_grant, self.next_grant + 1
                    self.sessions[sid][gid] = (feature, count)
                    grant = {"id": gid, "feature": feature, "version": "2.0", "count": count}
                    reply = {"status": "ok", "grant": grant}
            elif op == "checkin":
                if self.sessions[sid].pop(msg["grant"], None) is None:
                    reply = {"status": "denied", "reason": "not_held", "detail": "not held"}
                else:
                    self.checkins.append(msg["grant"])
                    reply = {"status": "ok"}
            elif op == "close":
                self.sessions.pop(sid, None)
                return {"status": "ok"}
            else:
                return {"status": "error", "code": "bad_request", "detail": f"op {op!r}"}
            self.recorded[key] = reply
            return reply


class FakeNode:
    def __init__(self, ledger: FakeLedger, mode: str = "primary") -> None:
        self.ledger = ledger
        self.mode = mode
        self.redirect_to: str | None = None
        self.swallow: Callable[[dict[str, Any]], bool] = lambda msg: False
        self.received: list[dict[str, Any]] = []
        self.connections: set[bytes] = set()  # ROUTER identities: one per client connection
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        port: int = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def ops(self, op: str) -> list[dict[str, Any]]:
        return [m for m in list(self.received) if m.get("op") == op]

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(10):
                continue
            ident, frame = self._sock.recv_multipart()
            self.connections.add(ident)
            msg = msgpack.unpackb(frame, raw=False)
            self.received.append(msg)
            reply = self._answer(msg)
            if reply is None:
                continue
            reply.update(v=1, sid=msg.get("sid"), req=msg.get("req"))
            if msg.get("op") == "status":
                reply["req"] = None  # as broker/node.py does
            self._sock.send_multipart([ident, msgpack.packb(reply, use_bin_type=True)])
        self._sock.close(linger=0)

    def _answer(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        if self.mode == "silent":
            return None
        if self.mode == "unavailable":
            return {"status": "unavailable", "detail": "no quorum"}
        if self.mode == "redirect":
            return {"status": "redirect", "primary": self.redirect_to}
        if msg.get("op") == "status":
            with self.ledger.lock:
                features = [
                    {"name": f, "total": t, "in_use": self.ledger._in_use(f)}
                    for f, t in self.ledger.total.items()
                ]
            return {"status": "ok", "report": {"node": "fake", "features": features}}
        reply = dict(self.ledger.handle(msg))
        return None if self.swallow(msg) else reply

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def free_endpoint() -> str:
    """A loopback endpoint nobody listens on."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(linger=0)
    return f"tcp://127.0.0.1:{port}"


def reqs(node: FakeNode, op: str) -> list[tuple[str, int]]:
    return [(m["sid"], m["req"]) for m in node.ops(op)]


# --- the basics


def test_checkout_checkin_and_context_managers(make_node: Callable[..., FakeNode]) -> None:
    ledger = FakeLedger({"cad": 3})
    node = make_node(ledger)
    with LicenseClient([node.endpoint], user="ann", host="ws1", display=":0") as client:
        grant = client.checkout("cad", count=2, version="1.0")
        assert (grant.feature, grant.count, grant.version, grant.triad) == (
            "cad",
            2,
            "2.0",
            (node.endpoint,),
        )
        assert grant.safe and ledger.in_use("cad") == 2
        with client.checkout("cad") as other:
            assert ledger.in_use("cad") == 3
        assert other.released and ledger.in_use("cad") == 2
        client.checkin(grant)
        client.checkin(grant)  # a second checkin does nothing
        assert ledger.in_use("cad") == 0
        opened = node.ops("open")[0]
        assert (opened["user"], opened["host"], opened["display"]) == ("ann", "ws1", ":0")
    assert node.ops("close"), "close() closes the session"


def test_denials_are_definite_with_reasons(make_node: Callable[..., FakeNode]) -> None:
    node = make_node(FakeLedger({"solver": 1}))
    with LicenseClient([node.endpoint]) as client:
        held = client.checkout("solver")
        with pytest.raises(LicenseDenied) as denied:
            client.checkout("solver")
        assert denied.value.reason == "no_seats" and denied.value.definite
        with pytest.raises(LicenseDenied) as denied:
            client.checkout("nonesuch")
        assert denied.value.reason == "no_such_feature"
        client.checkin(held)


@pytest.mark.parametrize("timeout", [0, -5, 0.0, float("nan"), True])
def test_a_call_given_no_time_is_refused_before_sending(
    make_node: Callable[..., FakeNode], timeout: Any
) -> None:
    node = make_node(FakeLedger({"cad": 1}))
    with LicenseClient([node.endpoint]) as client:
        grant = client.checkout("cad")
        for call in (
            lambda: client.checkout("cad", timeout=timeout),
            lambda: client.checkin(grant, timeout=timeout),
            lambda: client.status(timeout=timeout),
            lambda: client.set_idle(timeout=timeout),
        ):
            with pytest.raises(ValueError, match="timeout must be > 0 seconds"):
                call()
        assert len(node.ops("checkout")) == 1 and not node.ops("checkin")


def test_a_call_in_flight_when_the_client_is_closed_says_so(
    make_node: Callable[..., FakeNode],
) -> None:
    # It is not "no answer before the deadline": the deadline was far, and close() ended it.
    ledger = FakeLedger({"cad": 1})
    node = make_node(ledger)
    node.swallow = lambda msg: msg.get("op") == "checkout"  # decided, never answered
    client = LicenseClient([node.endpoint], timeout=30)
    failed: list[BaseException] = []

    def checkout() -> None:
        try:
            client.checkout("cad")
        except LicenseError as exc:
            failed.append(exc)

    caller = threading.Thread(target=checkout)
    caller.start()
    wait_until(lambda: node.ops("checkout"), what="the checkout to be sent")
    started = time.monotonic()
    client.close()
    caller.join(5)
    assert not caller.is_alive() and time.monotonic() - started < 3
    assert len(failed) == 1 and isinstance(failed[0], ClientClosed), failed
    assert "closed during the call" in str(failed[0])
    assert ledger.in_use("cad") == 0  # the close released what the checkout got


@pytest.mark.parametrize("feature", ["", "f" * 257, "f" * 100_000, None, b"cad"])
def test_a_feature_name_the_wire_cannot_carry_is_refused_before_sending(
    make_node: Callable[..., FakeNode], feature: Any
) -> None:
    # A 100 KB name is past the node's message cap: sent, it would never be answered.
    node = make_node(FakeLedger({"cad": 1}))
    with LicenseClient([node.endpoint]) as client:
        for call in (client.checkout, client.borrow, client.return_borrow):
            with pytest.raises(ValueError, match="feature must be a string of 1 to 256"):
                call(feature)
        assert not node.ops("checkout") and not node.ops("borrow") and not node.ops("return")
        with pytest.raises(LicenseDenied) as denied:  # the longest name is sent and answered
            client.checkout("f" * 256)
        assert denied.value.reason == "no_such_feature"


def test_status_needs_no_session(make_node: Callable[..., FakeNode]) -> None:
    node = make_node(FakeLedger({"cad": 4}))
    with LicenseClient([node.endpoint]) as client:
        report = client.status()
        assert report["features"] == [{"name": "cad", "total": 4, "in_use": 0}]
        assert not node.ops("open")


# --- finding the primary


def test_follows_redirect_and_remembers_the_primary(make_node: Callable[..., FakeNode]) -> None:
    ledger = FakeLedger({"cad": 5})
    a, b, c = make_node(ledger, "redirect"), make_node(ledger, "redirect"), make_node(ledger)
    a.redirect_to = c.endpoint
    b.redirect_to = None
    with LicenseClient([a.endpoint, b.endpoint, c.endpoint]) as client:
        first = client.checkout("cad")
        seen_by_a = len(a.received)
        second = client.checkout("cad")
        assert len(a.received) == seen_by_a, "later requests go straight to the primary"
        assert {first.id, second.id} == set(ledger.sessions[next(iter(ledger.sessions))])
        # Whether a saw the open depends on which connection came up first; if it did, it
        # redirected it, once, and the same request (sid, req) went on to c.
        opens_a, opens_c = reqs(a, "open"), reqs(c, "open")
        assert len(opens_a) <= 1 and set(opens_a) <= set(opens_c), "the same request went on"
        assert len(set(opens_c)) == 1, "one session opened"


def test_no_reply_retries_the_same_request(make_node: Callable[..., FakeNode]) -> None:
    # Whichever node the open reaches first (the connection that comes up first: either,
    # on a loaded machine) leaves it unanswered; the same request must be sent again, to
    # the other node or, when the library has no connection to it yet, the same one.
    ledger = FakeLedger({"cad": 5})
    answered_none: list[bool] = []

    def first_open_unanswered(msg: dict[str, Any]) -> bool:
        if msg.get("op") != "open" or answered_none:
            return False
        answered_none.append(True)
        return True

    a, b = make_node(ledger), make_node(ledger)
    a.swallow = b.swallow = first_open_unanswered
    with LicenseClient([a.endpoint, b.endpoint]) as client:
        client.checkout("cad")
        opens = reqs(a, "open") + reqs(b, "open")
        assert len(opens) >= 2 and len(set(opens)) == 1, "another request, not the same again"


def test_unavailable_moves_on_to_next_node(make_node: Callable[..., FakeNode]) -> None:
    ledger = FakeLedger({"cad": 5})
    a, b = make_node(ledger, "unavailable"), make_node(ledger)
    with LicenseClient([a.endpoint, b.endpoint]) as client:
        grant = client.checkout("cad")
        assert ledger.in_use("cad") == 1
        client.checkin(grant)


def test_only_unavailable_replies_is_definite(make_node: Callable[..., FakeNode]) -> None:
    ledger = FakeLedger({"cad": 5})
    a, b = make_node(ledger, "unavailable"), make_node(ledger, "redirect")
    with LicenseClient([a.endpoint, b.endpoint], timeout=0.6) as client:
        start = time.monotonic()
        with pytest.raises(LicenseUnavailable) as unavailable:
            client.checkout("cad")
        assert time.monotonic() - start < 0.6 + 0.3
        # the node's own word: "between primaries", not "nothing is running"
        assert f"(last answer: {a.endpoint}: no quorum)" in str(unavailable.value)


def test_a_checkout_waiting_on_a_frozen_primary_follows_the_new_one(
    make_node: Callable[..., FakeNode],
) -> None:
    # A frozen primary (SIGSTOP) breaks no connection, and a queued checkout gets no
    # answer until a seat frees: it sat on the frozen node for its whole wait (8 s in the
    # probe) while the new primary had seats. The 1 s heartbeat of a waiting session finds
    # the new primary, and the checkout goes to it: the same request, answered there.
    ledger = FakeLedger({"cad": 5}, lease=30.0, heartbeat=10.0)
    a, b = make_node(ledger), make_node(ledger, "redirect")
    b.redirect_to = a.endpoint
    a.swallow = lambda msg: msg.get("op") == "checkout"  # decided, waiting: no answer yet
    with LicenseClient([a.endpoint, b.endpoint], timeout=5) as client:
        client.status()  # the session opens on a first call: this one is unrelated
        got: list[Grant] = []
        waiter = threading.Thread(target=lambda: got.append(client.checkout("cad", wait=30)))
        waiter.start()
        wait_until(lambda: a.ops("checkout"), what="the checkout to reach a")
        a.mode, b.mode = "silent", "primary"  # a freezes; b takes over
        started = time.monotonic()
        waiter.join(10)
        assert got and got[0].feature == "cad", "the checkout waited out its wait on a"
        assert time.monotonic() - started < 5
        (sent,) = {(m["sid"], m["req"]) for m in a.ops("checkout")}
        assert {(m["sid"], m["req"]) for m in b.ops("checkout")} == {sent}  # the same one
        assert ledger.in_use("cad") == 1


def test_no_server_at_all_fails_within_the_deadline() -> None:
    client = LicenseClient([free_endpoint(), free_endpoint(), free_endpoint()], timeout=0.5)
    start = time.monotonic()
    with pytest.raises(LicenseUnavailable, match=r"\(no node answered\)"):
        client.checkout("cad")
    assert time.monotonic() - start < 0.5 + 0.3
    start = time.monotonic()
    client.close()
    assert time.monotonic() - start < 0.5
    client.close()  # idempotent
    with pytest.raises(ClientClosed):
        client.checkout("cad")


def test_checkout_waiting_for_an_unanswered_open_is_definite(
    make_node: Callable[..., FakeNode],
) -> None:
    node = make_node(FakeLedger({"cad": 5}), "silent")
    with LicenseClient([node.endpoint], timeout=0.5) as client, pytest.raises(LicenseUnavailable):
        client.checkout("cad")  # the open never got an answer: the checkout was never sent
    assert node.ops("open") and not node.ops("checkout")


# --- unknown outcomes are settled


def test_unknown_checkout_is_settled_and_checked_back_in(
    make_node: Callable[..., FakeNode],
) -> None:
    ledger = FakeLedger({"cad": 5})
    node = make_node(ledger)
    with LicenseClient([node.endpoint], timeout=0.6) as client:
        client.status()  # connect first, so the checkout's send is accepted at once
        mute = threading.Event()
        mute.set()
        node.swallow = lambda msg: mute.is_set() and msg.get("op") == "checkout"
        with pytest.raises(OutcomeUnknown) as unknown:
            client.checkout("cad", count=2)
        assert not unknown.value.definite
        assert ledger.in_use("cad") == 2, "the node did grant it"
        mute.clear()
        wait_until(lambda: ledger.in_use("cad") == 0, what="the settled grant to be checked in")
        sent = reqs(node, "checkout")
        assert len(set(sent)) == 1 and len(sent) >= 2, "settled by re-sending the same request"
        assert len(ledger.checkins) == 1


# --- the triad forgot the session


def test_unknown_session_reopens_and_checks_out_again(make_node: Callable[..., FakeNode]) -> None:
    ledger = FakeLedger({"cad": 2, "solver": 1}, heartbeat=0.05)
    node = make_node(ledger)
    lost: list[list[Grant]] = []
    with LicenseClient([node.endpoint], on_lost=lost.append) as client:
        cad = client.checkout("cad")
        solver = client.checkout("solver")
        old_sid, old_cad_id = next(iter(ledger.sessions)), cad.id
        ledger.expire(old_sid)
        ledger.taken["solver"] = 1  # someone else takes the freed solver seat
        wait_until(lambda: lost, what="on_lost")
        assert lost == [[solver]]
        assert solver.lost and solver.state is GrantState.LOST
        assert cad.safe and cad.id != old_cad_id, "cad was checked out again under a new id"
        new_sid = next(iter(ledger.sessions))
        assert new_sid != old_sid and ledger.sessions[new_sid] == {cad.id: ("cad", 1)}
        client.checkin(cad)
        assert ledger.checkins == [cad.id]
        client.checkin(solver)  # a lost grant holds nothing: nothing to do


def test_call_that_meets_unknown_session_is_resent(make_node: Callable[..., FakeNode]) -> None:
    ledger = FakeLedger({"cad": 2}, heartbeat=60)
    node = make_node(ledger)
    with LicenseClient([node.endpoint]) as client:
        client.checkin(client.checkout("cad"))
        ledger.expire(next(iter(ledger.sessions)))
        grant = client.checkout("cad")
        assert len(node.ops("open")) == 2 and grant.safe


# --- the lease


def test_lease_lapse_reports_grants_unsafe_then_safe_again(
    make_node: Callable[..., FakeNode],
) -> None:
    ledger = FakeLedger({"cad": 2}, lease=0.5, heartbeat=0.1)
    node = make_node(ledger)
    lost: list[list[Grant]] = []
    with LicenseClient([node.endpoint], on_lost=lost.append) as client:
        grant = client.checkout("cad")
        node.mode = "silent"
        start = time.monotonic()
        wait_until(lambda: lost, timeout=3, what="on_lost after the lease")
        assert time.monotonic() - start <= 0.5 + 0.2, "lapses no later than the triad's lease"
        assert lost == [[grant]] and grant.state is GrantState.UNSAFE
        node.mode = "primary"  # the triad still knows the session: heartbeats renew it
        wait_until(lambda: grant.safe, what="grant safe again")
        client.checkin(grant)


def test_lease_lapse_without_callback_raises_lease_lost(make_node: Callable[..., FakeNode]) -> None:
    ledger = FakeLedger({"cad": 2}, lease=0.4, heartbeat=0.1)
    node = make_node(ledger)
    with LicenseClient([node.endpoint], timeout=1.0) as client:
        grant = client.checkout("cad")
        node.mode = "silent"
        # UNSAFE, not only `not safe` (which the clock turns at the deadline): then reported
        wait_until(lambda: grant.state is GrantState.UNSAFE, what="the lease to lapse")
        with pytest.raises(LeaseLost) as lost:
            client.checkout("cad")
        assert lost.value.lost == (grant,)
        node.mode = "primary"
        wait_until(lambda: grant.safe, what="grant safe again")
        client.checkout("cad")  # reported once: the next call goes through


def test_cut_off_longer_than_the_lease_then_checked_out_again(
    make_node: Callable[..., FakeNode],
) -> None:
    ledger = FakeLedger({"cad": 2, "solver": 1}, lease=0.4, heartbeat=0.1)
    node = make_node(ledger)
    lost: list[list[Grant]] = []
    with LicenseClient([node.endpoint], on_lost=lost.append) as client:
        cad, solver = client.checkout("cad"), client.checkout("solver")
        node.mode = "silent"
        wait_until(lambda: lost, what="the lease to lapse")
        assert lost == [[cad, solver]] and not cad.safe and not solver.safe
        ledger.expire(next(iter(ledger.sessions)))  # the triad expired the session too
        ledger.taken["solver"] = 1
        node.mode = "primary"
        wait_until(lambda: len(lost) == 2, what="the re-checkout's report")
        assert lost[1] == [solver] and solver.lost
        assert cad.safe and ledger.sessions[next(iter(ledger.sessions))] == {cad.id: ("cad", 1)}


# --- threads and license paths


def test_several_threads_check_out_concurrently(make_node: Callable[..., FakeNode]) -> None:
    ledger = FakeLedger({"cad": 100})
    node = make_node(ledger)
    errors: list[BaseException] = []
    with LicenseClient([node.endpoint]) as client:

        def work() -> None:
            try:
                for _ in range(20):
                    grant = client.checkout("cad")
                    client.checkin(grant)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        sent = reqs(node, "checkout")
        assert len(sent) == len(set(sent)) == 160
        assert ledger.in_use("cad") == 0


def test_clients_of_a_process_share_connections_and_get_their_own_replies(
    make_node: Callable[..., FakeNode],
) -> None:
    # clients/engine.py: one I/O thread for the process, 32 clients per connection, and
    # every reply routed by its sid (a status by the client's tag; the fakes send its req
    # nil, as older nodes did).
    ledger = FakeLedger({"cad": 100})
    node = make_node(ledger)
    clients = [LicenseClient([node.endpoint], user=f"u{i}") for i in range(100)]
    try:
        with ThreadPoolExecutor(10) as pool:
            grants = list(pool.map(lambda c: c.checkout("cad"), clients))
            reports = list(pool.map(lambda c: c.status(), clients))
        assert ledger.in_use("cad") == 100 and len({g.id for g in grants}) == 100
        assert all(r["node"] == "fake" for r in reports)
        assert len(node.connections) == 4
        assert len(ledger.sessions) == 100
        for client, grant in zip(clients, grants, strict=True):
            client.checkin(grant)  # denied not_held if it had reached another session
        assert ledger.in_use("cad") == 0
    finally:
        for client in clients:
            client.close()
    assert ledger.sessions == {}


def test_license_path_tries_entries_in_order(make_node: Callable[..., FakeNode]) -> None:
    empty, full = make_node(FakeLedger({})), make_node(FakeLedger({"cad": 1}))
    path = ":".join(e.rsplit(":", 1)[1] + "@127.0.0.1" for e in (empty.endpoint, full.endpoint))
    with LicenseClient(path) as client:
        grant = client.checkout("cad")
        assert grant.triad == (full.endpoint,)
        with pytest.raises(LicenseDenied) as denied:
            client.checkout("cad")
        assert denied.value.reason == "no_seats", "the denial closest to success is reported"
        client.checkin(grant)
    assert empty.ops("open") and full.ops("close")


def test_license_path_from_environment(
    make_node: Callable[..., FakeNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_node(FakeLedger({"cad": 1}))
    monkeypatch.setenv("ZBROKER_LICENSE", node.endpoint.rsplit(":", 1)[1] + "@127.0.0.1")
    with LicenseClient() as client:
        assert client.entries == [(node.endpoint,)]
        client.checkin(client.checkout("cad"))


def test_close_returns_promptly_with_the_triad_gone(make_node: Callable[..., FakeNode]) -> None:
    node = make_node(FakeLedger({"cad": 1}))
    client = LicenseClient([node.endpoint])
    grant = client.checkout("cad")
    node.stop()
    start = time.monotonic()
    client.close()
    assert time.monotonic() - start < 2.5
    assert grant.released


def test_a_status_reply_with_many_holders_decodes() -> None:
    # Replies are bounded by their frame, not by a request's caps: 100,000 grants make a
    # status reply of several megabytes with one long list of holders.
    from zbroker.broker.wire import encode_reply
    from zbroker.clients.wire import decode_reply

    holders = [{"grant": i, "user": f"u{i}", "count": 1} for i in range(5000)]
    report = {"features": [{"name": "cad", "holders": holders}]}
    reply = decode_reply(encode_reply({"status": "ok", "report": report}, None, 7))
    assert reply.status == "ok" and reply.req == 7
    assert len(reply.body["report"]["features"][0]["holders"]) == 5000
