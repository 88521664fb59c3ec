"""A node whose ledger cannot follow the committed log never takes the triad down.

A cause of issue 11's crash (``LedgerError: grant delta: id 1 is not next_grant 370`` on
all three nodes) was the shell's rule for a deposed primary: it rebuilt its ledger only
when it had applied past the commit index. But the one event that deposes a primary can
also cut its uncommitted proposals and commit the next primary's entries at those
indexes (its first append read after a pause, the ones before it lost): the commit index
is then past what it applied, no rebuild happens, and the ledger keeps deltas that never
committed. The next grant of the other primary fails there, or this node, primary again,
proposes grant ids that nobody else can apply. The rule now also checks that the log
still holds, at ``applied``, the term the ledger applied there (``AppliedLedger.follows``
in broker/apply.py, used by ``NodeCore._on_role_changed``). Whatever else makes a ledger
refuse a committed delta, the node starts over as a wiped one (the safety net).

Most tests here run three real node cores (``zbroker.broker.core.NodeCore``: ledger, front,
replica) in the simulation of tests/sim.py, scripted: its network only delays (one step
at most), nothing fails unless the test says so, and each step runs one cycle of each
node as its shell would; so a test can lose, hold and deliver messages exactly, and the
simulation's invariants are checked at every step as well. The last one starts real
node processes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sim import Simulation
from sim_node import SimNode

from zbroker import LicenseClient
from zbroker.broker import apply
from zbroker.broker.cli import config_curve
from zbroker.broker.core import PeerHeartbeat, PeerMessage
from zbroker.broker.image import STEP_ITEMS, ImageLoader
from zbroker.broker.ledger import Ledger
from zbroker.broker.seats import LedgerError
from zbroker.broker.status import query_nodes
from zbroker.broker.storage import DAMAGED
from zbroker.broker.wire import PROTOCOL_VERSION, pack, unpack
from zbroker.clients.testing import LocalTriad, wait_for
from zbroker.peers import types as rp

# Three node cores on a simulated network and clock; the last test starts processes.
pytestmark = pytest.mark.sim

STEP = 0.01  # simulated seconds per step: one cycle of each node
START_OVER = "stops serving and voting"  # the log line of NodeCore.restart


# --- the harness: real node cores in the scripted simulation


class Shell:
    """One node of the cluster, as the tests below handle it."""

    def __init__(self, cluster: Cluster, node: SimNode) -> None:
        self.cluster = cluster
        self.node = node
        self.name = node.name

    @property
    def n(self) -> Any:
        """The node's core (``NodeCore``): its ledger, replica, ``applied`` (``AppliedLedger``)."""
        if self.node.core is None:
            raise AssertionError(f"{self.name} is down")
        return self.node.core

    @property
    def paused(self) -> bool:
        """SIGSTOP: runs no cycle; what is sent to it waits."""
        return self.node.paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self.node.paused_until = float("inf") if value else float("-inf")

    @property
    def cut(self) -> bool:
        """Everything it sends is lost."""
        return self.name in self.cluster.sim.net.cut

    @cut.setter
    def cut(self, value: bool) -> None:
        (self.cluster.sim.net.cut.add if value else self.cluster.sim.net.cut.discard)(self.name)

    def boot(self) -> None:
        self.node.boot()

    def crash(self) -> None:
        self.node.crash()  # what a kill leaves: the synced files

    def role(self) -> rp.Role:
        role: rp.Role = self.n.replica.role
        return role

    def serving(self) -> bool:
        return bool(self.n.replica.is_serving(self.cluster.sim.now))

    def peer_messages(self) -> list[tuple[str, dict[str, Any]]]:
        """The peer messages waiting for its next cycle: (sender, message)."""
        return [
            (e.frames[0].decode(), unpack(e.frames[1]))
            for e, _ in self.node.inbox
            if isinstance(e, PeerMessage)
        ]

    def keep_only(self, keep: Callable[[Any], bool]) -> None:
        """Drop the waiting messages ``keep`` refuses (it is given each event)."""
        self.node.inbox = [(e, h) for e, h in self.node.inbox if keep(e)]

    def set_asides(self) -> list[str]:
        """Why its data was set aside, each time (a directory ``damaged-*`` each)."""
        return self.node.disk.set_aside_why


