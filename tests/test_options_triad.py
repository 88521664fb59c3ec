"""An options file on a live triad: enforced by the primary and by the next one, and
switched by a reread (SIGHUP) on every node at one point of the log."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from zbroker import LicenseClient, LicenseDenied, LicenseUnavailable, OutcomeUnknown
from zbroker.broker.license import sign_license_text
from zbroker.broker.reportfile import log_files, read_stream
from zbroker.broker.signing import load_private_key
from zbroker.clients.grant import Grant
from zbroker.clients.testing import LocalTriad, wait_for

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


def reread(triad: LocalTriad) -> None:
    """SIGHUP to every node, as an administrator does after editing the shared files."""
    for name in triad.names:
        triad.procs[name].send_signal(signal.SIGHUP)


def zbroker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zbroker.broker", *args], capture_output=True, text=True, timeout=60
    )


def logged_by_all(triad: LocalTriad, text: str, times: int) -> bool:
    return all(
        (triad.logs / f"{name}.log").read_text().count(text) >= times for name in triad.names
    )


def commits(triad: LocalTriad) -> set[int]:
    return {n["commit"] for n in triad.status(holders=False)["nodes"]}


def own_totals(triad: LocalTriad, feature: str) -> dict[str, int]:
    """Each node's own count of ``feature``, from its own ledger (not the merged status)."""
    from zbroker.broker.cli import config_curve
    from zbroker.broker.status import ask

    endpoints = [(n.name, n.client) for n in triad.config.nodes]
    curve = config_curve(triad.config, admin=False)
    replies = ask(endpoints, {"op": "status"}, timeout=1.0, curve=curve)
    return {
        name: next(f["total"] for f in reply["report"]["features"] if f["name"] == feature)
        for name, reply in replies.items()
        if reply["status"] == "ok"
    }


def rereads(triad: LocalTriad) -> dict[str, list[tuple[int, int]]]:
    """(log index, cad's seats) of every ``reread`` record in each node's report log: the
    index each node applied the reload delta at (docs/reportlog.md)."""
    out = {}
    for node in triad.config.nodes:
        assert node.report_log is not None  # zbroker init turns it on
        files = log_files(node.report_log) if node.report_log.exists() else []
        out[node.name] = [
            (
                line.record["ix"],
                sum(x["count"] for x in line.record["lines"] if x["feature"] == "cad"),
            )
            for line in read_stream(files)
            if line.record.get("ev") == "reread"
        ]
    return out


def rereads_to(triad: LocalTriad, cad: int) -> dict[str, list[tuple[int, int]]] | None:
    """``rereads`` once every node's last one gives cad ``cad`` seats, else None."""
    found = rereads(triad)
    return found if all(r and r[-1][1] == cad for r in found.values()) else None


def test_a_reread_switches_counts_and_policy_and_the_next_primary_keeps_them(
    make_triad: Callable[..., LocalTriad], tmp_path: Path
) -> None:
    options = tmp_path / "site.opt"
    options.write_text("EXCLUDE viewer USER mallory\n")
    triad = make_triad(servers=3, lease=5.0, settings={"options": f'"{options}"'})
    first = triad.wait_for_primary()
    license_path = Path(triad.config.license_path)
    assert triad.feature("cad")["total"] == 15
    with (
        LicenseClient(triad.endpoints, user="mallory") as mallory,
        LicenseClient(triad.endpoints, user="bob") as bob,
    ):
        assert denial(mallory, "viewer") == "excluded"
        bob.checkin(checkout(bob, "viewer"))

        # A broken options file: `zbroker reread` refuses it before asking any node, and a
        # node told by SIGHUP logs it with file:line:col; nothing changes.
        options.write_text("EXCLUDE viewer USR bob\n")
        where = f"{options}:1:16: expected a principal type"
        refused_here = zbroker("reread", "--config", str(triad.config_path))
        assert refused_here.returncode == 2 and where in refused_here.stderr, refused_here
        reread(triad)
        refused = f"reread refused, nothing changed: {where}"
        wait_for(lambda: logged_by_all(triad, refused, 1), 10, "the refusal in every log")
        bob.checkin(checkout(bob, "viewer"))

        # New options and a new count of cad (the FEATURE line's 10 becomes 3, re-signed).
        options.write_text("EXCLUDE viewer USER bob\n")
        text = re.sub(r"(FEATURE cad +demo 2\.0 +\S+ +)10\b", r"\g<1>3", license_path.read_text())
        key = load_private_key(triad.dir / "keys" / "vendor.key")
        license_path.write_text(sign_license_text(text, key, path=str(license_path)))
        asked = zbroker("reread", "--config", str(triad.config_path))
        assert asked.returncode == 0, asked
        said = asked.stdout.splitlines()
        assert sorted(said[:3]) == [f"{n}: rereading" for n in triad.names]
        # It returns once every node serves the new files: each node's own ledger at once.
        assert said[3] == f"{', '.join(sorted(triad.names))}: serving the files read", said
        assert own_totals(triad, "cad") == dict.fromkeys(triad.names, 8)
        wait_for(lambda: logged_by_all(triad, "serving them", 1), 10, "the reread in every log")
        wait_for(lambda: triad.feature("cad")["total"] == 8, 10, "cad's new count")
        assert denial(bob, "viewer") == "excluded"
        mallory.checkin(checkout(mallory, "viewer"))
        wait_for(lambda: len(commits(triad)) == 1, 10, "the three nodes at one commit")
        # Each node's own ledger counts 8, and each switched at the same log index: the
        # reread is one replicated delta, applied at one point of the log everywhere.
        assert own_totals(triad, "cad") == dict.fromkeys(triad.names, 8)
        switched = wait_for(lambda: rereads_to(triad, 8), 10, "the reread in every report log")
        assert len({r[-1] for r in switched.values()}) == 1, switched

        triad.kill(first)
        triad.wait_for_primary(not_=first)
        assert denial(bob, "viewer") == "excluded"
        mallory.checkin(checkout(mallory, "viewer"))
        assert triad.feature("cad")["total"] == 8
        # ... and enforces the new count: 8 seats, not the 15 of before.
        checkout(bob, "cad", 8)
        assert denial(mallory, "cad") == "no_seats"
