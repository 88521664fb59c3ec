"""The test kit as a pytest plugin: fixtures that start real triads (``pytest11``: zbroker).

Installed with ``zbroker[testing]``, pytest loads it in every run; a test asks for

- ``make_triad(**kwargs)``: a started ``LocalTriad`` (its options), as many as it likes;
- ``triad``: three nodes with the default timings; ``single``: one unreplicated node
  with a short lease, in plain TCP;
- ``raw(endpoint)``: a ``RawClient`` (frames by hand, for tests of the node itself).

Everything started is stopped at teardown; when the test failed, the nodes' logs are
printed (pytest shows them under "Captured stdout teardown").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from zbroker.clients.testing.kit import LocalTriad
from zbroker.clients.testing.raw import RawClient

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.stash[_FAILED] = report.failed


@pytest.fixture
def make_triad(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., LocalTriad]]:
    """Start a LocalTriad with other settings; stopped (logs shown on failure) at teardown."""
    made: list[LocalTriad] = []

    def make(**kwargs: Any) -> LocalTriad:
        triad = LocalTriad(tmp_path / f"triad{len(made)}", **kwargs)
        made.append(triad)
        triad.start()
        return triad

    yield make
    for triad in made:
        triad.stop()
        if request.node.stash.get(_FAILED, False):
            print(triad.log_text())  # shown by pytest under "Captured stdout teardown"


@pytest.fixture
def single(make_triad: Callable[..., LocalTriad]) -> LocalTriad:
    """One unreplicated node with a short lease, in plain TCP (tests poke it with raw
    sockets; secure mode has tests of its own)."""
    return make_triad(servers=1, lease=1.5, secure=False)


@pytest.fixture
def triad(make_triad: Callable[..., LocalTriad]) -> LocalTriad:
    """Three nodes with the default timings."""
    return make_triad(servers=3, lease=5.0)


@pytest.fixture
def raw() -> Iterator[Callable[[str], RawClient]]:
    """``raw(endpoint)``: a RawClient to that node, closed at teardown."""
    made: list[RawClient] = []

    def make(endpoint: str) -> RawClient:
        client = RawClient(endpoint)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
