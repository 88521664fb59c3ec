"""Duplicate grouping on a live triad: a signed ``DUP_GROUP=UHD`` line makes one user's
checkouts share a seat, and the group (its seats, its sharers) survives a primary kill and
a restart of all three."""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path

import pytest

from zbroker import LicenseClient, LicenseDenied
from zbroker.broker.license import sign_license_text
from zbroker.broker.signing import load_private_key
from zbroker.clients.grant import Grant
from zbroker.clients.testing import LocalTriad, settled, wait_for

pytestmark = pytest.mark.integration


def checkout(client: LicenseClient, feature: str) -> Grant:
    """A checkout across a failover (``settled``)."""
    grant: Grant = settled(
        lambda: client.checkout(feature, timeout=5), f"a checkout of {feature}", 15
    )
    return grant


def solver(triad: LocalTriad) -> tuple[int, dict[int, list[int] | None]]:
    """solver's seats in use and each holder's sharers, as the primary reports them."""
    feature = triad.feature("solver")
    return feature["in_use"], {h["grant"]: h.get("sharers") for h in feature["holders"]}


def test_a_signed_dup_group_shares_one_seat_and_survives_failover_and_restart(
    tmp_path: Path,
) -> None:
    triad = LocalTriad(tmp_path / "triad", servers=3, lease=3.0)
    lic = Path(triad.config.license_path)
    # solver: 2 seats; the vendor's line now groups each user/host/display (re-signed).
    text = re.sub(r"(FEATURE solver demo 1\.5 permanent 2)", r"\1 DUP_GROUP=UHD", lic.read_text())
    key = load_private_key(triad.dir / "keys" / "vendor.key")
    lic.write_text(sign_license_text(text, key, path=str(lic)))
    with triad, ExitStack() as stack:
        try:
            first = triad.wait_for_primary()

            def client(user: str) -> LicenseClient:
                made = LicenseClient(triad.endpoints, user=user, host="ws1", display=":0")
                return stack.enter_context(made)

            ann = [client("ann") for _ in range(3)]
            group = [checkout(c, "solver") for c in ann]
            bob = checkout(client("bob"), "solver")
            in_use, sharers = solver(triad)
            ids = sorted(g.id for g in group)
            assert in_use == 2  # ann's three checkouts hold one seat, bob the other
            assert sharers == {**{i: ids for i in ids}, bob.id: [bob.id]}
            with pytest.raises(LicenseDenied) as full:
                client("carl").checkout("solver", timeout=5)
            assert full.value.reason == "no_seats"

            triad.kill(first)
            triad.wait_for_primary(not_=first)
            assert solver(triad) == (in_use, sharers)  # the next primary counts it alike
            late = checkout(client("ann"), "solver")  # joins the group: no seat needed
            in_use, sharers = solver(triad)
            assert in_use == 2 and sharers[late.id] == [*ids, late.id]
            with pytest.raises(LicenseDenied):
                client("carl").checkout("solver", timeout=5)

            for name in triad.names:  # all three die at once, and come back
                if triad.alive(name):
                    triad.kill(name)
            triad.start()
            triad.wait_for_primary(timeout=20)
            assert solver(triad) == (in_use, sharers)
            for c, g in zip(ann, group, strict=True):
                c.checkin(g)
            assert solver(triad)[0] == 2  # the latest member still holds the seat
            late.release()
            wait_for(lambda: solver(triad)[0] == 1, 10, "the last member to free the seat")
            assert checkout(client("carl"), "solver").safe
        except BaseException:
            print(triad.log_text())
            raise
