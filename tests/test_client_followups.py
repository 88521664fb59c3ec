"""The client library's follow-ups to the probes of an embedding application: a client
dropped with grants it never checked in, a queued checkout's wait across failovers,
the contract values each reply carries, a connection the node's ZAP handler refused.
Against test_link.py's rig (Link alone, a fake clock) or test_client.py's scripted
nodes (real ROUTER sockets on loopback)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import msgpack
import pytest
import zmq
from test_client import FakeLedger, FakeNode, wait_until
from test_link import ENDPOINTS, HEARTBEAT, LEASE, Rig, unknown_session
from zmq.auth.thread import ThreadAuthenticator

from zbroker import LicenseClient
from zbroker.clients import engine as engine_module
from zbroker.clients.curve import process_keypair
from zbroker.clients.errors import LicenseUnavailable
from zbroker.clients.protocol import Status

pytestmark = pytest.mark.unit


# --- 1. a client dropped unclosed, its grants never checked in


def test_a_client_dropped_with_its_grants_is_closed_and_a_kept_grant_keeps_it(
    make_node: Callable[..., FakeNode],
) -> None:
    ledger = FakeLedger({"cad": 3})
    primary = make_node(ledger)

    def checkout() -> object:
        return LicenseClient([primary.endpoint], timeout=2).checkout("cad")  # never closed

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        kept = checkout()  # the grant kept (in use), its client dropped
        checkout()  # client and grant both dropped, the grant never checked in
        gc.collect()
        wait_until(lambda: len(ledger.sessions) == 1, timeout=3, what="the dropped one closed")
        assert ledger.in_use("cad") == 1
        assert [w for w in warned if issubclass(w.category, ResourceWarning)], warned
        # The kept grant holds its client: still safe, and it checks in through it.
        assert kept.safe  # type: ignore[attr-defined]
        kept.release()  # type: ignore[attr-defined]
        assert ledger.in_use("cad") == 0 and len(ledger.sessions) == 1
        del kept
        gc.collect()
        wait_until(lambda: not ledger.sessions, timeout=3, what="the last session closed")


# --- 2. a queued checkout's wait across failovers


def test_each_copy_of_a_queued_checkout_asks_for_what_is_left_of_its_wait() -> None:
    rig = Rig()
    fut = rig.checkout(wait=6.0, timeout=10.0)
    rig.open_ok()
    first = rig.wire.last("checkout")
    assert first.msg["wait"] == pytest.approx(6.0)
    rig.at(rig.now + 3.0)
    rig.answer(first, Status.REDIRECT, primary=ENDPOINTS[1])  # a failover: the new primary
    again = rig.wire.last("checkout")
    assert again.node == 1 and again.msg["req"] == first.msg["req"]  # the same request
    assert again.msg["wait"] == pytest.approx(3.0)  # not 6 more from now
    rig.at(rig.now + 4.0)
    rig.answer(again, Status.UNAVAILABLE, detail="election")  # and another, past the wait
    last = rig.wire.last("checkout")
    assert last.msg["req"] == first.msg["req"] and last.msg["wait"] == 0.0
    assert not fut.done()


def test_a_checkout_resent_on_a_new_session_keeps_its_end_of_wait() -> None:
    rig = Rig()
    rig.checkout(wait=6.0, timeout=10.0)
    rig.open_ok()
    rig.at(rig.now + 2.0)
    unknown_session(rig, rig.wire.last("checkout"))  # no effect: sent again, newly opened
    rig.open_ok()
    assert rig.wire.last("checkout").msg["wait"] == pytest.approx(4.0)


# --- 3. the contract of the primary answering


def test_a_heartbeat_reply_with_a_shorter_lease_shortens_the_heartbeat_interval() -> None:
    rig = Rig()
    rig.hold()  # lease 1.0, heartbeats every 0.3
    rig.at(rig.now + HEARTBEAT)
    beat = rig.wire.last("heartbeat")
    rig.answer(beat, lease=LEASE / 4)  # a primary with a quarter of the lease took over
    assert rig.link.lease == LEASE / 4
    assert rig.link.heartbeat == pytest.approx(HEARTBEAT / 4)  # its share of the lease
    assert rig.link.next_timer() <= rig.now + HEARTBEAT / 4
    rig.at(rig.now + HEARTBEAT / 4)
    assert rig.wire.last("heartbeat") is not beat, "the next heartbeat by the new interval"


def test_a_reply_that_names_the_heartbeat_interval_is_followed() -> None:
    rig = Rig()
    rig.hold()
    rig.at(rig.now + HEARTBEAT)
    rig.answer(rig.wire.last("heartbeat"), lease=2 * LEASE, heartbeat=0.1)
    assert (rig.link.lease, rig.link.heartbeat) == (2 * LEASE, 0.1)
    rig.at(rig.now + 0.1)
    assert rig.wire.last("heartbeat").msg["req"] != rig.wire.of("heartbeat")[0].msg["req"]


def test_the_lease_copy_counts_by_the_lease_of_the_reply_that_renews_it() -> None:
    rig = Rig()
    grant = rig.hold()
    rig.at(rig.now + HEARTBEAT)
    sent_at = rig.now
    rig.answer(rig.wire.last("heartbeat"), lease=0.2)
    # The renewal counts by the new lease, not the old one the first primary gave.
    assert rig.link.lease_deadline < sent_at + LEASE
    assert grant.safe


# --- 4. a client key the node's ZAP handler refused, then listed


class _Gate:
    """A ZAP credentials provider: refuses every client key until opened."""

    def __init__(self) -> None:
        self.open = False

    def callback(self, domain: str, key: bytes) -> bool:
        return self.open


class CurveNode:
    """A scripted node (FakeLedger's answers) behind CURVE and a ZAP handler."""

    def __init__(self, ledger: FakeLedger) -> None:
        self.ledger, self.gate = ledger, _Gate()
        self.public, secret = zmq.curve_keypair()
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()  # its own ZAP handler
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve_callback(domain="clients", credentials_provider=self.gate)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.CURVE_SERVER, 1)
        self._sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        self._sock.setsockopt(zmq.ZAP_DOMAIN, b"clients")
        self.endpoint = f"tcp://127.0.0.1:{self._sock.bind_to_random_port('tcp://127.0.0.1')}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(10):
                continue
            ident, frame = self._sock.recv_multipart()
            msg = msgpack.unpackb(frame, raw=False)
            reply = dict(self.ledger.handle(msg), v=1, sid=msg.get("sid"), req=msg.get("req"))
            self._sock.send_multipart([ident, msgpack.packb(reply, use_bin_type=True)])
        self._sock.close(linger=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._auth.stop()
        self._ctx.term()


@pytest.fixture
def curve_node() -> Iterator[CurveNode]:
    made = CurveNode(FakeLedger({"cad": 2}))
    yield made
    made.stop()


def test_a_refused_key_is_named_and_dialled_again_once_listed(
    curve_node: CurveNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "REFUSED_RETRY", 0.1)  # the rule, at a test's pace
    keys = {curve_node.endpoint: curve_node.public.decode()}
    client = LicenseClient([curve_node.endpoint], server_keys=keys, timeout=1.0)
    try:
        with pytest.raises(LicenseUnavailable) as refused:
            client.checkout("cad")
        assert "no node answered" not in str(refused.value)
        assert f"{curve_node.endpoint}: the node refused this client's key (client_allow)" in str(
            refused.value
        )
        assert process_keypair().public in str(refused.value)  # the key to list
        curve_node.gate.open = True  # the administrator lists the key
        client.checkout("cad", timeout=3.0)  # the same client, on its shared connection
        with LicenseClient([curve_node.endpoint], server_keys=keys, timeout=3.0) as other:
            other.checkout("cad")  # and a new one in the same process
            assert curve_node.ledger.in_use("cad") == 2
    finally:
        client.close()


def test_the_primarys_connection_dropping_brings_the_heartbeat_forward() -> None:
    rig = Rig()
    rig.hold()
    beats = len(rig.wire.of("heartbeat"))
    rig.link.on_disconnected(1, rig.now)  # a backup: nothing to learn
    assert rig.link.next_timer() > rig.now
    rig.link.on_disconnected(rig.link.primary, rig.now)  # the primary stopped
    assert rig.link.next_timer() <= rig.now
    rig.wire.refuse.add(0)
    rig.at(rig.now)
    assert len(rig.wire.of("heartbeat")) == beats + 1  # sent, to the next node
    rig.answer(rig.wire.last("heartbeat"), lease=LEASE / 4)
    assert rig.link.heartbeat == pytest.approx(HEARTBEAT / 4)


# --- 5. asyncio: a checkout given up by its coroutine


def test_checkout_async_grants_and_a_cancelled_one_gives_back_what_it_gets(
    make_node: Callable[..., FakeNode],
) -> None:
    ledger = FakeLedger({"cad": 2})
    primary = make_node(ledger)
    client = LicenseClient([primary.endpoint], timeout=5)

    async def main() -> None:
        grant = await client.checkout_async("cad")
        assert grant.safe and ledger.in_use("cad") == 1
        grant.release()
        primary.swallow = lambda msg: msg.get("op") == "checkout"  # granted, answer lost
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.checkout_async("cad"), 0.3)

    try:
        started = time.monotonic()
        asyncio.run(main())  # waits for the executor's thread: the call was abandoned
        assert time.monotonic() - started < 2.5, "the thread waited out the call's timeout"
        wait_until(lambda: ledger.in_use("cad") == 1, what="the abandoned checkout granted")
        primary.swallow = lambda msg: False  # the library learns the grant, and gives it back
        wait_until(lambda: ledger.in_use("cad") == 0, what="the abandoned grant checked in")
    finally:
        client.close()
