"""The bench's replication floor (clients/testing/bench/floor.py) is a floor of a triad,
not another echo: it answers a request only once two of its three disks hold it, and
keeps answering with one follower gone."""

from __future__ import annotations

from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
import zmq

from zbroker.broker.demo import free_ports
from zbroker.broker.storage import read_log
from zbroker.clients.testing.bench import floor
from zbroker.clients.testing.kit import wait_for

pytestmark = pytest.mark.integration

ANSWER_WITHIN_MS = 5_000


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[list[BaseProcess], zmq.Socket[bytes]]]:
    client, *peers = (f"tcp://127.0.0.1:{port}" for port in free_ports(4))
    procs = floor.start(client, peers, tmp_path, fsync=True)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(client)
    try:
        yield procs, dealer
    finally:
        dealer.close()
        ctx.term()
        for proc in procs:
            proc.terminate()
            proc.join(5)


def _logged(data: Path) -> list[bytes]:
    return [delta["r"] for _, _, delta in read_log(data)[1]]


def _ask(dealer: zmq.Socket[bytes], request: bytes) -> bytes | None:
    dealer.send(request)
    return dealer.recv() if dealer.poll(ANSWER_WITHIN_MS) else None


def test_the_floor_answers_each_request_once_two_disks_hold_it(
    running: tuple[list[BaseProcess], zmq.Socket[bytes]], tmp_path: Path
) -> None:
    procs, dealer = running
    requests = [b"request %d" % i for i in range(20)]
    for request in requests:
        assert _ask(dealer, request) == request  # one at a time: each answered before the next
        # answered: the leader's disk and a follower's hold it (the leader syncs before it
        # counts, a follower before it acknowledges)
        assert _logged(tmp_path / "lead")[-1] == request
        assert request in _logged(tmp_path / "f1") + _logged(tmp_path / "f2")

    procs[1].terminate()  # one follower gone: the other's disk makes the quorum
    procs[1].join(5)
    assert _ask(dealer, b"with f2 only") == b"with f2 only"
    assert _logged(tmp_path / "f2")[-1] == b"with f2 only"

    procs[2].terminate()  # both gone: one disk is no quorum, so no answer
    procs[2].join(5)
    dealer.send(b"alone")
    wait_for(lambda: _logged(tmp_path / "lead")[-1:] == [b"alone"], 5.0, "the leader's write")
    assert dealer.poll(500) == 0, "answered with the request on the leader's disk only"
