"""A peer connection refused by the peer's ZAP handler is dialled again (broker/sockets.py):
libzmq never does it itself, and a node whose key a peer refused once (a key rotated on
one node before the others) stayed cut off from that peer until restarted (ops probe)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.auth.thread import ThreadAuthenticator

from zbroker.broker.config import load_config
from zbroker.broker.demo import write_demo
from zbroker.broker.model import Now
from zbroker.broker.security import NodeSecurity, secure_server
from zbroker.broker.sockets import REFUSED_RETRY, REFUSED_RETRY_MAX, NodeSockets, Redial
from zbroker.broker.zap_policy import PEER_DOMAIN
from zbroker.clients.curve import load_keypair
from zbroker.peers.messages import Heartbeat
from zbroker.peers.types import Role

pytestmark = pytest.mark.unit


def test_each_refusal_doubles_the_wait_up_to_the_most_and_an_accept_forgets_it() -> None:
    redial, key = Redial(), (None, "tcp://127.0.0.1:1")
    waits = []
    now = 0.0
    for _ in range(8):
        delay, first = redial.refused(key, now)  # type: ignore[arg-type]
        waits.append((delay, first))
        assert redial.due(now + delay - 0.01) == []
        assert redial.due(now + delay) == [key]
        assert redial.due(now + delay) == []  # once, until refused again
        now += delay
    assert waits[0] == (REFUSED_RETRY, True)
    assert [w for w, _ in waits][:3] == [REFUSED_RETRY, 2 * REFUSED_RETRY, 4 * REFUSED_RETRY]
    assert max(w for w, _ in waits) == REFUSED_RETRY_MAX
    assert not any(first for _, first in waits[1:])
    assert redial.accepted(key)  # type: ignore[arg-type]
    assert not redial.accepted(key)  # type: ignore[arg-type]
    assert redial.refused(key, now) == (REFUSED_RETRY, True)  # type: ignore[arg-type]


class _Gate:
    """A ZAP credentials provider that refuses every key until opened."""

    def __init__(self) -> None:
        self.open = False

    def callback(self, domain: str, key: bytes) -> bool:
        return self.open


def test_a_peer_that_refused_this_nodes_key_hears_it_once_it_accepts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(write_demo(tmp_path / "demo"))
    beta, alpha = config.node("beta"), config.node("alpha")
    ctx: zmq.Context[Any] = zmq.Context()
    other: zmq.Context[Any] = zmq.Context()  # alpha's: a ZAP handler is one per context
    gate = _Gate()
    auth = ThreadAuthenticator(other)
    auth.start()
    auth.configure_curve_callback(domain=PEER_DOMAIN, credentials_provider=gate)
    sockets = NodeSockets(ctx, config, beta, NodeSecurity.from_config(config, "beta"))
    # alpha, played by a ROUTER with alpha's key, whose ZAP handler refuses beta first
    assert alpha.secret_key is not None
    router = other.socket(zmq.ROUTER)
    secure_server(router, load_keypair(alpha.secret_key), PEER_DOMAIN)
    router.bind(alpha.peer)
    hello = Heartbeat(1, "beta", Role.BACKUP, 0, 0, 0, None).to_wire()

    def cycle() -> None:
        sockets.send_peers([("alpha", hello)])
        sockets.read(sockets.poll(20), lambda event, now: None, Now(time.monotonic(), 0.0))

    try:
        deadline = time.monotonic() + 10.0
        while "alpha refused this node's key" not in caplog.text:
            assert time.monotonic() < deadline, "alpha's refusal was never seen"
            cycle()
        assert router.poll(0) == 0
        gate.open = True  # alpha accepts beta's key from now on; libzmq will not dial again
        while router.poll(0) == 0:
            assert time.monotonic() < deadline, "beta never dialled alpha again"
            cycle()
        while "alpha accepts this node's key again" not in caplog.text:
            assert time.monotonic() < deadline, "the acceptance was never logged"
            cycle()
    finally:
        auth.stop()
        other.destroy(linger=0)
        ctx.destroy(linger=0)
