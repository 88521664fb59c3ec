"""License operations on a running triad (ops probe): nodes whose license files order the
SERVER lines differently (broker/core.py ``_order``), a reread off the loop
(broker/node.py ``Rereader``), lines refused by a node (broker/seats.py), and the admin
commands against endpoints the running triad reports (broker/cli.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_core import CAD, NAMES, WALL, Net, config
from zbroker.broker import config as configs
from zbroker.broker import license as license_module
from zbroker.broker.cli import _check_files
from zbroker.broker.config import Config, ConfigError, load_config
from zbroker.broker.core import NodeCore
from zbroker.broker.demo import write_demo
from zbroker.broker.license import LicenseError, load_license, sign_license_text
from zbroker.broker.model import Now
from zbroker.broker.node import Reread, Rereader, read_files
from zbroker.broker.signing import load_private_key, load_public_key
from zbroker.broker.storage import Loaded

pytestmark = pytest.mark.unit


def reordered(cfg: Config, names: tuple[str, ...]) -> Config:
    """``cfg`` with its SERVER lines in the order ``names``: the same nodes and endpoints."""
    by_name = {n.name: n for n in cfg.nodes}
    nodes = tuple(dataclasses.replace(by_name[n], rank=r) for r, n in enumerate(names))
    return dataclasses.replace(cfg, nodes=nodes)


def mixed_triad(odd: str, order: tuple[str, ...]) -> Net:
    cfg = config()
    now = Now(100.0, WALL + 100.0)
    configs = {n: reordered(cfg, order) if n == odd else cfg for n in NAMES}
    return Net({n: NodeCore(configs[n], n, CAD, Loaded(fresh=False), now, mode="plain")
                for n in NAMES})  # fmt: skip


def terms(net: Net) -> int:
    return max(c.replica.term for c in net.cores.values())


def test_nodes_that_order_the_server_lines_differently_keep_one_primary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """repro_rank_flap.py: n1's file orders n3, n1, n2, the others' n1, n2, n3. n1 is
    handed the triad by failback, hands it to n3, which hands it back: elections without
    end. While they disagree no node hands over, and each logs the one line once."""
    net = mixed_triad("n1", ("n3", "n1", "n2"))
    with caplog.at_level(logging.WARNING, logger="zbroker.node"):
        net.serving()
        net.run(1.0)
        settled = terms(net)
        net.run(10.0)
    assert terms(net) == settled
    said = [r.getMessage() for r in caplog.records if "order the SERVER lines" in r.getMessage()]
    assert len(said) == 3  # one a node
    assert "this node's (n1): n3, n1, n2; n2's: n1, n2, n3" in " ".join(said)
    (own,) = [e for e in net.cores["n2"].report(net.now)["nodes"] if e["name"] == "n2"]
    assert "restart the nodes one at a time" in own["settings"][0]


def test_while_the_orders_differ_a_failure_still_elects_one_primary() -> None:
    net = mixed_triad("n1", ("n3", "n1", "n2"))
    first = net.serving()
    net.run(1.0)
    net.cut.add(first)
    net.run(3.0)
    serving = [
        n for n, c in net.cores.items() if n not in net.cut and c.replica.is_serving(net.mono)
    ]
    assert len(serving) == 1
    before = terms(net)
    net.cut.clear()  # it comes back: no hand-over toward it
    net.run(5.0)
    assert terms(net) == before
    assert [n for n, c in net.cores.items() if c.replica.is_serving(net.mono)] == serving


def test_the_order_note_names_both_orders_and_the_rule_meanwhile() -> None:
    note = configs.order_note("n2", "n1 n2 n3", {"n1": "n3 n1 n2"})
    assert note.startswith(
        "the nodes' license files order the SERVER lines differently (the rank): this "
        "node's (n2): n1, n2, n3; n1's: n3, n1, n2: put the same license file on every node"
    )
    assert note.endswith("elections rank the nodes by name (n1, n2, n3)")


def test_a_reread_names_the_server_line_changes_it_cannot_make() -> None:
    """repro_rank_flap.py, repro_endpoint_reread.py: reread said "serving the files read"."""
    cfg = config()
    assert configs.server_changes(cfg, cfg) is None
    moved = dataclasses.replace(cfg.nodes[0], client="tcp://127.0.0.1:9999", public_key="K")
    read = reordered(dataclasses.replace(cfg, nodes=(moved, *cfg.nodes[1:])), ("n3", "n1", "n2"))
    assert configs.server_changes(cfg, read) == (
        "the license file's SERVER lines change the order n3, n1, n2 (it runs by n1, n2, n3); "
        "n1's endpoint tcp://127.0.0.1:9999 (it runs by tcp://127.0.0.1:7000); n1's KEY=: a "
        "reread does not change them; they take effect when the nodes restart with the new "
        "file, one at a time"
    )


# --- a reread off the loop ---------------------------------------------------------------


def big_demo(tmp_path: Path, lines: int) -> Path:
    """The demo triad's files with ``lines`` more INCREMENT lines, signed by its vendor."""
    config = write_demo(tmp_path / "demo", secure=False)
    lic = tmp_path / "demo" / "demo.lic"
    body = "".join(f"INCREMENT f{i} demo 1.0 permanent 5\n" for i in range(lines))
    key = load_private_key(tmp_path / "demo" / "keys" / "vendor.key")
    lic.write_text(lic.read_text() + sign_license_text(body, key))
    return config