class Cluster:
    """Three node cores in the scripted simulation, stepped every STEP simulated seconds."""

    def __init__(self, **settings: Any) -> None:
        self.sim = Simulation(0, dt=STEP, scripted=True, **settings)
        self.names = list(self.sim.names)
        self.shells = {name: Shell(self, node) for name, node in self.sim.nodes.items()}
        self._ids = 0

    def __getitem__(self, name: str) -> Shell:
        return self.shells[name]

    def boot(self, *names: str) -> None:
        for name in names or self.names:
            self.shells[name].boot()

    def step(self) -> None:
        self.sim.step(faults=False, load=False)

    def run_until(self, condition: Callable[[], bool], within: float, what: str) -> None:
        deadline = self.sim.now + within
        while not condition():
            if self.sim.now >= deadline:
                raise AssertionError(f"not within {within} simulated s: {what}\n{self.state()}")
            self.step()

    def state(self) -> str:
        return self.sim.status()

    def send(self, name: str, request: dict[str, Any]) -> str:
        """Hand ``request`` to node ``name``'s client socket; returns the asker's name."""
        self._ids += 1
        asker = f"client-{self._ids}"
        self.sim.askers[asker] = []
        node = self.sim.nodes[name]
        frame = pack({"v": PROTOCOL_VERSION, **request})
        node.deliver(node.event_of("request", [asker.encode(), frame]))
        return asker

    def ask(self, name: str, request: dict[str, Any], within: float = 3.0) -> dict[str, Any]:
        asker = self.send(name, request)
        replies = self.sim.askers[asker]
        self.run_until(lambda: bool(replies), within, f"an answer to {request}")
        return replies[0]

    def settled(self) -> bool:
        """Every node up, none recovering, all holding and having applied the same log."""
        cores = [s.node.core for s in self.shells.values()]
        if any(c is None for c in cores):
            return False
        marks = {
            (
                c.replica.role is rp.Role.RECOVERING,
                c.replica.last,
                c.replica.commit,
                c.applied.index,
            )
            for c in cores
            if c is not None
        }
        return len(marks) == 1 and not next(iter(marks))[0]

    def ledgers(self) -> dict[str, dict[str, Any]]:
        return {name: s.n.ledger.snapshot() for name, s in self.shells.items()}


@pytest.fixture(autouse=True)
def _node_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="zbroker.node")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    yield Cluster()


def _open(sid: str) -> dict[str, Any]:
    return {"op": "open", "sid": sid, "req": 1, "user": sid, "host": "h", "display": ":0"}


def _checkout(sid: str, req: int, feature: str = "cad") -> dict[str, Any]:
    return {"op": "checkout", "sid": sid, "req": req, "ack": req, "feature": feature, "count": 1}


def _grant_id(reply: dict[str, Any]) -> int:
    assert reply["status"] == "ok", reply
    gid: int = reply["grant"]["id"]
    return gid


class _RefusingLedger(Ledger):
    """A node's ledger that, once armed (``_refuse_once``), refuses the first delta of one
    kind and feature it is asked to apply, as a ledger that has drifted from the log
    would. A subclass, built by the node itself (the ``refusable`` fixture): the compiled
    build's Ledger refuses a method replaced on one instance."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refuse: tuple[str, str] | None = None  # (kind, feature)
        self.refused: list[dict[str, Any]] = []

    def apply(self, delta: object) -> None:
        if (
            self.refuse is not None
            and not self.refused
            and isinstance(delta, dict)
            and (delta.get("k"), delta.get("feature")) == self.refuse
        ):
            self.refused.append(delta)
            raise LedgerError(f"{self.refuse[0]} delta refused by the test")
        super().apply(delta)


@pytest.fixture
def refusable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ledger a node builds from nothing (its start on an empty directory, a start
    over) is a ``_RefusingLedger``, which refuses nothing until ``_refuse_once`` arms it."""
    monkeypatch.setattr(apply, "Ledger", _RefusingLedger)


