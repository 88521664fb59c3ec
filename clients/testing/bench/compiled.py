"""The compiled build beside the pure one in a bench run (``zbroker bench --compiled DIR``).

``DIR`` is a tree that ``scripts/compiled.sh --keep DIR --build-only`` built: a copy of the
source with the cores compiled by mypyc in place and their record, ``zbroker/compiled.json``
(zbroker/compiled.py). The throughput phase runs one more triad, ``triad_compiled``
(fsync on, as ``triad``), whose nodes run from ``DIR``: their working directory and their
only ``PYTHONPATH`` entry, so neither the bench's own tree nor an editable install can
shadow it. The bench's load processes and echo stay as they are.

Two checks, so that a figure is never labelled compiled when it is not: before the run, a
fresh interpreter on ``DIR`` must import every recorded core from its compiled module,
built at ``-O3`` (the build that is measured; CI's quick ``-O0`` build is refused); once
the triad serves, every node process must have mypyc's shared library of ``DIR`` mapped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

RECORD = Path("zbroker") / "compiled.json"
BUILD = "scripts/compiled.sh --keep DIR --build-only"

# Run by a fresh interpreter whose only PYTHONPATH entry is the tree: each recorded core
# must come from its extension module (as scripts/compiled.sh checks before its tests).
_CHECK = """
import json, sys
from importlib import import_module
from importlib.machinery import EXTENSION_SUFFIXES

record = json.load(open(sys.argv[1]))
for name in record["modules"]:
    path = import_module(name).__file__ or ""
    if not path.endswith(tuple(EXTENSION_SUFFIXES)):
        sys.exit(f"{name} loads from {path}, not its compiled module")
"""


class NotCompiled(RuntimeError):
    """``--compiled DIR`` names no usable compiled build: the message says how to make one."""


def check_tree(root: Path) -> dict[str, Any]:
    """The record of the compiled tree ``root``, checked as the module docstring says."""
    root = root.resolve()
    try:
        record: dict[str, Any] = json.loads((root / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NotCompiled(
            f"{root} holds no compiled build ({RECORD}: {exc}); make one with `{BUILD}`"
        ) from None
    level = record.get("opt_level", "3")
    if level != "3":
        raise NotCompiled(
            f"{root} was built at -O{level} (MYPYC_OPT_LEVEL={level}), a quick build for "
            f"checks, not the one to measure: rebuild it with `{BUILD}` and MYPYC_OPT_LEVEL unset"
        )
    done = subprocess.run(
        [sys.executable, "-c", _CHECK, str(root / RECORD)],
        cwd=root,
        env={**_plain_env(), "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise NotCompiled(
            f"{root}'s cores do not import compiled: {(done.stderr or done.stdout).strip()}; "
            f"rebuild it with `{BUILD}`"
        )
    return {"dir": str(root), "opt_level": level, "modules": sorted(record["modules"])}


def node_command(root: Path, command: list[str]) -> list[str]:
    """``command`` (a node's ``zbroker run``) run from ``root``, with only ``root`` on
    PYTHONPATH: env(1) sets both and execs it, so the node keeps the pid it is started with."""
    return ["env", "-C", str(root.resolve()), f"PYTHONPATH={root.resolve()}", *command]


def maps_compiled(pid: int, root: Path) -> bool:
    """Whether process ``pid`` has mypyc's shared library of the tree ``root`` mapped."""
    library = str((root / "zbroker").resolve() / "cores__mypyc")
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8") as maps:
            return any(library in line for line in maps)
    except OSError:
        return False


def _plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
