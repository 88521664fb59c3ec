"""The triad serves one license whoever is primary (issue 12 item 6): ``judge`` alone, then
three node cores whose files or vendor keys differ, through failovers (fake clock)."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.test_core import NAMES, WALL, Net, config, request
from zbroker.broker.core import NodeCore
from zbroker.broker.license import License, parse_license, sign_license_text
from zbroker.broker.model import Now
from zbroker.broker.served import DIFFERS, OwnLicense, judge
from zbroker.broker.storage import Loaded

pytestmark = pytest.mark.unit

TEXT = """\
VENDOR demo
FEATURE cad demo 2.0 permanent {cad}
FEATURE viewer demo 3.0 permanent 5
"""
VENDOR = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()  # another vendor's key, or a wrong copy


def signed(cad: int = 10, key: Ed25519PrivateKey = VENDOR) -> License:
    text = sign_license_text(TEXT.format(cad=cad), key)
    return parse_license(text, path="site.lic", public_key=key.public_key(), servers_required=False)


def own(lic: License, key: Ed25519PrivateKey = VENDOR) -> OwnLicense:
    return OwnLicense(lic.path, tuple(lic.entitlements), tuple(lic.signed), key.public_key())


# --- judge ----------------------------------------------------------------------------


def test_a_brand_new_triad_has_nothing_to_check() -> None:
    assert judge("n1", own(signed()), None, (), None, None).stands


def test_the_same_file_stands_without_a_note() -> None:
    lic = signed()
    verdict = judge("n1", own(lic), None, lic.entitlements, lic.signed, None)
    assert verdict.stands and verdict.note is None


def test_a_file_with_another_count_stands_and_says_how_it_differs() -> None:
    served, mine = signed(15), signed(3)
    verdict = judge("n3", own(mine), None, served.entitlements, served.signed, None)
    assert verdict.stands
    assert verdict.note is not None and verdict.note.startswith(f"{DIFFERS}: node n3's file")
    assert "cad 2.0: 3 seats here, 15 served" in verdict.note


def test_lines_of_another_vendor_key_cannot_be_vouched_for() -> None:
    served = signed()
    mine = signed(key=OTHER)
    verdict = judge("n2", own(mine, OTHER), None, served.entitlements, served.signed, None)
    assert not verdict.stands
    assert verdict.note is not None
    assert f"{DIFFERS}: node n2 cannot verify the triad's lines with its vendor key" in verdict.note
    assert "signature does not verify against the vendor key" in verdict.note


def test_entitlements_that_the_signed_lines_do_not_make_are_refused() -> None:
    served, more = signed(10), signed(99)
    # A primary replicating 99 seats of cad with the lines of a 10-seat license.
    verdict = judge("n2", own(served), None, more.entitlements, served.signed, None)
    assert not verdict.stands
    assert "do not make the entitlements it replicated" in (verdict.note or "")


def test_a_replicated_line_that_does_not_parse_is_refused() -> None:
    served = signed()
    lines = [*served.signed[:1], "FEATURE cad demo two permanent 3 SIGN=00"]
    verdict = judge("n2", own(served), None, served.entitlements, lines, None)
    assert not verdict.stands and "does not parse" in (verdict.note or "")


def test_an_older_nodes_reload_without_lines_stands_and_notes_a_difference() -> None:
    served, mine = signed(15), signed(3)
    verdict = judge("n3", own(mine), None, served.entitlements, None, None)
    assert verdict.stands and DIFFERS in (verdict.note or "")
    assert judge("n3", own(served), None, served.entitlements, None, None).note is None


def test_an_options_file_that_differs_is_noted() -> None:
    from zbroker.broker.options import parse_options

    lic = signed()
    options = parse_options("EXCLUDE cad USER hank\n", path="mine.opt")
    verdict = judge("n1", own(lic), options, lic.entitlements, lic.signed, None)
    assert verdict.stands
    assert verdict.notes == (
        "options differ from the triad's: node n1's options file (mine.opt) is not the one "
        "the triad serves; it serves the triad's until a reread on the primary",
    )


# --- three cores ----------------------------------------------------------------------


def core(name: str, lic: License, key: Ed25519PrivateKey, now: Now) -> NodeCore:
    return NodeCore(
        config(),
        name,
        tuple(lic.entitlements),
        Loaded(fresh=False),
        now,
        mode="plain",
        signed=tuple(lic.signed),
        vendor_key=key.public_key(),
    )


def net(**files: tuple[License, Ed25519PrivateKey]) -> Net:
    now = Now(100.0, WALL + 100.0)
    good = (signed(15), VENDOR)
    return Net({n: core(n, *files.get(n, good), now) for n in NAMES})


def served_cad(network: Net) -> set[int]:
    """The cad seats in each node's ledger (one value when they agree)."""
    cores = network.cores.values()
    return {sum(e.count for e in c.ledger.entitlements if e.feature == "cad") for c in cores}


