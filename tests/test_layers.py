"""The test layers (tests/conftest.py): each test has exactly one, the closest marker
wins for ``-m`` too, and a test that would slip out of the layers stops the collection.

Each case runs pytest in this process (pytester) on a small suite beside a copy of the
project's conftest: nothing here starts a process. The suites' modules are named
``test_inner_*`` so as not to meet this suite's own, which are already imported.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.unit

LAYERS = ("unit", "sim", "integration", "chaos")
INI = """[pytest]
addopts = --strict-markers -p no:cacheprovider -p no:benchmark -p no:hypothesispytest
markers =
""" + "".join(f"    {layer}: the {layer} layer\n" for layer in LAYERS)


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makeini(INI)
    return pytester


def _selected(suite: pytest.Pytester, *args: str) -> list[str]:
    result = suite.runpytest_inprocess("--collect-only", "-q", *args)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED), result.outlines
    return [line for line in result.outlines if "::" in line]


def test_the_closest_layer_wins_and_each_test_is_in_exactly_one(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_inner_mixed="""
        import pytest

        pytestmark = pytest.mark.unit

        def test_pure():
            pass

        @pytest.mark.integration
        def test_real():
            pass

        @pytest.mark.sim
        class TestSim:
            def test_seed(self):
                pass

            @pytest.mark.chaos
            def test_chaos(self):
                pass

        @pytest.mark.parametrize("x", [1, pytest.param(2, marks=pytest.mark.integration)])
        def test_param(x):
            pass
        """
    )
    everything = _selected(suite)
    by_layer = {layer: _selected(suite, "-m", layer) for layer in LAYERS}
    assert by_layer == {
        "unit": ["test_inner_mixed.py::test_pure", "test_inner_mixed.py::test_param[1]"],
        "sim": ["test_inner_mixed.py::TestSim::test_seed"],
        "integration": ["test_inner_mixed.py::test_real", "test_inner_mixed.py::test_param[2]"],
        "chaos": ["test_inner_mixed.py::TestSim::test_chaos"],
    }
    assert sorted(name for names in by_layer.values() for name in names) == sorted(everything)
    assert _selected(suite, "-m", "not integration") == [
        "test_inner_mixed.py::test_pure",
        "test_inner_mixed.py::TestSim::test_seed",
        "test_inner_mixed.py::TestSim::test_chaos",
        "test_inner_mixed.py::test_param[1]",
    ]


def test_a_test_with_no_layer_or_two_at_one_level_stops_the_collection(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(
        test_inner_new="""
        def test_forgotten():
            pass
        """,
        test_inner_two="""
        import pytest

        pytestmark = pytest.mark.unit

        @pytest.mark.sim
        @pytest.mark.chaos
        def test_torn():
            pass
        """,
    )
    result = suite.runpytest_inprocess("--collect-only", "-q", "-m", "unit")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: tests outside the layers:",
            "*test_inner_new.py::test_forgotten has no layer: give its module `pytestmark = "
            "pytest.mark.LAYER`*unit, sim, integration, chaos",
            "*test_inner_two.py::test_torn has chaos and sim on one level*",
        ]
    )


def test_a_unit_test_that_starts_a_process_and_a_sim_test_that_starts_a_node_are_refused(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(
        test_inner_starts="""
        import subprocess
        import sys
        from concurrent.futures import ProcessPoolExecutor

        import pytest

        from zbroker.clients.testing import LocalTriad

        pytestmark = pytest.mark.unit

        def _zbroker():
            return subprocess.run([sys.executable, "-m", "zbroker.broker", "--help"])

        class Kit:
            def start(self):
                return LocalTriad

        @pytest.fixture
        def kit():
            return Kit().start()

        def test_through_a_helper():
            _zbroker()

        def test_through_the_suites_fixture(single):
            pass

        def test_through_a_fixture_of_its_own(kit):
            pass

        def test_in_a_lambda():
            (lambda: ProcessPoolExecutor())()

        @pytest.mark.integration
        def test_labelled_right(single):
            _zbroker()

        def test_pure(tmp_path, monkeypatch):
            pass

        @pytest.mark.sim
        def test_seeds_in_a_pool():
            ProcessPoolExecutor

        @pytest.mark.sim
        def test_a_node_in_the_simulation(triad):
            pass
        """
    )
    result = suite.runpytest_inprocess("--collect-only", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    label = ": label it `@pytest.mark.integration`"
    result.stderr.fnmatch_lines(
        [
            f"*::test_through_a_helper is labelled unit but starts a process "
            f"(_zbroker -> subprocess){label}",
            f"*::test_through_the_suites_fixture is labelled unit but starts a process "
            f"(fixture make_triad -> LocalTriad){label}",
            f"*::test_through_a_fixture_of_its_own is labelled unit but starts a process "
            f"(fixture kit -> Kit -> LocalTriad){label}",
            f"*::test_in_a_lambda is labelled unit but starts a process "
            f"(ProcessPoolExecutor){label}",
            f"*::test_a_node_in_the_simulation is labelled sim but starts a process "
            f"(fixture make_triad -> LocalTriad){label}",
        ]
    )
    refused = result.stderr.str()
    for allowed in ("test_labelled_right", "test_pure", "test_seeds_in_a_pool"):
        assert allowed not in refused
