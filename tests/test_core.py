"""The node core, one cycle at a time: events in, one ``Ready`` out, a fake clock.

Three cores talk through a hand-carried network here (what each Ready sends is delivered
as the next events of its addressee); nothing is written anywhere: a ``Ready``'s persist
ops are only looked at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from zbroker.broker.config import Config, NodeConfig
from zbroker.broker.core import (
    SNAPSHOT_RETRY,
    Append,
    ClientMessage,
    NodeCore,
    PeerHeartbeat,
    PeerMessage,
    Ready,
    SaveHardState,
    SnapshotTaken,
)
from zbroker.broker.ledger import Ledger
from zbroker.broker.model import Entitlement, Now
from zbroker.broker.storage import Loaded
from zbroker.broker.wire import PROTOCOL_VERSION, pack, unpack
from zbroker.peers import types as rp

pytestmark = pytest.mark.unit

NAMES = ("n1", "n2", "n3")
CAD = (Entitlement("cad", "2.0", 2, None),)
WALL = 1_780_000_000.0  # a wall-clock reading inside the license's life
STEP = 0.01


class Origin:
    """A connection's metadata as ZeroMQ gives it (``zmq.Frame.get``)."""

    def __init__(self, **meta: str) -> None:
        self.meta = meta

    def get(self, key: str) -> Any:
        return self.meta.get(key)


LOOPBACK = Origin(**{"Peer-Address": "127.0.0.1"})


def config(names: tuple[str, ...] = NAMES, snapshot_every: int = 10_000) -> Config:
    nodes = tuple(
        NodeConfig(
            name,
            rank,
            client=f"tcp://127.0.0.1:{7000 + rank}",
            peer=f"tcp://127.0.0.1:{7100 + rank}",
            pub=f"tcp://127.0.0.1:{7200 + rank}",
            data=Path(f"/nonexistent/{name}"),  # the core never reads it
        )
        for rank, name in enumerate(names)
    )
    return Config(
        path=Path("zbroker.toml"),
        license_path=Path("license.lic"),
        vendor_key=Path("vendor.pub"),
        heartbeat_interval=0.1,
        peer_timeout=0.5,
        lease=30.0,
        failback=True,
        fsync=False,
        max_message=64 * 1024,
        snapshot_every=snapshot_every,
        nodes=nodes,
        secure=False,
    )


def request(identity: bytes, **fields: Any) -> ClientMessage:
    return ClientMessage([identity, pack({"v": PROTOCOL_VERSION, **fields})], LOOPBACK)


def replies(ready: Ready) -> list[tuple[bytes, dict[str, Any]]]:
    return [(frames[0], unpack(frames[-1])) for frames in ready.answers]


@dataclass
class Net:
    """Cores and the messages on their way to each, delivered at the next step."""

    cores: dict[str, NodeCore]
    mono: float = 100.0
    cut: set[str] = field(default_factory=set)  # nodes whose messages are lost both ways
    inbox: dict[str, list[PeerMessage | PeerHeartbeat]] = field(default_factory=dict)
    last: dict[str, Ready] = field(default_factory=dict)

    @property
    def now(self) -> Now:
        return Now(self.mono, WALL + self.mono)

    def post(self, sender: str, ready: Ready) -> None:
        for to, msg in ready.early + ready.peer:
            for name in [n for n in self.cores if n != sender] if to is None else [to]:
                if sender in self.cut or name in self.cut:
                    continue
                if to is None:
                    event: PeerMessage | PeerHeartbeat = PeerHeartbeat([pack(msg)])
                else:
                    event = PeerMessage([sender.encode(), pack(msg)], Origin())
                self.inbox.setdefault(name, []).append(event)

    def cycle(self, name: str, *client: ClientMessage) -> Ready:
        """One poll cycle of node ``name``: its peer messages, then ``client``'s."""
        core = self.cores[name]
        now = self.now
        for event in self.inbox.pop(name, []):
            core.step(event, now)
        for message in client:
            core.step(message, now)
        ready = core.ready(now)
        self.post(name, ready)
        core.advance()
        self.last[name] = ready
        return ready

    def run(self, seconds: float) -> None:
        end = self.mono + seconds
        while self.mono < end:
            self.mono += STEP
            for name in self.cores:
                self.cycle(name)

    def serving(self) -> str:
        """Run until one core is a serving primary; its name."""
        for _ in range(500):
            self.run(STEP)
            for name, core in self.cores.items():
                if name not in self.cut and core.replica.is_serving(self.mono):
                    return name
        raise AssertionError("no primary within 5 s")