def fail_over(network: Net, primary: str) -> str:
    """Cut ``primary`` off; run until another serves; its name."""
    network.cut = {primary}
    network.run(0.5)
    return network.serving()


def report(network: Net, name: str) -> dict[str, Any]:
    return network.cores[name].report(network.now)["nodes"][0]


def test_a_node_whose_file_differs_serves_the_triads_count_as_primary() -> None:
    network = net(n2=(signed(3), VENDOR))
    assert network.serving() == "n1"
    network.run(0.5)
    assert served_cad(network) == {15}
    assert report(network, "n2")["license"].startswith(f"{DIFFERS}: node n2's file")
    assert report(network, "n1")["license"] is None
    assert fail_over(network, "n1") == "n2"  # it may lead: it can verify the triad's lines
    network.run(1.0)
    assert served_cad(network) - {15} == set()  # n1 is cut off and holds 15 as well
    assert network.cores["n2"].ledger.entitlements == network.cores["n1"].ledger.entitlements
    network.cut = set()  # n1 comes back: failback, and still 15
    network.run(3.0)
    assert network.serving() == "n1" and served_cad(network) == {15}


def test_a_node_that_cannot_verify_never_becomes_primary() -> None:
    network = net(n2=(signed(15, OTHER), OTHER))
    assert network.serving() == "n1"
    network.run(0.5)
    assert not network.cores["n2"].replica.stands
    assert "cannot verify the triad's lines" in report(network, "n2")["license"]
    # n2 outranks n3, but n3 takes over; n2 votes for it
    assert fail_over(network, "n1") == "n3"
    network.run(2.0)
    assert network.cores["n2"].replica.role.value == "backup"
    assert served_cad(network) == {15}
    network.cycle("n3", request(b"c", op="open", sid="s1", req=1, user="ann", host="ws1"))
    network.run(0.2)
    network.cycle("n3", request(b"c", op="checkout", sid="s1", req=2, feature="cad", ack=2))
    network.run(0.2)
    assert network.cores["n3"].ledger.in_use("cad") == 1
    # n1 comes back: failback goes to n1, never to n2
    network.cut = set()
    network.run(3.0)
    assert network.serving() == "n1"


def test_a_reread_on_a_backup_changes_nothing_and_on_the_primary_every_node() -> None:
    network = net()
    primary = network.serving()
    network.run(0.5)
    backup = next(n for n in NAMES if n != primary)
    smaller = signed(3)
    network.cores[backup].reread(tuple(smaller.entitlements), None, tuple(smaller.signed),
                                 VENDOR.public_key(), network.now)  # fmt: skip
    network.run(0.5)
    assert served_cad(network) == {15}
    assert DIFFERS in report(network, backup)["license"]
    network.cores[primary].reread(tuple(smaller.entitlements), None, tuple(smaller.signed),
                                  VENDOR.public_key(), network.now)  # fmt: skip
    network.run(0.5)
    assert served_cad(network) == {3}
    assert report(network, backup)["license"] is None
    lines = {c.ledger.license_lines for c in network.cores.values()}
    assert lines == {tuple(smaller.signed)}


