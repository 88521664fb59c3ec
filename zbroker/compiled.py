"""The compiled build's record, and the check that no compiled module is older than its source.

``ZBROKER_COMPILE=1 python -m pip install -e .`` (setup.py) compiles the pure cores with
mypyc and writes ``compiled.json`` beside this file: each compiled module, its source file
(relative to this package) and the SHA-256 of that source as it was compiled. Python
imports an extension module in preference to the ``.py`` beside it, so in an editable
install a core edited after the build would silently run its old compiled code. The
package's ``__init__`` calls :func:`check` once, before any core is imported: it hashes the
recorded sources whose compiled file is still there (fifteen files, 286 KB: about
half a millisecond) and raises :class:`StaleBuild` naming the first that changed.

A pure build (``python -m pip install -e .``) removes the compiled files and this record
(:func:`remove`), so there is nothing to check and the check costs one ``stat``.

This module imports nothing of zbroker: setup.py loads it by path, before the package can
be imported.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

RECORD = "compiled.json"
REBUILD = "ZBROKER_COMPILE=1 python -m pip install -e ."
PURE = "python -m pip install -e ."
_HERE = Path(__file__).resolve().parent


class StaleBuild(ImportError):
    """A compiled module would run older code than its ``.py``: rebuild, or go back to pure."""


def source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compiled_file(source: Path) -> Path | None:
    """The extension module Python would load instead of ``source``, if there is one."""
    for suffix in EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def write(package: Path, modules: dict[str, str], group_lib: str, opt_level: str = "3") -> Path:
    """Record what was compiled: ``modules`` maps each module's name to its source file
    relative to ``package`` (the sources are hashed now, as they were compiled),
    ``group_lib`` names mypyc's shared library module, and ``opt_level`` is the C
    compiler's ``-O`` (3 unless a quick check asked for less: setup.py)."""
    record = {
        "group_lib": group_lib,
        "opt_level": opt_level,
        "modules": {
            name: {"source": rel, "sha256": source_hash(package / rel)}
            for name, rel in sorted(modules.items())
        },
    }
    path = package / RECORD
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def _read(package: Path) -> dict[str, object] | None:
    try:
        text = (package / RECORD).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    record = json.loads(text)
    assert isinstance(record, dict)
    return record


def _entries(record: dict[str, object]) -> list[tuple[str, str, str]]:
    modules = record["modules"]
    assert isinstance(modules, dict)
    return [(name, entry["source"], entry["sha256"]) for name, entry in modules.items()]


def check(package: Path = _HERE) -> None:
    """Raise :class:`StaleBuild` if a compiled module's source changed since it was built."""
    record = _read(package)
    if record is None:
        return
    for name, rel, digest in _entries(record):
        source = package / rel
        built = compiled_file(source)
        if built is None:  # its compiled file was removed: Python loads the .py
            continue
        if not source.exists() or source_hash(source) != digest:
            raise StaleBuild(
                f"{source} was changed after it was compiled: {built.name} beside it would "
                f"run the old code of {name}. Rebuild the compiled cores with "
                f"`{REBUILD}`, or go back to pure Python (it removes the compiled files) "
                f"with `{PURE}`, in {package.parent}",
                name=name,
                path=str(built),
            )


def remove(package: Path) -> list[Path]:
    """Remove a compiled build's files from ``package`` (a pure build of the tree does
    this, so that no old extension module shadows the sources): the returned paths."""
    record = _read(package)
    if record is None:
        return []
    removed = []
    group_lib = record["group_lib"]
    assert isinstance(group_lib, str)
    targets = [compiled_file(package / rel) for _, rel, _ in _entries(record)]
    targets += [compiled_file(package / (group_lib.split(".")[-1] + ".py"))]
    for target in targets:
        if target is not None:
            target.unlink()
            removed.append(target)
    os.unlink(package / RECORD)
    return removed
