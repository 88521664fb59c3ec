"""The triad serves one license whoever is primary (issue 12 item 6), on live triads: a
node whose file has another count, and a node given another vendor key, each restarted
with its own config; and a node with no line its key verifies refuses to start."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from zbroker import LicenseClient
from zbroker.broker.cli import run_command
from zbroker.broker.license import sign_license_text
from zbroker.broker.signing import load_private_key
from zbroker.clients.grant import Grant
from zbroker.clients.testing import LocalTriad, settled, wait_for

pytestmark = pytest.mark.integration

DIFFERS = "license differs from the triad's"


def own_config(
    triad: LocalTriad, name: str, license_text: str, vendor_pub: Path | None = None
) -> Path:
    """A copy of the triad's config naming node ``name``'s own license file (and key)."""
    lic = triad.dir / f"{name}-own.lic"
    lic.write_text(license_text)
    text = triad.config_path.read_text().replace('license = "demo.lic"', f'license = "{lic.name}"')
    if vendor_pub is not None:
        text = text.replace('vendor_key = "keys/vendor.pub"', f'vendor_key = "{vendor_pub}"')
    path = triad.dir / f"{name}-own.toml"
    path.write_text(text)
    return path


def restart_with(
    monkeypatch: pytest.MonkeyPatch, triad: LocalTriad, name: str, config: Path
) -> None:
    """Stop node ``name`` and start it again with its own ``config``."""
    monkeypatch.setattr(
        triad, "command", lambda n: run_command(config if n == name else triad.config_path, n)
    )
    triad.kill(name)
    triad.start(name)


def other_key(directory: Path) -> tuple[Ed25519PrivateKey, Path]:
    key = Ed25519PrivateKey.generate()
    pub = directory / "other.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, pub


def demo_text(triad: LocalTriad, cad: int = 10) -> str:
    """The demo license, its FEATURE cad line's count set to ``cad`` (unsigned)."""
    text = Path(triad.config.license_path).read_text()
    return re.sub(r"(FEATURE cad +demo 2\.0 +\S+ +)10\b", rf"\g<1>{cad}", text)


def cad_total(triad: LocalTriad) -> int:
    return int(triad.feature("cad", triad.status(holders=False))["total"])


def node_entry(triad: LocalTriad, name: str) -> dict[str, object]:
    return next(n for n in triad.status(holders=False)["nodes"] if n["name"] == name)


def checkout(client: LicenseClient, feature: str) -> Grant:
    """A checkout across a failover (``settled``)."""
    grant: Grant = settled(
        lambda: client.checkout(feature, timeout=5), f"a checkout of {feature}", 15
    )
    return grant


def test_a_node_whose_file_has_another_count_never_changes_the_served_count(
    make_triad: Callable[..., LocalTriad], monkeypatch: pytest.MonkeyPatch
) -> None:
    triad = make_triad(servers=3, lease=5.0)
    first, second, _ = triad.names  # in rank order: the first outranks the others
    wait_for(lambda: triad.primary() == first, 15, f"{first} primary (at once, or by failback)")
    assert cad_total(triad) == 15
    key = load_private_key(triad.dir / "keys" / "vendor.key")
    odd = own_config(triad, first, sign_license_text(demo_text(triad, cad=3), key))
    restart_with(monkeypatch, triad, first, odd)  # the highest rank: failback makes it primary
    wait_for(lambda: triad.primary() == first, 15, f"{first} primary again (failback)")
    assert cad_total(triad) == 15
    note = str(node_entry(triad, first).get("license"))
    assert note.startswith(f"{DIFFERS}: node {first}'s file") and "8 seats here, 15 served" in note
    assert node_entry(triad, second).get("license") is None

    triad.kill(first)
    triad.wait_for_primary(not_=first)
    assert cad_total(triad) == 15
    triad.start(first)
    wait_for(lambda: triad.primary() == first, 15, f"{first} primary again (failback)")
    assert cad_total(triad) == 15
    with LicenseClient(triad.endpoints, user="ann") as ann:
        grants = [checkout(ann, "cad") for _ in range(9)]  # more than its own file's 8
    assert len(grants) == 9
    log = (triad.logs / f"{first}.log").read_text()
    assert f"{DIFFERS}: node {first}'s file" in log


def test_a_backup_with_another_vendor_key_never_becomes_primary(
    make_triad: Callable[..., LocalTriad], monkeypatch: pytest.MonkeyPatch
) -> None:
    triad = make_triad(servers=3, lease=5.0)
    first = triad.names[0]  # the highest rank
    wait_for(lambda: triad.primary() == first, 15, f"{first} primary (at once, or by failback)")
    key, pub = other_key(triad.dir)
    # The first restarts with another vendor's key and a file signed with it: it verifies
    # its own lines, and none of the triad's.
    odd = own_config(triad, first, sign_license_text(demo_text(triad), key), pub)
    triad.kill(first)
    second = triad.wait_for_primary(not_=first)
    (third,) = set(triad.names) - {first, second}
    restart_with(monkeypatch, triad, first, odd)
    wait_for(
        lambda: "cannot verify" in str(node_entry(triad, first).get("license")),
        15,
        f"{first} saying it cannot verify the triad's license",
    )
    # Failback would hand the triad back to the first within a second or two: it must not.
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        assert triad.primary() in (second, None)
    note = str(node_entry(triad, first)["license"])
    assert note.startswith(f"{DIFFERS}: node {first} cannot verify the triad's lines")

    with LicenseClient(triad.endpoints, user="bob") as bob:
        held = checkout(bob, "cad")
        triad.kill(second)
        assert triad.wait_for_primary(not_=second) == third  # the first may not lead
        bob.checkin(held)
        checkout(bob, "cad")
        checkout(bob, "viewer")
    assert cad_total(triad) == 15
    assert node_entry(triad, first)["role"] == "backup"
    assert "will not become primary" in (triad.logs / f"{first}.log").read_text()


def test_a_node_with_no_line_its_key_verifies_refuses_to_start(tmp_path: Path) -> None:
    triad = LocalTriad(tmp_path / "lone", servers=3, lease=5.0)  # written, not started
    try:
        _, pub = other_key(triad.dir)
        name = triad.names[1]
        config = own_config(triad, name, Path(triad.config.license_path).read_text(), pub)
        ran = subprocess.run(run_command(config, name), capture_output=True, text=True, timeout=60)
    finally:
        triad.stop()
    assert ran.returncode == 2, ran
    assert (
        f"{name}-own.lic: no FEATURE/INCREMENT line verifies against the vendor key" in ran.stderr
    )