def triad(**kw: Any) -> Net:
    cfg = config(**kw)
    now = Now(100.0, WALL + 100.0)
    return Net({n: NodeCore(cfg, n, CAD, Loaded(fresh=False), now, mode="plain") for n in NAMES})


def opened(net: Net, primary: str, sid: str = "s1") -> None:
    """A session ``sid`` open at ``primary``, its answer received."""
    open_ = request(b"c-" + sid.encode(), op="open", sid=sid, req=1, user="ann", host="ws1")
    net.cycle(primary, open_)
    for _ in range(100):
        net.run(STEP)
        if any(r.get("sid") == sid for _, r in replies(net.last[primary])):
            return
    raise AssertionError("the open was never answered")


def test_a_single_server_appends_the_grant_and_answers_after_its_sync() -> None:
    core = NodeCore(config(NAMES[:1]), "n1", CAD, Loaded(fresh=True), Now(1.0, WALL), mode="plain")
    first = core.ready(Now(1.0, WALL))
    assert first.mark_recovered  # a fresh single server has no one to catch up from
    mono = 1.0
    for _ in range(20):  # the reload of the license's entitlements commits first
        mono += STEP
        core.ready(Now(mono, WALL))
    core.step(request(b"c", op="open", sid="s", req=1, user="ann", host="ws1"), Now(mono, WALL))
    core.ready(Now(mono, WALL))
    mono += STEP
    checkout = request(b"c", op="checkout", sid="s", req=2, ack=2, feature="cad")
    core.step(checkout, Now(mono, WALL))
    ready = core.ready(Now(mono, WALL))
    (append,) = [op for op in ready.persist if isinstance(op, Append)]
    assert [delta["k"] for _, _, delta in append.entries] == ["grant"]
    # Alone, it commits at once: the answer is in this Ready, which the shell carries out
    # after the sync of the append above (persist, sync, then answers).
    ((identity, reply),) = replies(ready)
    assert identity == b"c" and reply["status"] == "ok" and reply["grant"]["id"] == 1
    assert core.tallies["checkout", "cad"] == 1 and len(ready.latencies) == 1


def test_the_report_names_each_features_vendor_and_the_vendor_is_no_reason_to_reload() -> None:
    lines = (Entitlement("cad", "2.0", 2, None, vendor="acme"),)
    cfg = config(NAMES[:1])
    core = NodeCore(cfg, "n1", lines, Loaded(fresh=True), Now(1.0, WALL), mode="plain")
    reloads = 0
    mono = 1.0
    for _ in range(40):  # the reload of the license's entitlements commits once
        mono += STEP
        for op in core.ready(Now(mono, WALL)).persist:
            if isinstance(op, Append):
                reloads += sum(delta["k"] == "reload" for _, _, delta in op.entries)
    # the replicated entitlements carry no vendor, and still equal the license file's
    assert reloads == 1 and core.ledger.entitlements == lines
    (cad,) = core.report(Now(mono, WALL))["features"]
    assert cad["name"] == "cad" and cad["vendor"] == "acme" and "queue" not in cad


def test_a_primary_answers_a_checkout_only_once_a_backup_acknowledged_it() -> None:
    net = triad()
    primary = net.serving()
    opened(net, primary)
    checkout = request(b"c-s1", op="checkout", sid="s1", req=2, ack=2, feature="cad")
    ready = net.cycle(primary, checkout)
    assert [type(op) for op in ready.persist] == [Append]
    assert not replies(ready), "answered before any backup held the grant"
    # The appends leave before the primary's own sync (they vouch for nothing on its disk).
    assert ready.early and not ready.peer
    assert all(to is not None and msg["t"] == "append" for to, msg in ready.early)
    for backup in (n for n in NAMES if n != primary):
        net.cycle(backup)  # it persists the grant and acknowledges
    net.mono += STEP
    ready = net.cycle(primary)
    ((identity, reply),) = replies(ready)
    assert identity == b"c-s1" and reply["status"] == "ok" and reply["grant"]["count"] == 1
    assert net.cores[primary].tallies["checkout", "cad"] == 1
    assert ready.latencies == [pytest.approx(STEP)]


