"""The test kit ships as a pytest plugin (``zbroker[testing]``, entry point ``pytest11``):
a project with no conftest of ours gets its fixtures, as an application embedding
``clients`` would. Pytester runs pytest in this process; nothing here starts a node.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

import zbroker.clients.testing.pytest_plugin as plugin

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.unit

FIXTURES = ("make_triad", "triad", "single", "raw")


def test_the_kit_is_registered_under_pytest11() -> None:
    (found,) = [e for e in entry_points(group="pytest11") if e.name == "zbroker"]
    assert found.value == "zbroker.clients.testing.pytest_plugin"
    assert found.load() is plugin
    assert all(callable(getattr(plugin, name)) for name in FIXTURES)


def test_a_project_without_our_conftest_gets_the_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider\n")
    pytester.makepyfile(
        test_inner_embedding="""
        def test_uses_the_kit(raw, make_triad):
            client = raw("tcp://127.0.0.1:9")  # a socket only: nothing listens, nothing sent
            assert client.sid and callable(make_triad)
        """
    )
    result = pytester.runpytest_inprocess("-q")
    result.assert_outcomes(passed=1)
    listed = pytester.runpytest_inprocess("--fixtures", "-q").stdout.str()
    assert all(name in listed for name in FIXTURES)