def finished(rereader: Rereader, count: int = 1, within: float = 30.0) -> list[Reread]:
    """The rereads ``rereader`` finished, once ``count`` have, or ``within`` seconds."""
    got: list[Reread] = []
    deadline = time.monotonic() + within
    while len(got) < count and time.monotonic() < deadline:
        got += rereader.done()
        time.sleep(0.01)  # polling a condition until a deadline
    return got


def test_a_reread_reads_on_a_thread_of_its_own_and_coalesces(tmp_path: Path) -> None:
    """repro_big_reread.py: 3000 lines read on the loop stalled it 3.5 s: an election."""
    config = big_demo(tmp_path, 600)
    rereader = Rereader(config)
    asked = time.monotonic()
    for _ in range(5):  # asked again while it reads: once more after it, not four times
        rereader.ask()
    assert time.monotonic() - asked < 0.05 and rereader.done() == []
    assert rereader.busy()  # what the node's status says meanwhile ("rereading")
    read = finished(rereader, 2)
    assert not rereader.busy()
    assert finished(rereader, 1, within=1.0) == []  # nothing more comes
    assert len(read) == 2 and all(isinstance(r, tuple) for r in read)
    last = read[-1]
    assert isinstance(last, tuple) and len(last[1].entitlements) == 604


def test_a_reread_that_fails_is_handed_to_the_loop_as_its_error(tmp_path: Path) -> None:
    config = big_demo(tmp_path, 1)
    (tmp_path / "demo" / "demo.lic").write_text("FEATURE broken\n")
    rereader = Rereader(config)
    rereader.ask()
    (read,) = finished(rereader)
    assert isinstance(read, ConfigError | LicenseError)


def test_an_unchanged_lines_signature_is_verified_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second read of a file verifies none of its lines again: every verification
    (signing.verify_signature, as license.py calls it) is counted."""
    cfg = load_config(big_demo(tmp_path, 50))
    read_files(cfg)
    calls: list[object] = []
    real = license_module.verify_signature

    def counted(*args: Any) -> bool:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(license_module, "verify_signature", counted)
    again = load_license(cfg.license_path, load_public_key(cfg.vendor_key))
    assert calls == [] and len(again.entitlements) == 54
    lic = tmp_path / "demo" / "demo.lic"
    lic.write_text(lic.read_text().replace("permanent 5", "permanent 6", 1))  # one edited
    edited = load_license(cfg.license_path, load_public_key(cfg.vendor_key))
    assert len(calls) == 1 and len(edited.refused) == 1


# --- lines refused ------------------------------------------------------------------------


def test_a_nodes_refused_lines_are_in_its_status_and_counted_by_reread(tmp_path: Path) -> None:
    """repro_tamper_denial.py: a count edited 10 -> 50 broke cad's signature; reread said
    "serving the files read" (exit 0) and status gave no reason."""
    config_path = big_demo(tmp_path, 1)
    lic = tmp_path / "demo" / "demo.lic"
    lic.write_text(lic.read_text().replace("2.0 01-dec-2027 10", "2.0 01-dec-2027 50"))
    cfg = load_config(config_path)
    assert _check_files(cfg) == 1
    own, options, _ = read_files(cfg)
    (why,) = own.refused
    assert "FEATURE cad refused: signature does not verify" in why
    now = Now(100.0, WALL + 100.0)
    core = NodeCore(cfg, "alpha", own.entitlements, Loaded(fresh=False), now, mode="plain",
                    signed=own.signed, vendor_key=own.key, refused=own.refused)  # fmt: skip
    (entry,) = [e for e in core.report(now)["nodes"] if e["name"] == "alpha"]
    assert entry["refused"] == [why]
    core.rereading = True  # the shell's reread under way: the entry is of before
    (entry,) = [e for e in core.report(now)["nodes"] if e["name"] == "alpha"]
    assert entry["rereading"] is True
    core.rereading = False
    core.reread(own.entitlements, options, own.signed, own.key, now)  # restored: none
    (entry,) = [e for e in core.report(now)["nodes"] if e["name"] == "alpha"]
    assert "refused" not in entry
