"""The compiled build's guard (zbroker/compiled.py): a compiled core older than its source
is refused at import, naming the file and the command that rebuilds; a pure build removes
what a compiled one left. On a stand-in package: a file named as an extension module is
all the guard looks at, it never loads one."""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from zbroker import compiled

pytestmark = pytest.mark.unit

MODULES = {"zbroker.broker.ledger": "broker/ledger.py", "zbroker.peers.log": "peers/log.py"}
SUFFIX = EXTENSION_SUFFIXES[0]


def _built(package: Path) -> None:
    """A package as a compiled build leaves it: sources, extension modules, the record."""
    for rel in MODULES.values():
        source = package / rel
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"# {rel}\n")
        source.with_name(source.stem + SUFFIX).write_bytes(b"\x7fELF")
    (package / f"cores__mypyc{SUFFIX}").write_bytes(b"\x7fELF")
    compiled.write(package, MODULES, "zbroker.cores__mypyc")


def test_a_fresh_build_passes(tmp_path: Path) -> None:
    _built(tmp_path)
    compiled.check(tmp_path)


def test_an_edited_source_is_refused_with_the_file_and_the_command(tmp_path: Path) -> None:
    _built(tmp_path)
    (tmp_path / "peers/log.py").write_text("# peers/log.py, edited\n")
    with pytest.raises(compiled.StaleBuild) as caught:
        compiled.check(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "peers/log.py") in message
    assert f"log{SUFFIX}" in message
    assert compiled.REBUILD in message
    assert compiled.PURE in message
    assert caught.value.name == "zbroker.peers.log"


def test_an_edited_source_whose_compiled_file_is_gone_is_fine(tmp_path: Path) -> None:
    _built(tmp_path)
    (tmp_path / "peers/log.py").write_text("# edited\n")
    (tmp_path / f"peers/log{SUFFIX}").unlink()
    compiled.check(tmp_path)


def test_no_record_no_check(tmp_path: Path) -> None:
    (tmp_path / "broker").mkdir()
    (tmp_path / "broker/ledger.py").write_text("# a pure tree\n")
    compiled.check(tmp_path)


def test_a_pure_build_removes_the_compiled_files_and_the_record(tmp_path: Path) -> None:
    _built(tmp_path)
    removed = compiled.remove(tmp_path)
    assert len(removed) == len(MODULES) + 1  # each module's, and mypyc's shared library
    assert not list(tmp_path.rglob(f"*{SUFFIX}"))
    assert not (tmp_path / compiled.RECORD).exists()
    assert (tmp_path / "broker/ledger.py").exists()
    assert compiled.remove(tmp_path) == []


def test_the_installed_package_is_consistent() -> None:
    """Whatever build this suite runs against (pure, or scripts/compiled.sh's), the import
    that got here passed the guard; it passes again."""
    compiled.check()