def _refuse_once(ledger: Ledger, kind: str, feature: str) -> list[dict[str, Any]]:
    """Make ``ledger`` (a node's, under the ``refusable`` fixture) refuse the first
    ``kind`` delta of ``feature`` it is asked to apply; returns the deltas it refused."""
    assert isinstance(ledger, _RefusingLedger), "use the refusable fixture"
    ledger.refuse = (kind, feature)
    return ledger.refused


def _start_overs(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "zbroker.node"]
    return [line for line in lines if START_OVER in line and f"node {name} " in line]


# --- the cause


def test_a_deposed_primary_whose_proposals_were_replaced_at_once_rebuilds(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The regression of the next_grant crash, step by step (the seed that found it: 626 of
    the old tests/sim.py with its shell rule made the node's; see the module docstring; the
    simulation of the real cores finds it as seed 617 of tests/test_simulation.py)."""
    alpha, beta = cluster["alpha"], cluster["beta"]
    cluster.boot()
    cluster.run_until(alpha.serving, 3, "alpha serving")
    assert cluster.ask("alpha", _open("s1"))["status"] == "ok"
    assert _grant_id(cluster.ask("alpha", _checkout("s1", 2))) == 1

    # alpha decides grant 2 and is cut off and paused before any backup hears of it
    alpha.cut = True
    cluster.send("alpha", _checkout("s1", 3))
    cluster.step()
    proposed = alpha.n.applied.index
    assert alpha.n.ledger.next_grant == 3 and proposed > alpha.n.replica.commit
    alpha.paused, alpha.cut = True, False

    cluster.run_until(beta.serving, 3, "beta serving in alpha's place")
    assert cluster.ask("beta", _open("s2"))["status"] == "ok"
    assert _grant_id(cluster.ask("beta", _checkout("s2", 2))) == 2  # beta's grant 2
    assert beta.n.replica.commit > proposed  # past what alpha applied as primary

    # alpha resumes; of what beta sent meanwhile, only its last append arrived, one that
    # beta sent once it had committed past what alpha proposed
    def appends() -> list[dict[str, Any]]:
        return [m for sender, m in alpha.peer_messages() if sender == "beta" and m["t"] == "append"]

    cluster.run_until(lambda: appends()[-1]["commit"] > proposed, 1, "beta's probe with its commit")
    last = appends()[-1]
    alpha.keep_only(
        lambda e: (
            (isinstance(e, PeerMessage) and e.frames[0] == b"beta" and unpack(e.frames[1]) == last)
            or not isinstance(e, PeerMessage | PeerHeartbeat)
        )
    )
    del alpha.node.inbox[:-1]  # that append once, not a duplicate of it
    alpha.paused = False

    cluster.run_until(cluster.settled, 5, "alpha caught up")
    assert _start_overs(caplog, "alpha") == []
    ledgers = cluster.ledgers()
    assert ledgers["alpha"] == ledgers["beta"] == ledgers["gamma"]
    assert {(g.id, g.sid) for g in alpha.n.ledger.grants()} == {(1, "s1"), (2, "s2")}
    # and alpha follows on: the next grant of its primary applies, as it would as primary
    cluster.run_until(lambda: any(s.serving() for s in cluster.shells.values()), 3, "serving")
    primary = next(s.name for s in cluster.shells.values() if s.serving())
    assert _grant_id(cluster.ask(primary, _checkout("s2", 3))) == 3
    cluster.run_until(cluster.settled, 3, "all applied grant 3")
    assert _start_overs(caplog, "alpha") == []
    assert len({repr(v) for v in cluster.ledgers().values()}) == 1


# --- the safety net: a committed delta or snapshot that the ledger refuses


@pytest.mark.usefixtures("refusable")
def test_a_backup_whose_ledger_refuses_a_committed_delta_starts_over_as_a_wiped_node(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    alpha, gamma = cluster["alpha"], cluster["gamma"]
    cluster.boot()
    cluster.run_until(alpha.serving, 3, "alpha serving")
    assert cluster.ask("alpha", _open("s1"))["status"] == "ok"
    refused = _refuse_once(gamma.n.ledger, "grant", "viewer")

    assert _grant_id(cluster.ask("alpha", _checkout("s1", 2, "viewer"))) == 1
    cluster.run_until(lambda: bool(refused), 2, "gamma asked to apply the grant")
    cluster.step()  # the cycle after: the core asks its shell to start it over
    # At once: gamma holds nothing of its own any more, votes for no one, and says why.
    assert gamma.role() is rp.Role.RECOVERING
    (line,) = _start_overs(caplog, "gamma")
    assert "index " in line and "(term 1)" in line and "grant delta refused by the test" in line
    assert len(gamma.set_asides()) == 1
    report = gamma.n.report(cluster.sim.clock())["nodes"][0]
    assert "grant delta refused by the test" in report["recovering"]

    # The primary never stopped serving; gamma catches up from it and votes again.
    assert _grant_id(cluster.ask("alpha", _checkout("s1", 3))) == 2
    cluster.run_until(cluster.settled, 5, "gamma caught up")
    assert alpha.serving() and gamma.role() is rp.Role.BACKUP
    assert len({repr(v) for v in cluster.ledgers().values()}) == 1
    assert {(g.id, g.feature) for g in gamma.n.ledger.grants()} == {(1, "viewer"), (2, "cad")}
    assert len(_start_overs(caplog, "gamma")) == 1


@pytest.mark.usefixtures("refusable")
def test_a_primary_whose_ledger_refuses_an_adopted_delta_steps_down_and_waits_for_a_quorum(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """alpha wins an election, adopts gamma's log, and its ledger refuses a grant from the
    previous term: alpha steps down at once; with beta down nobody can be primary, and
    alpha says why it waits; once beta is back, alpha catches up and nothing is lost."""
    alpha, beta, gamma = cluster["alpha"], cluster["beta"], cluster["gamma"]
    cluster.boot("beta", "gamma")
    cluster.run_until(beta.serving, 3, "beta serving, alpha down")
    assert cluster.ask("beta", _open("s1"))["status"] == "ok"
    assert _grant_id(cluster.ask("beta", _checkout("s1", 2, "viewer"))) == 1
    cluster.run_until(lambda: gamma.n.applied.index == beta.n.applied.index, 2, "gamma applied it")
    beta.crash()

    alpha.boot()
    refused = _refuse_once(alpha.n.ledger, "grant", "viewer")
    cluster.run_until(lambda: bool(refused), 5, "alpha primary, applying what it adopted")
    cluster.step()  # the cycle after: the core asks its shell to start it over
    (line,) = _start_overs(caplog, "alpha")
    assert "grant delta refused by the test" in line
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("now primary") and m.endswith("(primary: alpha)") for m in lines)
    assert alpha.role() is rp.Role.RECOVERING and not gamma.serving()
    # No primary without beta: alpha waits and says why; gamma cannot be elected alone.
    for _ in range(100):
        cluster.step()
        assert not any(s.serving() for s in (alpha, gamma))
    report = alpha.n.report(cluster.sim.clock())["nodes"][0]
    assert "waiting for a primary to catch up from" in report["recovering"]

    beta.boot()
    cluster.run_until(cluster.settled, 8, "a primary again, alpha caught up")
    primary = next(s for s in cluster.shells.values() if s.serving())
    assert _grant_id(cluster.ask(primary.name, _checkout("s1", 3))) == 2
    cluster.run_until(cluster.settled, 3, "all applied grant 2")
    assert len({repr(v) for v in cluster.ledgers().values()}) == 1
    assert {g.id for g in alpha.n.ledger.grants()} == {1, 2}
    assert len(_start_overs(caplog, "alpha")) == 1


def test_a_node_whose_ledger_refuses_an_installed_snapshot_starts_over(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A wiped gamma catches up from a primary that compacted: the snapshot it installs
    does not load the first time (its loader refuses it); gamma starts over."""
    cluster = Cluster(snapshot_every=4)
    alpha, gamma = cluster["alpha"], cluster["gamma"]
    cluster.boot("alpha", "beta")
    cluster.run_until(alpha.serving, 3, "alpha serving, gamma down")
    assert cluster.ask("alpha", _open("s1"))["status"] == "ok"
    for req in range(2, 8):  # the simulation's license has 5 seats of cad, 6 of viewer
        _grant_id(cluster.ask("alpha", _checkout("s1", req, ("cad", "viewer")[req % 2])))
    cluster.run_until(lambda: alpha.n.replica.log.snap_index > 0, 2, "alpha compacted")
    for name in ("alpha", "beta"):  # restarted, a log holds nothing before its snapshot
        cluster[name].crash()
        cluster[name].boot()
    cluster.run_until(alpha.serving, 3, "alpha serving again")

    loads = {"n": 0}

    class Refusing(ImageLoader):
        """The node's loader (broker/apply.py's): its first install is refused."""

        def step(self, budget: int = STEP_ITEMS) -> Ledger | None:
            loads["n"] += 1
            if loads["n"] == 1:
                raise LedgerError("snapshot refused by the test")
            return super().step(budget)

    monkeypatch.setattr(apply, "ImageLoader", Refusing)
    gamma.boot()  # a new member: its directory holds no snapshot to load
    cluster.run_until(lambda: loads["n"] >= 1, 3, "gamma installing alpha's snapshot")
    cluster.step()  # the cycle after: the core asks its shell to start it over
    (line,) = _start_overs(caplog, "gamma")
    assert "snapshot: snapshot refused by the test" in line
    cluster.run_until(cluster.settled, 5, "gamma caught up")
    assert len({repr(v) for v in cluster.ledgers().values()}) == 1
    assert len(gamma.n.ledger.grants()) == 6


# --- the same in real processes

# ``zbroker run`` whose ledger refuses the first grant of viewer it applies, once.
_REFUSING_NODE = """
import sys
from zbroker.broker.cli import main
from zbroker.broker.ledger import Ledger
from zbroker.broker.seats import LedgerError

apply, refused = Ledger.apply, []

def refusing(self, delta):
    if not refused and delta.get("k") == "grant" and delta.get("feature") == "viewer":
        refused.append(delta)
        raise LedgerError("grant delta refused by the test")
    apply(self, delta)

Ledger.apply = refusing
sys.exit(main())
"""


@pytest.mark.integration
def test_a_node_process_that_refuses_a_committed_delta_recovers_while_the_triad_serves(
    tmp_path: Path,
) -> None:
    triad = LocalTriad(tmp_path / "triad", lease=5.0)
    failed = True
    try:
        triad.start("alpha", "beta")
        with open(triad.logs / "gamma.log", "ab") as out:
            triad.procs["gamma"] = subprocess.Popen(
                [sys.executable, "-c", _REFUSING_NODE, "run", "--config",
                 str(triad.config_path), "--node", "gamma"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        gamma = [("gamma", triad.config.node("gamma").client)]
        curve = config_curve(triad.config, admin=False)

        def gamma_says() -> dict[str, Any]:
            report = query_nodes(gamma, timeout=0.5, curve=curve)
            return {"node": report["nodes"][0], "features": report["features"]}

        def gamma_backup() -> bool:
            return bool(gamma_says()["node"]["role"] == "backup")

        wait_for(gamma_backup, 10, "gamma a backup")
        with LicenseClient(triad.license, user="holder") as client:
            client.checkout("viewer")
            log = triad.logs / "gamma.log"
            wait_for(lambda: START_OVER in log.read_text(), 10, "gamma starting over")
            client.checkout("cad")  # the triad serves on
            wait_for(gamma_backup, 10, "gamma caught up")
            wait_for(
                lambda: (
                    {f["name"]: f["in_use"] for f in gamma_says()["features"]}
                    == {"cad": 1, "solver": 0, "viewer": 1}
                ),
                10,
                "gamma's ledger holding both grants",
            )
            assert triad.alive("gamma") and triad.primary() in ("alpha", "beta")
            assert sorted(triad.holders("viewer")) == [("holder", 1)]
        text = log.read_text()
        assert text.count(START_OVER) == 1 and "grant delta refused by the test" in text
        assert len(list(triad.config.node("gamma").data.glob(f"{DAMAGED}*"))) == 1
        failed = False
    finally:
        triad.stop()
        if failed:
            print(triad.log_text())
