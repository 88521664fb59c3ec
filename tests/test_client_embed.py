"""The library as a guest of its host process: what the host does to a call or a client.

A wait interrupted (a signal handler's exception, KeyboardInterrupt), a client dropped
without ``close()``, a ``with grant:`` block left by an exception while no node answers,
a process stopped past its lease, logging left unconfigured, license paths written as
FlexNet users write them. Against the scripted nodes of test_client.py (real ROUTER
sockets on loopback) or, for ``Link`` alone, test_link.py's rig.
"""

from __future__ import annotations

import gc
import importlib
import logging
import pickle
import pkgutil
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from test_client import FakeLedger, FakeNode, free_endpoint, wait_until
from test_link import Rig

import zbroker.clients
from zbroker import GrantState, LicenseClient
from zbroker.clients.errors import ClientClosed, LicenseError, LicensePathError
from zbroker.clients.licpath import ENV_VAR, resolve

pytestmark = pytest.mark.unit


class Interrupted(Exception):
    """What a signal handler of the application raises into the waiting thread."""


def _interrupt_after(seconds: float) -> Callable[[], None]:
    """Raise Interrupted in this (the main) thread after ``seconds``; returns the undo."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted("the application's signal handler")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)

    def undo() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)

    return undo


# --- a wait interrupted gives back what the call gets


def test_a_checkout_whose_wait_is_interrupted_gives_back_the_grant_it_gets_later(
    make_node: Callable[..., FakeNode],
) -> None:
    ledger = FakeLedger({"cad": 2})
    primary = make_node(ledger)
    mute = threading.Event()
    mute.set()
    primary.swallow = lambda msg: mute.is_set() and msg.get("op") == "checkout"
    with LicenseClient([primary.endpoint], timeout=10) as client:
        client.status()  # connected: the checkout is sent at once
        undo = _interrupt_after(0.2)
        try:
            with pytest.raises(Interrupted):
                client.checkout("cad")
        finally:
            undo()
        assert ledger.in_use("cad") == 1, "the node granted it; the reply is still to come"
        mute.clear()  # the library's re-send now gets the grant nobody waits for
        wait_until(lambda: ledger.in_use("cad") == 0, timeout=3, what="the grant checked in")
        assert client.checkout("cad", count=2).count == 2  # both seats free for the app


def test_link_abandon_gives_back_a_grant_got_before_or_after_it() -> None:
    rig = Rig()
    early = rig.checkout()
    rig.open_ok()
    rig.granted(rig.wire.last("checkout"), 1)  # got, but the caller had stopped waiting
    grant = early.result(0)
    rig.link.abandon(early, rig.now)
    assert grant.state is GrantState.RELEASED and rig.wire.last("checkin").msg["grant"] == 1

    late = rig.checkout()
    rig.link.abandon(late, rig.now)
    assert late.done() and rig.wire.of("checkin")[-1].msg["grant"] == 1
    rig.granted(rig.wire.last("checkout"), 2)
    assert rig.wire.last("checkin").msg["grant"] == 2, "the late grant is checked back in"
    assert rig.link.held == []


# --- a with block left by an exception keeps its exception


def test_a_with_block_raising_keeps_its_exception_while_no_node_answers_the_checkin(
    make_node: Callable[..., FakeNode],
) -> None:
    ledger = FakeLedger({"cad": 1})
    primary = make_node(ledger)
    with LicenseClient([primary.endpoint], timeout=0.5) as client:
        grant = client.checkout("cad")
        primary.mode = "unavailable"  # the checkin is refused: definite, still held
        with pytest.raises(KeyError, match="the application's own"), grant:
            raise KeyError("the application's own")
        assert grant.released, "released for the application: the library checks it in"
        assert ledger.in_use("cad") == 1
        primary.mode = "primary"
        wait_until(lambda: ledger.in_use("cad") == 0, timeout=5, what="the background checkin")


# --- safe is judged when read


def test_safe_turns_false_when_the_lease_copy_runs_out_even_with_the_io_thread_stuck(
    make_node: Callable[..., FakeNode],
) -> None:
    ledger = FakeLedger({"cad": 1}, lease=0.4, heartbeat=5.0)  # no heartbeat renews it
    primary = make_node(ledger)
    with LicenseClient([primary.endpoint], timeout=2) as client:
        grant = client.checkout("cad")
        assert grant.safe
        stuck = threading.Event()
        engine = client._engine
        assert engine is not None
        engine.post(lambda now: stuck.wait(5), Future())  # as after a SIGSTOP: no tick runs
        try:
            wait_until(lambda: not grant.safe, timeout=2, what="safe to turn False")
            assert grant.state is GrantState.HELD, "the I/O thread has not moved it yet"
        finally:
            stuck.set()


# --- a client dropped without close()


def test_a_client_collected_unclosed_closes_its_session(make_node: Callable[..., FakeNode]) -> None:
    ledger = FakeLedger({"cad": 1})
    primary = make_node(ledger)

    def job() -> None:
        client = LicenseClient([primary.endpoint], timeout=2)
        client.checkout("cad").release()  # a session, open and idle

    with pytest.warns(ResourceWarning, match="collected unclosed"):
        job()
        gc.collect()  # no cycle holds it, but the host may have turned gc off
    wait_until(lambda: not ledger.sessions, timeout=3, what="the session closed")


def test_a_client_cannot_be_pickled_and_says_what_to_do_instead() -> None:
    with (
        LicenseClient([free_endpoint()]) as client,
        pytest.raises(TypeError, match="create a LicenseClient in each process"),
    ):
        pickle.dumps(client)


def test_a_call_ended_by_close_does_not_speak_of_a_deadline(
    make_node: Callable[..., FakeNode],
) -> None:
    ledger = FakeLedger({"cad": 1})
    primary = make_node(ledger)
    primary.swallow = lambda msg: msg.get("op") == "checkout"
    client = LicenseClient([primary.endpoint], timeout=30)
    failed: list[LicenseError] = []

    def checkout() -> None:
        try:
            client.checkout("cad", wait=30)
        except LicenseError as exc:
            failed.append(exc)

    caller = threading.Thread(target=checkout)
    caller.start()
    wait_until(lambda: primary.ops("checkout"), what="the checkout sent")
    client.close()
    caller.join(5)
    assert len(failed) == 1 and isinstance(failed[0], ClientClosed)
    assert "deadline" not in str(failed[0]), failed[0]


# --- logging stays quiet until the application configures it


def test_every_logger_of_the_library_is_under_the_one_with_the_null_handler() -> None:
    quiet = logging.getLogger("zbroker.clients")
    assert any(isinstance(h, logging.NullHandler) for h in quiet.handlers)
    seen = []
    for info in pkgutil.iter_modules(zbroker.clients.__path__, "zbroker.clients."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, logging.Logger):
                seen.append(value.name)
                ancestors = []
                at: Any = value
                while at is not None:
                    ancestors.append(at)
                    at = at.parent
                assert quiet in ancestors, f"{info.name} logs to {value.name!r}"
    assert len(seen) >= 4


# --- license paths as FlexNet users write them

SERVER_FILE = """\
SERVER alpha ANY tcp://10.0.0.1:27001
SERVER beta  ANY tcp://10.0.0.2:27001
SERVER gamma ANY tcp://10.0.0.3:27001
"""


@pytest.mark.parametrize(
    ("servers", "named"),
    [
        ("tcp://127.0.0.1", "tcp://127.0.0.1"),  # no port
        (["tcp://127.0.0.1"], "tcp://127.0.0.1"),
        (["tcp://127.0.0.1:99999"], "99999"),
        (["tcp://127.0.0.1:0"], "tcp://127.0.0.1:0"),
        (["http://127.0.0.1:27001"], "http://127.0.0.1:27001"),
        (["tcp://bad host:1"], "bad host"),
        ("27001@bad!host", "bad!host"),
        ("99999@127.0.0.1", "99999"),
        (b"27001@127.0.0.1", "bytes"),
        (27001, "int"),
    ],
)
def test_every_endpoint_is_checked_whole_at_construction(servers: Any, named: str) -> None:
    with pytest.raises(LicensePathError) as refused:
        LicenseClient(servers)
    assert named in str(refused.value)


def test_a_semicolon_separates_entries_as_in_flexnet(tmp_path: Path) -> None:
    lic = tmp_path / "demo.lic"
    lic.write_text(SERVER_FILE)
    assert resolve(f"37843@127.0.0.1;{lic}") == [
        ("tcp://127.0.0.1:37843",),
        ("tcp://10.0.0.1:27001", "tcp://10.0.0.2:27001", "tcp://10.0.0.3:27001"),
    ]


def test_lm_license_file_is_read_when_zbroker_license_is_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("LM_LICENSE_FILE", "27001@h1")
    assert LicenseClient().entries == [("tcp://h1:27001",)]
    monkeypatch.setenv(ENV_VAR, "27002@h2")
    assert LicenseClient().entries == [("tcp://h2:27002",)], "ZBROKER_LICENSE comes first"


def test_a_flexnet_server_file_and_a_directory_of_license_files(tmp_path: Path) -> None:
    (tmp_path / "a.lic").write_text("SERVER lichost ANY 27010\nVENDOR acme\n")
    (tmp_path / "b.lic").write_text("SERVER other 0123456789AB\n")  # port left out: 27000
    (tmp_path / "notes.txt").write_text("not a license")
    expected = [("tcp://lichost:27010",), ("tcp://other:27000",)]
    assert resolve(str(tmp_path)) == expected
    assert LicenseClient(tmp_path).entries == expected, "a path object"
    assert LicenseClient(tmp_path / "a.lic").entries == expected[:1]
    (tmp_path / "bad.lic").write_text("SERVER lichost ANY 99999\n")
    with pytest.raises(LicensePathError, match=r"bad\.lic:1"):
        resolve(str(tmp_path))
