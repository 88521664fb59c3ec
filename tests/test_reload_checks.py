"""A primary compares its license and options files with the triad's only when either
side changed (broker/core.py ``_reload``), not at every ledger tick: a single server used
to compare every line's map 20 times a second (scripts/ab_instructions.py counted it).
What it replicates is unchanged: tests/test_served.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_core import Net, config
from tests.test_served import VENDOR, served_cad, signed
from zbroker.broker import core as core_module
from zbroker.broker.core import NodeCore
from zbroker.broker.model import Now
from zbroker.broker.storage import Loaded

pytestmark = pytest.mark.unit


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    same_lines = core_module.same_lines

    def counted(*args: Any) -> bool:
        calls[0] += 1
        return same_lines(*args)

    monkeypatch.setattr(core_module, "same_lines", counted)
    return calls


def test_a_single_server_compares_its_files_once_then_after_a_reread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _counting(monkeypatch)
    lic = signed(15)
    alone = NodeCore(
        config(("n1",)),
        "n1",
        tuple(lic.entitlements),
        Loaded(fresh=False),
        Now(100.0, 1_780_000_000.0),
        mode="plain",
        signed=tuple(lic.signed),
        vendor_key=VENDOR.public_key(),
    )
    network = Net({"n1": alone})
    assert network.serving() == "n1"
    network.run(2.0)  # some 40 ledger ticks
    assert calls[0] <= 2  # its first tick, and the one after the reload it made, if any
    assert served_cad(network) == {15}
    smaller = signed(3)
    network.cores["n1"].reread(
        tuple(smaller.entitlements), None, tuple(smaller.signed), VENDOR.public_key()
    )
    before = calls[0]
    network.run(2.0)
    assert served_cad(network) == {3}  # a reread is still served at once
    assert calls[0] - before <= 2
