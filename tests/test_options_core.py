"""The options file in the node core: the administrator's reread and its replication."""

from __future__ import annotations

import pytest

from tests.test_core import STEP, Origin, replies, request, triad
from zbroker.broker.core import ClientMessage
from zbroker.broker.model import Entitlement
from zbroker.broker.options import parse_options
from zbroker.broker.wire import PROTOCOL_VERSION, pack

pytestmark = pytest.mark.unit


def test_an_admin_reread_from_the_host_asks_the_shell_to_read_the_files() -> None:
    net = triad()
    primary = net.serving()
    remote = ClientMessage(
        [b"far", pack({"v": PROTOCOL_VERSION, "op": "admin", "action": "reread", "req": 1})],
        Origin(**{"Peer-Address": "192.0.2.7"}),
    )
    ready = net.cycle(primary, remote)
    assert not ready.reread and replies(ready)[0][1]["code"] == "not_allowed"
    ready = net.cycle(primary, request(b"near", op="admin", action="reread", req=2))
    assert ready.reread and replies(ready)[0][1]["rereading"] is True
    assert not net.cycle(primary).reread  # once


def test_what_a_primary_rereads_reaches_every_node_in_one_delta() -> None:
    net = triad()
    primary = net.serving()
    net.run(0.5)  # the license's first reload commits everywhere
    options = parse_options("EXCLUDE cad USER hank\n", path="site.opt")
    lines = (Entitlement("cad", "2.0", 3, None),)
    before = {name: core.replica.commit for name, core in net.cores.items()}
    for core in net.cores.values():  # the administrator rereads on every node
        core.reread(lines, options)
    for _ in range(100):
        net.run(STEP)
        if all(core.ledger.options == options for core in net.cores.values()):
            break
    for name, core in net.cores.items():
        assert core.ledger.options == options and core.ledger.entitlements == lines, name
    log = net.cores[primary].replica.log
    reloads = [e.index for e in log.slice(1, log.last) if e.delta and e.delta["k"] == "reload"]
    assert len(reloads) == 2  # the start's and the reread's, entitlements and options together
    assert all(core.replica.commit > before[name] for name, core in net.cores.items())