def test_a_backup_redirects_clients_to_the_primary() -> None:
    net = triad()
    primary = net.serving()
    backup = next(n for n in NAMES if n != primary)
    ask = request(b"c", op="open", sid="s", req=1, user="ann", host="ws1")
    ((_, reply),) = replies(net.cycle(backup, ask))
    endpoint = net.cores[backup].endpoints[primary]
    assert reply == {"v": PROTOCOL_VERSION, "sid": "s", "req": 1, "status": "redirect",
                     "primary": endpoint}  # fmt: skip


def test_a_status_request_is_answered_with_the_report_at_the_cycles_end() -> None:
    net = triad()
    primary = net.serving()
    ready = net.cycle(primary, request(b"who", op="status", sid="", req=7))
    ((identity, reply),) = replies(ready)
    assert identity == b"who" and reply["status"] == "ok" and reply["req"] == 7
    report = reply["report"]
    assert report["node"] == primary and report["mode"] == "plain"
    assert report["nodes"][0]["role"] == "primary" and report["nodes"][0]["serving"]
    assert [f["name"] for f in report["features"]] == ["cad"]


def test_an_admin_down_from_the_host_stops_the_node_after_its_reply() -> None:
    net = triad()
    primary = net.serving()
    remote = ClientMessage(
        [b"far", pack({"v": PROTOCOL_VERSION, "op": "admin", "action": "down", "req": 1})],
        Origin(**{"Peer-Address": "192.0.2.7"}),
    )
    ready = net.cycle(primary, remote)
    assert not ready.stop and replies(ready)[0][1]["code"] == "not_allowed"
    near = request(b"near", op="admin", action="down", req=2)
    ready = net.cycle(primary, near)
    assert ready.stop and replies(ready)[0][1]["stopping"] is True


def test_a_deposed_primary_rebuilds_its_ledger_and_redirects_its_waiting_client() -> None:
    net = triad()
    old = net.serving()
    opened(net, old)
    core = net.cores[old]
    checkout = request(b"c-s1", op="checkout", sid="s1", req=2, ack=2, feature="cad")
    net.cut.add(old)  # its appends are lost: the grant never commits
    net.cycle(old, checkout)
    assert core.ledger.next_grant == 2  # applied at once, as a primary does
    rest = Net({n: c for n, c in net.cores.items() if n != old}, mono=net.mono)
    new = rest.serving()
    net.mono = rest.mono
    net.cut.clear()
    answered: list[dict[str, Any]] = []
    for _ in range(200):
        net.run(STEP)
        answered += [r for _, r in replies(net.last[old])]
        if core.replica.role is rp.Role.BACKUP and core.replica.primary == new:
            break
    assert core.replica.role is rp.Role.BACKUP
    assert core.ledger.next_grant == 1 and not core.ledger.grants()  # rebuilt: no grant
    assert {"status": "redirect", "outcome": "unknown"}.items() <= answered[-1].items()
    assert answered[-1]["sid"] == "s1" and answered[-1]["req"] == 2


