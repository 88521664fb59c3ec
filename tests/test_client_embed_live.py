"""The library as a guest of its host process, where a real process is needed: a node
that queues a checkout, and a fork whose parent held a client's lock."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from zbroker import LicenseClient
from zbroker.clients.errors import ClientForked
from zbroker.clients.testing import LocalTriad, wait_for

pytestmark = pytest.mark.integration


def test_a_queued_checkout_interrupted_gives_back_the_seat_it_gets(single: LocalTriad) -> None:
    single.wait_for_primary()
    with (
        LicenseClient(single.endpoints, user="hog") as hog,
        LicenseClient(single.endpoints, user="app") as app,
    ):
        held = hog.checkout("solver", count=2)

        def ctrl_c(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGALRM, ctrl_c)
        signal.setitimer(signal.ITIMER_REAL, 0.5)  # while it waits in the node's queue
        try:
            with pytest.raises(KeyboardInterrupt):
                app.checkout("solver", wait=20)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        hog.checkin(held)  # the queued request is granted now, to nobody
        wait_for(
            lambda: (
                single.feature("solver")["in_use"] == 0 and not single.feature("solver")["queued"]
            ),
            5.0,
            "the seat given to the abandoned request checked back in",
        )
        assert app.checkout("solver", count=2).count == 2


def test_close_in_a_forked_child_returns_though_a_parent_thread_held_the_lock() -> None:
    client = LicenseClient(["tcp://127.0.0.1:9"])
    holding, forked = threading.Event(), threading.Event()

    def holder() -> None:  # a thread of the parent inside the client at fork time
        with client._lock:
            holding.set()
            forked.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: no thread will ever release the copied lock
        code = 1
        try:
            client.close()
            try:
                client.checkout("cad")
            except ClientForked:
                code = 0
        finally:
            os._exit(code)
    forked.set()
    thread.join(5)
    deadline = time.monotonic() + 5
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the child's exit, with a deadline
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("close() in the forked child hung on a lock a parent thread held")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    client.close()
