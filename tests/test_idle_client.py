"""The library's idle mark (``LicenseClient.set_idle``, ``Link.set_idle``): sent on the
open session, never opening one for itself, and sent again on a session the link opens
later (docs/client.md, "Idle and busy")."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest

from tests.test_link import Rig, unknown_session
from zbroker.clients.link import SessionState
from zbroker.clients.protocol import Status

pytestmark = pytest.mark.unit


def set_idle(rig: Rig, idle: bool = True) -> Future[Any]:
    fut: Future[Any] = Future()
    rig.link.set_idle(fut, rig.now, idle, rig.now + 2.0)
    return fut


def test_a_link_without_a_session_opens_none_and_remembers() -> None:
    rig = Rig()
    fut = set_idle(rig)
    assert fut.result(0) is None and rig.wire.frames == [] and rig.link.idle
    assert rig.link.state is SessionState.CLOSED


def test_an_open_session_is_marked_idle_and_busy_again() -> None:
    rig = Rig()
    rig.hold(1)
    fut = set_idle(rig)
    sent = rig.wire.last("idle")
    assert sent.msg["idle"] is True and sent.msg["sid"] == rig.link.sid
    rig.answer(sent)
    assert fut.exception(0) is None
    busy = set_idle(rig, False)
    sent = rig.wire.last("idle")
    assert sent.msg["idle"] is False and not rig.link.idle
    rig.answer(sent)
    assert busy.exception(0) is None


def test_a_refusal_is_the_callers_error() -> None:
    rig = Rig()
    rig.hold(1)
    fut = set_idle(rig)
    rig.answer(rig.wire.last("idle"), Status.ERROR, code="bad_request", detail="no")
    assert fut.exception(0) is not None


def test_a_new_session_is_marked_idle_as_it_opens() -> None:
    rig = Rig(recover_timeout=3.0)
    rig.hold(1)
    fut = set_idle(rig)
    rig.answer(rig.wire.last("idle"))
    assert fut.exception(0) is None
    old = rig.link.sid
    rig.at(100.3)
    unknown_session(rig, rig.wire.last("heartbeat"))  # the triad forgot the session
    rig.open_ok()
    again = rig.wire.last("idle")
    assert again.msg["sid"] == rig.link.sid != old and again.msg["idle"] is True