def test_a_backup_whose_ledger_refuses_a_committed_delta_starts_over() -> None:
    net = triad()
    primary = net.serving()
    backup = next(n for n in NAMES if n != primary)
    core = net.cores[backup]
    # Its ledger loses the session (as damage would): the next committed grant cannot fit.
    opened(net, primary)
    net.run(0.1)
    core.applied.ledger = Ledger(core.ledger.entitlements, lease=30.0, heartbeat=10.0)
    checkout = request(b"c-s1", op="checkout", sid="s1", req=2, ack=2, feature="cad")
    net.cycle(primary, checkout)
    ready = net.cycle(backup)  # appends and acknowledges; applies after the sends
    assert ready.start_over is None
    for _ in range(50):
        net.run(STEP)
        if net.last[backup].start_over is not None:
            break
    ready = net.last[backup]
    assert ready.start_over is not None and "cannot follow the committed log" in ready.start_over
    assert not ready.persist and not ready.early and not ready.peer  # nothing vouched for
    why = "data directory damaged: test; its files were moved aside"
    core.restart(Loaded(fresh=True, damaged=True, why=why), net.now)
    assert core.replica.role is rp.Role.RECOVERING
    assert core.report(net.now)["nodes"][0]["recovering"].startswith(why)
    for _ in range(300):  # it catches up as a wiped node does, and votes again
        net.run(STEP)
        if core.replica.role is rp.Role.BACKUP:
            break
    assert net.last[backup].mark_recovered  # caught up: the marker, after that sync
    assert core.ledger.sessions() == ["s1"] and core.ledger.next_grant == 2


def test_sends_wait_for_the_sync_in_a_cycle_that_wrote_more_than_entries() -> None:
    net = triad()
    seen_vote = seen_append = False
    for _ in range(300):  # an election, then the primary's no-op and the license's reload
        net.mono += STEP
        for name in NAMES:
            ready = net.cycle(name)
            if any(isinstance(op, SaveHardState) for op in ready.persist):
                # A term or a vote on disk must be durable before any message leaves.
                assert not ready.early
                seen_vote = seen_vote or bool(ready.peer)
            elif ready.persist and all(isinstance(op, Append) for op in ready.persist):
                if net.cores[name].replica.role is rp.Role.PRIMARY:
                    assert not ready.peer  # entries only, on a primary: all go early
                    seen_append = seen_append or bool(ready.early)
                else:
                    assert not ready.early  # a backup's ack vouches for its disk
    assert seen_vote and seen_append


def test_a_single_server_whose_log_its_ledger_refuses_starts_over_at_once() -> None:
    bad = {"k": "release", "sid": "nobody", "req": 1, "ack": 0, "grant": 1}
    loaded = Loaded(fresh=False, term=1, entries=[(1, 1, bad)])
    core = NodeCore(config(NAMES[:1]), "n1", CAD, loaded, Now(1.0, WALL), mode="plain")
    ready = core.ready(Now(1.0, WALL))
    assert ready.start_over is not None and "session nobody is not open" in ready.start_over
    assert not ready.persist and not ready.early and not ready.peer
    core.restart(Loaded(fresh=True, damaged=True, why="set aside"), Now(2.0, WALL))
    assert core.ready(Now(2.0, WALL)).mark_recovered  # alone: nothing to catch up from


def test_a_snapshot_that_failed_is_asked_for_again_after_a_pause_not_each_cycle() -> None:
    # A taker that cannot start (no descriptor left) or a disk that is full fails again at
    # once: asked each cycle, the node would log and spawn a hundred times a second.
    cfg = config(NAMES[:1], snapshot_every=2)
    core = NodeCore(cfg, "n1", CAD, Loaded(fresh=True), Now(1.0, WALL), mode="plain")
    mono = 1.0
    asked: list[float] = []

    def cycle(*events: SnapshotTaken | ClientMessage) -> None:
        nonlocal mono
        mono += STEP
        for event in events:
            core.step(event, Now(mono, WALL))
        if core.ready(Now(mono, WALL)).take_snapshot is not None:
            asked.append(mono)
        core.advance()

    for _ in range(20):  # the license's reload commits
        cycle()
    cycle(request(b"c", op="open", sid="s", req=1, user="ann", host="ws1"))
    cycle(request(b"c", op="checkout", sid="s", req=2, ack=1, feature="cad"))
    assert len(asked) == 1, asked
    cycle(SnapshotTaken(None))
    while mono < asked[0] + SNAPSHOT_RETRY - 2 * STEP:
        cycle()
    assert len(asked) == 1, "asked again before the pause was over"
    for _ in range(5):
        cycle()
    assert len(asked) == 2 and asked[1] >= asked[0] + SNAPSHOT_RETRY, asked
