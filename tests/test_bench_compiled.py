"""``zbroker bench --compiled DIR`` (clients/testing/bench/compiled.py) refuses a tree that
is not a compiled build to measure, before any phase runs, and says how to make one. The
run itself (a triad on a compiled tree) needs a build of half a minute: the lead's bench
runs do it, with ``scripts/compiled.sh --keep DIR --build-only``."""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import pytest

from zbroker.clients.testing.bench.compiled import (
    BUILD,
    RECORD,
    NotCompiled,
    check_tree,
    maps_compiled,
    node_command,
)


def _record(root: Path, opt_level: str) -> None:
    (root / RECORD).parent.mkdir(parents=True, exist_ok=True)
    record = {"group_lib": "zbroker.cores__mypyc", "opt_level": opt_level, "modules": {}}
    (root / RECORD).write_text(json.dumps(record))


@pytest.mark.unit
def test_a_tree_without_a_compiled_build_is_refused_with_the_command_that_makes_one(
    tmp_path: Path,
) -> None:
    with pytest.raises(NotCompiled, match="holds no compiled build") as caught:
        check_tree(tmp_path)
    assert BUILD in str(caught.value)


@pytest.mark.unit
def test_a_quick_build_for_checks_is_not_measured(tmp_path: Path) -> None:
    _record(tmp_path, "0")
    with pytest.raises(NotCompiled, match="built at -O0") as caught:
        check_tree(tmp_path)
    assert "MYPYC_OPT_LEVEL unset" in str(caught.value)


@pytest.mark.integration  # a fresh interpreter imports the tree
def test_a_recorded_core_that_imports_from_its_source_is_refused(tmp_path: Path) -> None:
    """The record names a core, but the tree holds only its ``.py``: not compiled."""
    (tmp_path / "zbroker").mkdir()
    (tmp_path / "zbroker" / "__init__.py").write_text("")
    (tmp_path / "zbroker" / "core.py").write_text("# a core, never compiled\n")
    record = {
        "group_lib": "zbroker.cores__mypyc",
        "opt_level": "3",
        "modules": {"zbroker.core": {"source": "core.py", "sha256": "-"}},
    }
    (tmp_path / RECORD).write_text(json.dumps(record))
    with pytest.raises(NotCompiled, match=r"zbroker\.core loads from .*core\.py"):
        check_tree(tmp_path)


@pytest.mark.unit
def test_a_node_runs_from_the_tree_with_only_the_tree_on_its_path(tmp_path: Path) -> None:
    command = node_command(tmp_path, ["python", "-m", "zbroker.broker", "run"])
    root = str(tmp_path.resolve())
    assert command == [
        "env",
        "-C",
        root,
        f"PYTHONPATH={root}",
        "python",
        "-m",
        "zbroker.broker",
        "run",
    ]


@pytest.mark.unit
def test_a_process_runs_a_compiled_tree_when_it_maps_that_trees_core_library(
    tmp_path: Path,
) -> None:
    assert not maps_compiled(os.getpid(), tmp_path)
    assert not maps_compiled(2**22 + 1, tmp_path)  # no such process: not mapped
    library = tmp_path / "zbroker" / "cores__mypyc.cpython-311-x86_64-linux-gnu.so"
    library.parent.mkdir()
    library.write_bytes(bytes(4096))
    with library.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ):
        assert maps_compiled(os.getpid(), tmp_path)  # a mapping of it, as the loader makes
    assert not maps_compiled(os.getpid(), tmp_path / "zbroker")  # another tree's path
