"""A real single node process: checkout, deny, queue, expire, retry, bad input."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from zbroker import LicenseClient, LicenseDenied
from zbroker.clients.testing import LocalTriad, wait_for

pytestmark = pytest.mark.integration


def test_checkout_checkin_and_status(single: LocalTriad) -> None:
    single.wait_for_primary()
    with LicenseClient(single.endpoints, user="ann", host="ws1") as client:
        grant = client.checkout("cad", count=3, version="2.0")
        assert (grant.feature, grant.count, grant.version) == ("cad", 3, "2.0")
        cad = single.feature("cad")
        assert (cad["total"], cad["in_use"]) == (15, 3)
        assert [(h["user"], h["host"], h["count"]) for h in cad["holders"]] == [("ann", "ws1", 3)]
        client.checkin(grant)
        assert single.feature("cad")["in_use"] == 0


def test_denials_carry_reasons(single: LocalTriad) -> None:
    single.wait_for_primary()
    with LicenseClient(single.endpoints) as client:
        first = client.checkout("solver", count=2)
        with pytest.raises(LicenseDenied) as denied:
            client.checkout("solver")
        assert denied.value.reason == "no_seats"
        with pytest.raises(LicenseDenied) as denied:
            client.checkout("cad", version="9.0")
        assert denied.value.reason == "version_too_high"
        with pytest.raises(LicenseDenied) as denied:
            client.checkout("nonesuch")
        assert denied.value.reason == "no_such_feature"
        client.checkin(first)


def test_queued_checkout_granted_when_a_seat_frees(single: LocalTriad) -> None:
    single.wait_for_primary()
    with LicenseClient(single.endpoints) as holder, LicenseClient(single.endpoints) as waiter:
        held = holder.checkout("solver", count=2)
        result: dict[str, Any] = {}

        def wait_for_seat() -> None:
            try:
                result["grant"] = waiter.checkout("solver", wait=10.0)
            except Exception as exc:  # the assertion below reports it
                result["error"] = exc

        thread = threading.Thread(target=wait_for_seat)
        thread.start()
        wait_for(lambda: single.feature("solver")["queued"] == 1, 5.0, "a queued request")
        holder.checkin(held)
        thread.join(timeout=10)
        assert "error" not in result, result
        assert result["grant"].feature == "solver"


def test_silent_session_expires_and_seats_return(single: LocalTriad, raw: Any) -> None:
    single.wait_for_primary()
    client = raw(single.endpoints[0])
    assert client.open()["status"] == "ok"
    reply = client.call(op="checkout", feature="solver", count=2)
    assert reply["status"] == "ok", reply
    assert single.feature("solver")["in_use"] == 2
    # No heartbeats: the 1.5 s lease runs out and the seats come back.
    wait_for(lambda: single.feature("solver")["in_use"] == 0, 10.0, "lease expiry")
    after = client.call(op="heartbeat")
    assert (after["status"], after["code"]) == ("error", "unknown_session")


def test_retried_request_has_one_effect(single: LocalTriad, raw: Any) -> None:
    single.wait_for_primary()
    client = raw(single.endpoints[0])
    client.open()
    first = client.call(op="checkout", feature="cad", count=4, req=100)
    again = client.call(op="checkout", feature="cad", count=4, req=100)
    assert first["status"] == "ok"
    assert again == first
    assert single.feature("cad")["in_use"] == 4


def test_malformed_burst_changes_nothing(single: LocalTriad, raw: Any) -> None:
    single.wait_for_primary()
    client = raw(single.endpoints[0])
    client.open()
    client.call(op="checkout", feature="cad", count=1)
    before = single.status()["features"]
    junk_client = raw(single.endpoints[0])
    junk = [
        [b""],
        [b"\xc1"],
        [b"\x92\x01"],
        [b"\xde\xff\xff"],
        [b"not msgpack at all"],
        [b"\x81\xa2op\xa8checkout"],
        [b"a", b"b", b"c"],
    ]
    for frames in junk:
        junk_client.send_frames(frames)
    for fields in (
        {"v": 2, "op": "open"},
        {"v": 1, "op": "explode", "sid": "x", "req": 1},
        {"v": 1, "op": "checkout", "sid": client.sid, "req": 50, "feature": 7},
        {"v": 1, "op": "checkout", "sid": client.sid, "req": -1, "feature": "cad"},
        {"v": 1, "op": "checkout", "sid": client.sid, "req": 51, "feature": "cad", "count": 10**9},
        {"v": 1, "op": "checkin", "sid": client.sid, "req": 52, "grant": "one"},
        {"v": 1, "op": "open", "sid": "s" * 500, "req": 1},
    ):
        junk_client.send_map(fields)
    errors = 0
    while junk_client.sock.poll(1000):
        decoded = junk_client.reply(0)
        assert decoded.status == "error", decoded
        errors += 1
    assert errors >= 12  # every map-shaped or msgpack-broken request got an error answer
    big = raw(single.endpoints[0])
    big.send_frames([b"\x00" * (1 << 20)])  # over max_message: the node drops the connection
    big.close()
    junk_client.close()
    assert single.status()["features"] == before
    assert client.call(op="checkout", feature="cad", count=1)["status"] == "ok"
