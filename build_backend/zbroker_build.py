"""The build backend: setuptools', asking for mypy (which ships mypyc) only when compiling.

pyproject.toml names this module (``backend-path``). With ``ZBROKER_COMPILE=1`` in the
environment, pip installs mypy into the isolated build environment before it runs setup.py,
which then compiles the cores; without it the build is setuptools' own, pure Python.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403 (the backend's other hooks, unchanged)

# mypyc of mypy 1.10 and later compiles the cores as they are (the version the tests lint with)
MYPYC = "mypy>=1.10"


def _extra() -> list[str]:
    """mypy, and the package's own dependencies: mypyc compiles with their types, as
    mypy's own build does (without them the cores' calls into them compile untyped)."""
    if os.environ.get("ZBROKER_COMPILE", "").strip().lower() not in ("1", "yes", "true"):
        return []
    with open("pyproject.toml", "rb") as file:
        dependencies: list[str] = tomllib.load(file)["project"]["dependencies"]
    return [MYPYC, *dependencies]


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    return [*build_meta.get_requires_for_build_wheel(config_settings), *_extra()]


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    return [*build_meta.get_requires_for_build_editable(config_settings), *_extra()]
