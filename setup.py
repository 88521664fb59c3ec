"""The build: pure Python unless ZBROKER_COMPILE=1, which compiles the pure cores with mypyc.

    python -m pip install -e .                     # pure Python: no compiler, no mypy
    ZBROKER_COMPILE=1 python -m pip install -e .   # the cores compiled (a C compiler needed)

``MYPYC_OPT_LEVEL`` (0 to 3, 3 when unset; the variable mypy's and black's own setup.py
read) is mypyc's ``opt_level``, the C compiler's ``-O``; nothing else of the build depends
on it. 3 is the build to run and to measure. CI's check that the compiled cores behave as
the pure ones (.ci/run, scripts/compiled.sh) builds at 0, in half the time: mypyc writes
the same C at every level, and gcc's level changes how fast that C runs, not what it does
(at 0 mypyc also turns on the C ``assert``s of its runtime and of Python's headers: the
check is, if anything, stricter).

Everything else about the package is in pyproject.toml; this file only adds the compiled
cores, the way mypy and black build themselves with mypyc. The build backend
(build_backend/zbroker_build.py) asks for mypy, which ships mypyc, only when the switch is
on. mypyc runs when the extensions are built, not when setup.py is read, so the
metadata passes of pip cost nothing.

The compiled build writes zbroker/compiled.json, each compiled module's source hash as it
was compiled; ``import zbroker`` refuses a compiled module whose source changed since
(zbroker/compiled.py). A pure build removes the compiled files a compiled build left in
the tree, so switching back needs nothing more than the plain install.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "zbroker"
SWITCH = "ZBROKER_COMPILE"
OPT_LEVEL = "MYPYC_OPT_LEVEL"

# The pure cores: state machines with no sockets and no clock, on the path of every request
# (issue 17). Paths are relative to the package (zbroker/broker is the tree's broker/).
CORES = [
    "broker/ledger.py",
    "broker/seats.py",
    "broker/wire.py",
    "broker/front.py",
    "peers/replica.py",
    "peers/log.py",
    "peers/messages.py",
    "broker/model.py",
    "broker/core.py",
    "broker/holds.py",
    "broker/dup.py",
    "broker/reportlog.py",
    "broker/tallies.py",
    "peers/progress.py",
    "peers/replication.py",
]
# Left pure: broker/apply.py (a test makes it build a refusing ledger by replacing
# apply.Ledger; its loop is short, the compiled Ledger.apply does the work), policy.py (a
# test replaces Policy.timeout; off the path of a checkout) and limits.py (Limits must
# refuse a bool, which a compiled int field would take as 1 before __post_init__ looks).
# mypyc's shared library of the cores, inside the package (not a top-level module of its
# own, which an editable install's finder would not map).
GROUP = "zbroker.cores"


def _record_module() -> ModuleType:
    """zbroker/compiled.py, loaded by path: the package itself cannot be imported here."""
    spec = importlib.util.spec_from_file_location("_zbroker_compiled", PACKAGE / "compiled.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _opt_level() -> str:
    value = os.environ.get(OPT_LEVEL, "").strip() or "3"
    if value not in ("0", "1", "2", "3"):
        sys.exit(
            f"{OPT_LEVEL}={os.environ[OPT_LEVEL]!r}: the C compiler's optimisation level "
            "of the compiled cores, 0 to 3; unset it for the build to run and measure (3)"
        )
    return value


def _compile_requested() -> bool:
    value = os.environ.get(SWITCH, "").strip().lower()
    if value in ("", "0", "no", "false"):
        return False
    if value in ("1", "yes", "true"):
        return True
    sys.exit(f"{SWITCH}={os.environ[SWITCH]!r}: set it to 1 to compile the cores, or unset it")


class BuildCores(build_ext):
    """Compile the cores with mypyc, then record their sources.

    pip's metadata passes configure build_ext too (egg_info lists its sources), some
    before mypy is installed: mypyc runs only for a command that builds."""

    def finalize_options(self) -> None:
        if not set(self.distribution.commands) <= METADATA_ONLY:
            self.distribution.ext_modules = _mypycify()
        super().finalize_options()

    def run(self) -> None:
        super().run()
        # Where the extensions went: the tree for an in-place (editable) build, else build/lib.
        package = Path(self.get_ext_fullpath(f"{GROUP}__mypyc")).parent
        modules = {"zbroker." + rel[: -len(".py")].replace("/", "."): rel for rel in CORES}
        _record_module().write(package, modules, f"{GROUP}__mypyc", opt_level=_opt_level())


METADATA_ONLY = {"egg_info", "dist_info", "sdist"}


def _mypycify() -> list[Extension]:
    try:
        from mypyc.build import mypycify
    except ImportError:
        sys.exit(
            f"{SWITCH}=1 compiles with mypyc, which ships with mypy, and this build "
            "environment has no mypy: let pip isolate the build (it installs mypy), "
            "or `python -m pip install mypy` first"
        )
    extensions: list[Extension] = mypycify(
        [str(Path("zbroker") / rel) for rel in CORES], group_name=GROUP, opt_level=_opt_level()
    )
    return extensions


options: dict[str, Any] = {}
if _compile_requested():
    # A stand-in, replaced by mypyc's extensions in BuildCores: it makes the build run
    # build_ext and the wheel platform-specific.
    options["ext_modules"] = [Extension(f"{GROUP}__mypyc", sources=[])]
    options["cmdclass"] = {"build_ext": BuildCores}
else:
    for path in _record_module().remove(PACKAGE):
        print(f"removed the compiled {path.relative_to(ROOT)} (a pure build)")

setup(**options)
