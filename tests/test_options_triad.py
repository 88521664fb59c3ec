"""An options file on a live triad: enforced by the primary, and by the next one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from clients import LicenseClient, LicenseDenied, LicenseUnavailable, OutcomeUnknown
from clients.grant import Grant
from clients.testing import LocalTriad, wait_for

pytestmark = pytest.mark.integration

# The demo license's cad is one pool of 15 seats (FEATURE 10 + INCREMENT 5, both 2.0).
OPTIONS = """\
# the site's options, as FlexNet reads them
EXCLUDE viewer USER mallory
RESERVE 13 cad USER ann
NOLOG QUEUED
"""


def denial(client: LicenseClient, feature: str, count: int = 1) -> str:
    with pytest.raises(LicenseDenied) as caught:
        client.checkout(feature, count=count, timeout=5)
    return caught.value.reason


def checkout(client: LicenseClient, feature: str, count: int = 1) -> Grant:
    """A checkout across a failover: the library settles an unknown outcome itself."""

    def once() -> Grant | None:
        try:
            return client.checkout(feature, count=count, timeout=5)
        except (LicenseUnavailable, OutcomeUnknown):
            return None

    return wait_for(once, 15, f"a checkout of {count} {feature}")


def test_exclude_and_reserve_hold_on_the_next_primary(
    make_triad: Callable[..., LocalTriad], tmp_path: Path
) -> None:
    options = tmp_path / "site.opt"
    options.write_text(OPTIONS)
    triad = make_triad(servers=3, lease=5.0, settings={"options": f'"{options}"'})
    first = triad.wait_for_primary()
    with (
        LicenseClient(triad.endpoints, user="mallory") as mallory,
        LicenseClient(triad.endpoints, user="bob") as bob,
        LicenseClient(triad.endpoints, user="ann") as ann,
    ):
        assert denial(mallory, "viewer") == "excluded"
        checkout(bob, "cad", 2)  # the 2 seats no reservation keeps
        assert denial(bob, "cad") == "reserved"
        checkout(ann, "cad", 5)

        triad.kill(first)
        triad.wait_for_primary(not_=first)

        assert denial(mallory, "viewer") == "excluded"
        assert denial(bob, "cad") == "reserved"  # 8 seats still kept for ann
        checkout(ann, "cad", 8)
        assert denial(ann, "cad") == "no_seats"
    log = triad.log_text()
    assert "NOLOG is not implemented by zbroker: ignored" in log
