"""The guard that gives every test exactly one layer.

The fixtures that start real nodes (``make_triad``, ``triad``, ``single``, ``raw``) are
the test kit's, ``clients/testing/pytest_plugin.py``, which pytest loads through the
``pytest11`` entry point of ``zbroker[testing]``.

The layers (README.md, "Test layers"), each run alone with ``-m LAYER``:

- ``unit``: pure code in this process, fakes allowed; no node process, no real node.
- ``sim``: the deterministic simulation (tests/sim.py).
- ``integration``: real node processes or the real ``zbroker`` command in a subprocess,
  or real nodes over ZeroMQ.
- ``chaos``: the short chaos runs.

A module says its layer with ``pytestmark = pytest.mark.LAYER``; a test of another layer
in it says its own, and the closest one wins. ``pytest_collection_modifyitems`` below
refuses to run a collection in which a test has no layer, two layers at one level, a
unit test that starts a process or a sim test that starts a node: so a new test file
cannot slip out of the layers, and ``-m unit`` stays fast.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from types import CodeType
from typing import Any

import pytest
from _pytest.nodes import Node

LAYERS = ("unit", "sim", "integration", "chaos")
# What a test of a layer may not start, by the names its code refers to (CodeType.co_names:
# the test's, its fixtures' and their own modules' helpers'). A unit test starts no process
# at all; the simulation may fan its seeds out to a process pool, but starts no node: no
# triad of the test kit or the benchmark, no subprocess (which could be `zbroker`).
NODE_STARTERS = frozenset({"LocalTriad", "BenchTriad", "subprocess", "Popen"})
FORBIDDEN = {
    "unit": NODE_STARTERS | {"fork", "multiprocessing", "Pool", "ProcessPoolExecutor"},
    "sim": NODE_STARTERS,
}


def _layers_of(node: Node) -> set[str]:
    return {mark.name for mark in node.own_markers if mark.name in LAYERS}


def _own_code(obj: object, module: str) -> list[CodeType]:
    """The code of ``obj`` if it is a function or class defined in ``module``: the helpers
    a test or fixture calls, which may start the process for it."""
    if getattr(obj, "__module__", None) != module:
        return []
    if inspect.isfunction(obj):
        return [inspect.unwrap(obj).__code__]
    if inspect.isclass(obj):
        # methods, static and class methods (unwrap opens those) and properties
        members = [inspect.unwrap(m) for m in vars(obj).values()]
        members += [m.fget for m in vars(obj).values() if isinstance(m, property)]
        return [m.__code__ for m in members if inspect.isfunction(m)]
    return []


def _reaches(
    code: CodeType, scope: dict[str, Any], names: frozenset[str], seen: set[CodeType]
) -> list[str]:
    """The path of names from ``code`` to one of ``names``, or [] if none is reached.
    ``scope`` is the globals of the module ``code`` belongs to; only helpers of that
    module are followed (a library's functions are not test code)."""
    if code in seen:
        return []
    seen.add(code)
    module = scope.get("__name__", "")
    for name in code.co_names:
        if name in names:
            return [name]
        for inner in _own_code(scope.get(name), module):
            if path := _reaches(inner, scope, names, seen):
                return [name, *path]
    for const in code.co_consts:  # nested functions, lambdas, comprehensions
        if isinstance(const, CodeType) and (path := _reaches(const, scope, names, seen)):
            return path
    return []


_REACHED: dict[tuple[object, frozenset[str]], list[str]] = {}


def _path_from(function: Any, names: frozenset[str]) -> list[str]:
    """``_reaches`` from a test or fixture function (under hypothesis' wrapper), cached."""
    inner = getattr(getattr(function, "hypothesis", None), "inner_test", function)
    inner = inspect.unwrap(inner)
    if (inner, names) not in _REACHED:
        code = getattr(inner, "__code__", None)
        scope = getattr(inner, "__globals__", {})
        found = _reaches(code, scope, names, set()) if code is not None else []
        _REACHED[inner, names] = found
    return _REACHED[inner, names]


def _how_it_starts(item: pytest.Item, names: frozenset[str]) -> str | None:
    """How ``item`` reaches one of ``names``: through its own code or a fixture's."""
    function = getattr(item, "function", None)
    if function is not None and (path := _path_from(function, names)):
        return " -> ".join(path)
    # The fixtures it uses, directly or through other fixtures (make_triad under triad).
    # ``_fixtureinfo`` is pytest's: the one place that maps an item to its fixtures' code.
    # pytest's own fixtures start nothing unless asked (pytester runs pytest in this
    # process); only the suite's are followed.
    info = getattr(item, "_fixtureinfo", None)
    for name, definitions in sorted(getattr(info, "name2fixturedefs", {}).items()):
        for definition in definitions:
            if definition.func.__module__.startswith("_pytest."):
                continue
            if path := _path_from(definition.func, names):
                return " -> ".join([f"fixture {name}", *path])
    return None


def _layer(item: pytest.Item) -> tuple[str | None, str]:
    """The layer of ``item`` (its closest layer marker) and where it came from, or None
    and what is wrong."""
    for node in reversed(item.listchain()):
        found = _layers_of(node)
        if len(found) > 1:
            return None, f"has {' and '.join(sorted(found))} on one level ({node.nodeid})"
        if found:
            return found.pop(), "marker"
    return None, (
        f"has no layer: give its module `pytestmark = pytest.mark.LAYER` (or the test "
        f"`@pytest.mark.LAYER`), LAYER one of {', '.join(LAYERS)}"
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the markers this settles
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    problems: list[str] = []
    chosen: list[tuple[pytest.Item, str]] = []
    for item in items:
        layer, source = _layer(item)
        if layer is None:
            problems.append(f"{item.nodeid} {source}")
            continue
        if layer in FORBIDDEN and (how := _how_it_starts(item, FORBIDDEN[layer])):
            problems.append(
                f"{item.nodeid} is labelled {layer} but starts a process ({how}): "
                "label it `@pytest.mark.integration`"
            )
        chosen.append((item, layer))
    if problems:
        raise pytest.UsageError("tests outside the layers:\n  " + "\n  ".join(problems))
    # `-m` matches every marker up the chain; for the closest layer to win there too, each
    # item carries its own layer and the modules and classes carry none.
    for item, layer in chosen:
        if layer not in _layers_of(item):
            item.add_marker(layer)
    for item, _ in chosen:
        for node in item.listchain()[:-1]:
            node.own_markers[:] = [m for m in node.own_markers if m.name not in LAYERS]


@pytest.fixture
def make_node() -> Iterator[Callable[..., Any]]:
    """Scripted nodes (tests/test_client.py's FakeNode), stopped after the test: shared by
    the client library's test files."""
    from test_client import FakeNode

    nodes: list[FakeNode] = []

    def make(ledger: Any, mode: str = "primary") -> FakeNode:
        node = FakeNode(ledger, mode)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()
