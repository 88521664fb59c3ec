"""Fixtures that start real nodes, and a raw protocol client for poking them."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from broker.status import default_curve
from clients.testing import LocalTriad
from clients.wire import decode_reply, encode_request


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.stash[_FAILED] = report.failed


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def make_triad(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    """Start a LocalTriad with other settings; stopped (logs shown on failure) at teardown."""
    made: list[LocalTriad] = []

    def make(**kwargs: Any) -> LocalTriad:
        triad = LocalTriad(tmp_path / f"triad{len(made)}", **kwargs)
        made.append(triad)
        triad.start()
        return triad

    yield make
    for triad in made:
        triad.stop()
        if request.node.stash.get(_FAILED, False):
            print(triad.log_text())  # shown by pytest under "Captured stdout teardown"


@pytest.fixture
def single(make_triad: Any) -> LocalTriad:
    """One unreplicated node with a short lease, in plain TCP (its tests poke it with raw
    sockets; tests/test_security.py and tests/test_hostile.py cover secure mode)."""
    triad: LocalTriad = make_triad(servers=1, lease=1.5, secure=False)
    return triad


@pytest.fixture
def triad(make_triad: Any) -> LocalTriad:
    """Three nodes with the default timings."""
    made: LocalTriad = make_triad(servers=3, lease=5.0)
    return made


class RawClient:
    """Speaks docs/protocol.md by hand over one DEALER: for tests of the node itself."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        curve = default_curve([endpoint])  # a secure LocalTriad shares its nodes' keys
        if curve is not None:
            curve.apply(self.sock, endpoint)
        self.sock.connect(endpoint)
        self.sid = uuid.uuid4().hex
        self.reqs = itertools.count(1)

    def send(self, **fields: Any) -> int:
        fields.setdefault("sid", self.sid)
        fields.setdefault("req", next(self.reqs))
        self.sock.send(encode_request(fields))
        return int(fields["req"])

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        if not self.sock.poll(timeout * 1000):
            raise TimeoutError(f"no reply within {timeout} s")
        return dict(decode_reply(self.sock.recv()).body)

    def call(self, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        req = self.send(**fields)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.recv(max(0.01, deadline - time.monotonic()))
            if reply.get("req") == req or fields.get("op") == "status":
                return reply

    def open(self) -> dict[str, Any]:
        return self.call(
            op="open", user="tester", host="testhost", display=":0", client_version="raw"
        )

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def raw() -> Iterator[Any]:
    made: list[RawClient] = []

    def make(endpoint: str) -> RawClient:
        client = RawClient(endpoint)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