def test_a_new_vendor_key_everywhere_is_served_after_a_reread_with_no_primary() -> None:
    """All three restarted with another vendor key and file: none can vouch for the
    triad's lines, so none stands, until a reread lets them (the administrator's way out)."""
    network = net()
    network.serving()
    network.run(0.5)
    renewed = signed(7, OTHER)
    for name in NAMES:  # what a restart with the new files would read
        c = network.cores[name]
        c._own = OwnLicense("site.lic", tuple(renewed.entitlements), tuple(renewed.signed),
                            OTHER.public_key())  # fmt: skip
        c.entitlements = tuple(renewed.entitlements)
        c._judged = ()
    network.run(3.0)
    assert not any(c.replica.is_serving(network.mono) for c in network.cores.values())
    for c in network.cores.values():
        c.reread(tuple(renewed.entitlements), None, tuple(renewed.signed), OTHER.public_key(),
                 network.now)  # fmt: skip
    network.serving()
    network.run(1.0)
    assert served_cad(network) == {7}
    assert all(c.replica.stands for c in network.cores.values())


def test_status_shows_the_note_under_its_node_and_each_dated_lines_days() -> None:
    from zbroker.broker.status import render

    node = {"name": "gamma", "role": "backup", "term": 3, "last": 9, "commit": 9, "lag": 0,
            "peers": ["alpha"], "endpoint": "tcp://h:1", "mode": "curve",
            "license": f"{DIFFERS}: node gamma cannot verify the triad's lines"}  # fmt: skip
    lines = [{"count": 10, "expires": "2027-12-31", "days": 29, "source": "site.lic:7"},
             {"count": 5, "expires": None, "days": None, "source": "site.lic:8"}]  # fmt: skip
    cad = {"name": "cad", "in_use": 0, "total": 15, "queued": 0,
           "versions": [{"version": "2.0", "lines": lines}]}  # fmt: skip
    text = render({"mode": "curve", "primary": None, "nodes": [node], "features": [cad]})
    assert f"           {DIFFERS}: node gamma cannot verify the triad's lines" in text
    assert "    v2.0 line site.lic:7: 10 seats expire 2027-12-31 (in 29 days)" in text
    assert "site.lic:8" not in text  # a permanent line has nothing to show


def test_status_shows_what_a_node_says_is_wrong_with_it_under_its_line() -> None:
    # The own entry's notes (docs/protocol.md): without these lines `zbroker status`
    # showed them only with --json.
    from zbroker.broker.status import render

    node = {"name": "alpha", "role": "backup", "term": 3, "last": 9, "commit": 9, "lag": 0,
            "peers": ["beta", "gamma"], "endpoint": "tcp://h:1", "mode": "curve",
            "clock": "clock is 7200.0 s ahead of beta and gamma",
            "clocks": {"beta": -7200.0, "gamma": -7200.2},
            "not_standing": "a snapshot is being installed",
            "settings": ["beta's lease is 5.0 s; this node's is 30.0 s"],
            "restart": "the SERVER lines change the order",
            "refused": ["site.lic:5: FEATURE cad refused: signature does not verify"]}  # fmt: skip
    text = render({"mode": "curve", "primary": None, "nodes": [node], "features": []})
    for shown in (
        "clock: clock is 7200.0 s ahead of beta and gamma "
        "(offsets: beta -7200.0 s, gamma -7200.2 s)",
        "not standing for election: a snapshot is being installed",
        "settings: beta's lease is 5.0 s; this node's is 30.0 s",
        "restart: the SERVER lines change the order",
        "refused: site.lic:5: FEATURE cad refused: signature does not verify",
    ):
        assert f"           {shown}" in text
