"""``zbroker lmstat`` on a live triad, read by parsers written by others.

A triad with holders (several users, multi-seat grants), an options file that RESERVEs
seats (some filled by their holders, some unused) and a queued checkout; the real
commands (``python -m zbroker.broker lmstat``, and ``lmutil``/``lmstat`` launchers named as a
site's symlinks to ``zbroker-lmutil`` would be) print lmstat's text, and the parsers of
tests/test_lmstat_parsers.py (the FlexLM exporter's, two Slurm sync tools', and
SchedMD's own grep and sed, run by bash) must read what the triad holds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_lmstat_parsers import (
    SLURM_DYNAMIC_LICENSES,
    exporter_parse,
    exporter_parse_expiry,
    omnivector_3012_parse,
    omnivector_parse,
    vsc_license_file,
    vsc_parse,
)

from zbroker import LicenseClient
from zbroker.clients.testing.kit import LocalTriad, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=environ)


def _zbroker_lmstat(*args: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "zbroker.broker", "lmstat", *args])


@pytest.fixture
def tools(tmp_path: Path) -> Path:
    """A folder as a site sets one up: ``lmutil`` runs zbroker-lmutil, ``lmstat`` links to it."""
    folder = tmp_path / "bin"
    folder.mkdir()
    lmutil = folder / "lmutil"
    lmutil.write_text(f"#!{sys.executable}\nfrom zbroker.broker.lmutil import main\n\nmain()\n")
    lmutil.chmod(0o755)
    (folder / "lmstat").symlink_to(lmutil)
    return folder


# Of cad's 15 seats, ann's 4 hold 3 of her own (1 unused) and eng's 3 none (frank and
# gina hold nothing); viewer keeps 1 for host ws9, which holds none, and a viewer seat
# lingers 10 minutes after its checkin. The demo's solver is USER_BASED: an options
# file names its users.
OPTIONS = """\
GROUP eng frank gina
RESERVE 4 cad USER ann
RESERVE 3 cad GROUP eng
RESERVE 1 viewer HOST ws9
LINGER viewer 600
INCLUDE solver USER dave
INCLUDE solver USER erin
"""


@pytest.fixture(scope="module")
def busy(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A triad under OPTIONS with ann (3 cad), bob (2 cad), carol (1 viewer), dave (all 2
    solver), erin queued for solver, and the viewer seat gina checked in lingering.

    One for the module: its tests only read it (lmstat and the parsers), none changes it.
    Its nodes' logs are printed at the end if a test of the module failed.
    """
    folder = tmp_path_factory.mktemp("lmstat")
    options = folder / "site.opt"
    options.write_text(OPTIONS)
    triad = LocalTriad(folder / "triad", lease=10.0, settings={"options": f'"{options}"'})
    failed = request.session.testsfailed
    clients: list[LicenseClient] = []

    def client(user: str, host: str, display: str) -> LicenseClient:
        made = LicenseClient(triad.license, user=user, host=host, display=display, timeout=20)
        clients.append(made)
        return made

    with triad:
        # With failback, the first-ranked node takes control back from whichever node led
        # while it started (a loaded machine starts nodes slowly): the tests below compare
        # lmstat's MASTER with the primary they read, so it must not move under them.
        wait_for(lambda: triad.primary() == triad.names[0], 20, "the first-ranked node to lead")
        client("ann", "ws1", ":0").checkout("cad", count=3)
        bob = client("bob", "ws2", ":1")
        bob.checkout("cad", count=2)
        client("carol", "ws3", "/dev/pts/2").checkout("viewer")
        gina = client("gina", "ws6", ":0")
        gina.checkin(gina.checkout("viewer"))  # LINGER holds the seat on
        dave = client("dave", "ws4", ":0")
        solver = dave.checkout("solver", count=2)
        erin = client("erin", "ws5", ":0")
        waited: list[Any] = []
        # Queued for as long as the module's tests take: until dave's checkin at the end.
        queued = threading.Thread(
            target=lambda: waited.append(erin.checkout("solver", wait=600)), daemon=True
        )
        queued.start()
        wait_for(lambda: triad.feature("solver", triad.status(holders=False))["queued"] == 1, 10,
                 "erin queued for solver")  # fmt: skip
        primary = next(n for n in triad.status(holders=False)["nodes"] if n["role"] == "primary")
        try:
            yield {"triad": triad, "primary": primary}
        finally:
            dave.checkin(solver)  # erin is served, and her thread ends
            queued.join(timeout=30)
            for made in clients:
                made.close()
            if request.session.testsfailed > failed:
                print(triad.log_text())


def _path(triad: Any) -> str:
    return ",".join(f"{e.rsplit(':', 1)[1]}@127.0.0.1" for e in triad.endpoints)


