"""License paths: ``port@host`` servers, ``port@h1,port@h2,port@h3`` triads, license files."""

from __future__ import annotations

from pathlib import Path

import pytest

from zbroker.clients.errors import LicensePathError
from zbroker.clients.licpath import ENV_VAR, parse_license_path, resolve, servers_from_file

pytestmark = pytest.mark.unit

TRIAD_FILE = """\
SERVER alpha ANY tcp://10.0.0.1:27001
SERVER beta  ANY tcp://10.0.0.2:27001
SERVER gamma ANY tcp://10.0.0.3:27001
VENDOR acme
FEATURE cad acme 2.0 permanent 10 SIGN=00
"""


def fake_reader(path: str) -> tuple[str, ...]:
    return (f"tcp://from-file{path}:1",)


def test_triad_server_and_file_entries_in_order() -> None:
    entries = parse_license_path(
        "27001@h1,27002@h2,27003@h3:27004@h4:/path/file.lic", read_file=fake_reader
    )
    assert entries == [
        ("tcp://h1:27001", "tcp://h2:27002", "tcp://h3:27003"),
        ("tcp://h4:27004",),
        ("tcp://from-file/path/file.lic:1",),
    ]


def test_empty_entries_are_skipped() -> None:
    assert parse_license_path(":27001@h1::", read_file=fake_reader) == [("tcp://h1:27001",)]


@pytest.mark.parametrize(
    "text",
    ["", ":", "@h1", "27001@", "x@h1", "0@h1", "70000@h1", "1@a,2@b,3@c,4@d", "27001@h1,,2@h2"],
)
def test_bad_paths_are_refused(text: str) -> None:
    with pytest.raises(LicensePathError):
        parse_license_path(text, read_file=fake_reader)


def test_license_file_gives_the_triad(tmp_path: Path) -> None:
    path = tmp_path / "acme.lic"
    path.write_text(TRIAD_FILE)
    assert servers_from_file(str(path)) == (
        "tcp://10.0.0.1:27001",
        "tcp://10.0.0.2:27001",
        "tcp://10.0.0.3:27001",
    )
    assert parse_license_path(f"5@h9:{path}") == [
        ("tcp://h9:5",),
        ("tcp://10.0.0.1:27001", "tcp://10.0.0.2:27001", "tcp://10.0.0.3:27001"),
    ]


def test_unreadable_license_file_is_a_path_error(tmp_path: Path) -> None:
    with pytest.raises(LicensePathError, match="no such license file"):
        servers_from_file(str(tmp_path / "missing.lic"))
    broken = tmp_path / "broken.lic"
    broken.write_text("SERVER alpha\n")
    with pytest.raises(LicensePathError, match=r"broken\.lic:1"):
        servers_from_file(str(broken))


def test_endpoint_list_is_one_triad() -> None:
    endpoints = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3"]
    assert resolve(endpoints) == [tuple(endpoints)]
    with pytest.raises(LicensePathError):
        resolve(["tcp://127.0.0.1:1"] * 4)
    with pytest.raises(LicensePathError):
        resolve(["127.0.0.1:27001"])


def test_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "27001@h1:27002@h2")
    assert resolve(None) == [("tcp://h1:27001",), ("tcp://h2:27002",)]
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(LicensePathError, match=ENV_VAR):
        resolve(None)