def test_the_flexlm_exporter_reads_what_the_triad_holds(busy: dict[str, Any]) -> None:
    triad, primary = busy["triad"], busy["primary"]
    result = _zbroker_lmstat("-a", "-c", _path(triad))
    assert result.returncode == 0, result.stderr
    got = exporter_parse(result.stdout)
    assert got.features == {
        "cad": {"issued": 15.0, "used": 5.0},
        "solver": {"issued": 2.0, "used": 2.0},
        "viewer": {"issued": 50.0, "used": 2.0},  # carol's and gina's lingering seat
    }
    held = {
        f["name"]: {h["user"]: h["count"] for h in f["holders"]} for f in triad.status()["features"]
    }
    read = {
        feature: {user: sum(seats for _, seats in versions) for user, versions in users.items()}
        for feature, users in got.users.items()
    }
    assert read == {f: users for f, users in held.items() if users}
    assert read["solver"] == {"dave": 2}  # erin waits in the queue: no seat
    # the status names each feature's vendor (docs/protocol.md): no license file needed
    assert got.vendors == {"demo": {"status": True, "version": "v11.19.0"}}
    # All three nodes listen on 127.0.0.1 here, which the exporter keys as one server;
    # the lines themselves say which one is master.
    assert got.servers["127"]["master"] and got.servers["127"]["status"]
    lines = [ln for ln in result.stdout.splitlines() if ": license server UP" in ln]
    masters = [i for i, ln in enumerate(lines) if ln.endswith("UP (MASTER) v11.19.0")]
    assert len(lines) == 3 and masters == [triad.endpoints.index(primary["endpoint"])]


def test_parsers_read_the_unused_reservations_and_no_queued_request_as_a_holder(
    busy: dict[str, Any], tools: Path
) -> None:
    triad = busy["triad"]
    text = _zbroker_lmstat("-a", "-c", _path(triad)).stdout
    where = next(ln for ln in text.splitlines() if "RESERVATIONs" in ln).rsplit("(", 1)[1]
    # FlexNet's lines: the seats each reservation still keeps from others, under the
    # feature's first pool; ann's own seats fill 3 of her 4.
    lines = [ln for ln in text.splitlines() if "RESERVATIONs" in ln or "queued for" in ln]
    assert lines == [
        f"\t1 RESERVATIONs for USER ann ({where}",
        f"\t3 RESERVATIONs for GROUP eng ({where}",
        f"    erin ws5 :0 (v1.5) ({where[:-1]} {_handle(text)}) queued for 1 license",
        f"\t1 RESERVATIONs for HOST ws9 ({where}",
    ]
    got = exporter_parse(text)
    assert got.reservations == {"cad": {"eng": 3.0}}  # it reads GROUP reservations only
    assert got.features["cad"] == {"issued": 15.0, "used": 5.0}  # reserved is not in use
    assert {f: set(users) for f, users in got.users.items()} == {
        "cad": {"ann", "bob"}, "solver": {"dave"}, "viewer": {"carol", "gina"}}  # fmt: skip
    # gina's seat lingers: FlexNet's "(linger: LEFT / ALL)" on her line, read as her seat
    (lingering,) = [ln for ln in text.splitlines() if "(linger: " in ln]
    assert lingering.startswith("    gina ws6 :0 (v3.0) (")
    left, every = map(int, lingering.rsplit("(linger: ", 1)[1].rstrip(")").split(" / "))
    assert 590 <= left <= 600 <= every
    assert vsc_parse(text)["cad"] == {"total": 15, "in_use": 5}
    # The Slurm agent reads one feature: its reservations are no user of it, erin is none
    # of solver's.
    for feature, users in (("cad", [("ann", 3), ("bob", 2)]), ("solver", [("dave", 2)])):
        one = _run([str(tools / "lmutil"), "lmstat", "-c", _path(triad), "-f", feature]).stdout
        parsed = omnivector_parse(one)
        assert sorted((u["username"], u["booked"]) for u in parsed["uses"]) == users  # type: ignore[attr-defined]
        released = omnivector_3012_parse(one)
        assert sorted((u["user_name"], u["booked"]) for u in released["uses"]) == [  # type: ignore[attr-defined]
            u for u in users if u[1] > 1
        ]


def _handle(text: str) -> str:
    line = next(ln for ln in text.splitlines() if "queued for" in ln)
    return line.split(") queued for")[0].rsplit(" ", 1)[1]


def test_the_exporter_reads_expiry_and_the_vendor_from_the_license_file(
    busy: dict[str, Any], tools: Path
) -> None:
    triad = busy["triad"]
    listing = _run([str(tools / "lmutil"), "lmstat", "-c", triad.license, "-i"])
    assert listing.returncode == 0, listing.stderr
    rows = exporter_parse_expiry(listing.stdout)
    assert [(r["name"], r["licenses"], r["vendor"]) for r in rows] == [
        ("cad", "10", "demo"),
        ("cad", "5", "demo"),
        ("solver", "2", "demo"),
        ("viewer", "50", "demo"),
    ]
    assert rows[0]["expires"] != float("inf") and rows[1]["expires"] == float("inf")
    full = _run([str(tools / "lmutil"), "lmstat", "-a", "-c", triad.license])
    assert exporter_parse(full.stdout).vendors == {"demo": {"status": True, "version": "v11.19.0"}}
    assert (
        exporter_parse(_run([str(tools / "lmutil"), "lmstat", "-v"]).stdout).version != "not found"
    )


def test_slurm_license_manager_agent_reads_one_feature(busy: dict[str, Any], tools: Path) -> None:
    # The agent runs `lmutil lmstat -c port@host -f FEATURE` and parses it.
    result = _run([str(tools / "lmutil"), "lmstat", "-c", _path(busy["triad"]), "-f", "cad"])
    assert result.returncode == 0, result.stderr
    parsed = omnivector_parse(result.stdout)
    assert (parsed["feature"], parsed["total"], parsed["used"]) == ("cad", 15, 5)
    uses = sorted((u["username"], u["lead_host"], u["booked"]) for u in parsed["uses"])  # type: ignore[attr-defined]
    assert uses == [("ann", "ws1", 3), ("bob", "ws2", 2)]
    released = omnivector_3012_parse(result.stdout)  # the PyPI release's parser
    assert released["total"] == {"total": 15, "used": 5, "feature": "cad"}
    assert sorted((u["user_name"], u["booked"]) for u in released["uses"]) == [  # type: ignore[attr-defined]
        ("ann", 3),
        ("bob", 2),
    ]

    unknown = _run([str(tools / "lmutil"), "lmstat", "-c", _path(busy["triad"]), "-f", "cda"])
    assert unknown.returncode == 1  # a misspelt feature is not "nobody uses it"
    assert "Users of cda:  (Error: No such feature exists. (-5) (zbroker: it serves cad," in (
        unknown.stdout
    )
    assert omnivector_parse(unknown.stdout) == {}


def test_vsc_slurm_sync_reads_totals_through_its_fake_license_file(
    busy: dict[str, Any], tools: Path, tmp_path: Path
) -> None:
    # sync_slurm_external_licenses.py writes `SERVER host AABBCCDDEEFF port` and runs
    # `TOOL lmstat -a -c FILE`; here the host and port of one node, as a site gives it.
    host, port = busy["primary"]["endpoint"][len("tcp://") :].rsplit(":", 1)
    fake = tmp_path / "x.flexlm_fake_lic"
    fake.write_text(vsc_license_file(host, int(port)))
    result = _run([str(tools / "lmutil"), "lmstat", "-a", "-c", str(fake)])
    assert result.returncode == 0, result.stderr
    assert vsc_parse(result.stdout) == {
        "cad": {"total": 15, "in_use": 5},
        "solver": {"total": 2, "in_use": 2},
        "viewer": {"total": 50, "in_use": 2},
    }


def test_schedmd_dynamic_license_script_sets_lastconsumed(
    busy: dict[str, Any], tools: Path
) -> None:
    # licenses.shtml's script as written, run by bash; sacctmgr prints what it was asked.
    stub = 'sacctmgr() { echo "sacctmgr $*"; }\n'
    result = _run(
        ["bash", "-c", stub + SLURM_DYNAMIC_LICENSES],
        LMSTAT=f"{tools / 'lmstat'} -a",
        LICENSE="cad",
        LM_LICENSE_FILE=_path(busy["triad"]),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["sacctmgr -i update resource cad set lastconsumed=5"]


def test_a_triad_given_as_three_entries_is_counted_once(busy: dict[str, Any], tools: Path) -> None:
    # A redundant group passed colon-separated, as FlexNet paths name independent servers.
    path = _path(busy["triad"]).replace(",", ":")
    stub = 'sacctmgr() { echo "sacctmgr $*"; }\n'
    result = _run(
        ["bash", "-c", stub + SLURM_DYNAMIC_LICENSES],
        LMSTAT=f"{tools / 'lmstat'} -a",
        LICENSE="cad",
        LM_LICENSE_FILE=path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["sacctmgr -i update resource cad set lastconsumed=5"]
    text = _run([str(tools / "lmstat"), "-a", "-c", path]).stdout
    assert text.count("License server status: ") == 1 and text.count("(MASTER)") == 1


def test_no_server_answering_exits_1_with_lmstat_s_message(tools: Path) -> None:
    with socket.socket() as sock:  # a port the OS gives and nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _run([str(tools / "lmstat"), "-a", "-c", f"{port}@127.0.0.1", "-t", "0.3"])
    assert result.returncode == 1
    assert f"License server status: {port}@127.0.0.1" in result.stdout
    assert "127.0.0.1: Cannot connect to license server system." in result.stdout
    # -f leaves the server block out, but not when it is the only thing to say.
    one = _run([str(tools / "lmstat"), "-f", "cad", "-c", f"{port}@127.0.0.1", "-t", "0.3"])
    assert one.returncode == 1
    assert "127.0.0.1: Cannot connect to license server system." in one.stdout
    usage = _zbroker_lmstat("-a", "-c", "notaport@host")
    assert usage.returncode == 2 and "port@host" in usage.stderr
