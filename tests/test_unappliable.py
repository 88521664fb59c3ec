"""A node whose ledger cannot follow the committed log never takes the triad down.

A cause of issue 11's crash (``LedgerError: grant delta: id 1 is not next_grant 370`` on
all three nodes) was the shell's rule for a deposed primary: it rebuilt its ledger only
when it had applied past the commit index. But the one event that deposes a primary can
also cut its uncommitted proposals and commit the next primary's entries at those
indexes (its first append read after a pause, the ones before it lost): the commit index
is then past what it applied, no rebuild happens, and the ledger keeps deltas that never
committed. The next grant of the other primary fails there, or this node, primary again,
proposes grant ids that nobody else can apply. The rule now also checks that the log
still holds, at ``applied``, the term the ledger applied there. Whatever else makes a
ledger refuse a committed delta, the node starts over as a wiped one (the safety net).

Most tests here run three real node shells (``broker.node.Node``: its loop, ledger, front,
replica and data directory) in this process, over a network and a clock of the test's:
each step runs one cycle of each node's real loop (``Node._serve``) over fake sockets, so
that a test can lose, hold and deliver messages exactly. The last one starts real node
processes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import subprocess
import sys
import time
import types
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

import broker.node
from broker.cli import config_curve
from broker.config import Config, load_config
from broker.demo import write_demo
from broker.ledger import Ledger
from broker.model import Now
from broker.node import Node
from broker.seats import LedgerError
from broker.status import query_nodes
from broker.storage import DAMAGED
from broker.wire import PROTOCOL_VERSION, pack, unpack
from clients import LicenseClient
from clients.testing import LocalTriad, wait_for
from peers import types as rp

# Three node shells on a simulated network and clock; the last test starts processes.
pytestmark = pytest.mark.sim

STEP = 0.01  # simulated seconds per loop cycle
START_OVER = "stops serving and voting"  # the log line of Node._start_over


# --- the harness: real node shells on fake sockets, a fake clock and a test's network


class _Yield(Exception):
    """Ends one cycle of a node's loop: the fake poller raises it at the next poll."""


@dataclass
class _Frame:
    bytes: bytes
    more: bool


class _Pipe:
    """A fake socket: whole messages in (read frame by frame by ``Node._drain``), frames out."""

    def __init__(self) -> None:
        self.inbox: deque[list[bytes]] = deque()
        self._reading: deque[_Frame] = deque()
        self.sent: list[bytes] = []

    def recv(self, flags: int = 0, copy: bool = True) -> _Frame:
        if not self._reading:
            if not self.inbox:
                raise zmq.Again()
            message = self.inbox.popleft()
            last = len(message) - 1
            self._reading.extend(_Frame(f, i < last) for i, f in enumerate(message))
        return self._reading.popleft()

    def send(self, data: bytes, flags: int = 0) -> None:
        self.sent.append(bytes(data))

    def take(self) -> list[bytes]:
        sent, self.sent = self.sent, []
        return sent


class _Poller:
    """Ready once per cycle, then ``_Yield``: one call of ``Node._loop`` runs one cycle."""

    def __init__(self, pipes: list[_Pipe]) -> None:
        self.pipes = pipes
        self.polled = False

    def poll(self, timeout: int) -> list[tuple[_Pipe, int]]:
        if self.polled:
            raise _Yield
        self.polled = True
        return [(p, zmq.POLLIN) for p in self.pipes if p.inbox]


class _Clock:
    """Both of the node's clocks, moved by the test only."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self._wall = time.time() - self.mono  # today: the demo license's dates hold

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self._wall + self.mono


class Shell:
    """One node: a real ``Node`` whose sockets are pipes; ``boot`` is a process start."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.node: Node | None = None
        self.paused = False  # SIGSTOP: runs no cycle; what is sent to it waits
        self.cut = False  # everything it sends is lost

    @property
    def n(self) -> Node:
        if self.node is None:
            raise AssertionError(f"{self.name} is down")
        return self.node

    def boot(self) -> None:
        node = Node(self.cluster.config, self.name)
        node._start()
        self.clients, self.peer_in, self.pub, self.sub = _Pipe(), _Pipe(), _Pipe(), _Pipe()
        self.peers = {other: _Pipe() for other in self.cluster.names if other != self.name}
        self.poller = _Poller([self.clients, self.peer_in, self.sub])
        # what Node.run and Node._open_sockets would have set
        vars(node).update(
            clients=self.clients, peer_in=self.peer_in, pub=self.pub, sub=self.sub,
            peer_sockets=self.peers, monitors={}, poller=self.poller, ignored_signals=[],
        )  # fmt: skip
        self.node = node

    def crash(self) -> None:
        self.n.storage.close()  # what a kill leaves: the lock goes, the files stay
        self.node = None

    def cycle(self) -> None:
        self.poller.polled = False
        with contextlib.suppress(_Yield):
            self.n._serve()

    def role(self) -> rp.Role:
        return self.n.replica.role

    def serving(self) -> bool:
        return self.n.replica.is_serving(self.cluster.clock.mono)


class Cluster:
    """Three shells, stepped in rank order every STEP simulated seconds."""

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> None:
        path = write_demo(directory, secure=False, force=True)
        text = path.read_text()
        for key, value in {"fsync": "false", **settings}.items():
            text = "\n".join(
                f"{key} = {value}" if line.split("=")[0].strip() == key else line
                for line in text.splitlines()
            )
            if f"{key} = {value}" not in text:
                text = f"{key} = {value}\n{text}"
        path.write_text(text)
        self.config: Config = load_config(path)
        self.names = [n.name for n in self.config.nodes]
        self.clock = _Clock()
        monkeypatch.setattr(
            broker.node,
            "time",
            types.SimpleNamespace(monotonic=self.clock.monotonic, time=self.clock.time),
        )
        self.shells = {name: Shell(self, name) for name in self.names}
        self.replies: dict[bytes, list[dict[str, Any]]] = defaultdict(list)
        self._ids = itertools.count(1)

    def __getitem__(self, name: str) -> Shell:
        return self.shells[name]

    def boot(self, *names: str) -> None:
        for name in names or self.names:
            self.shells[name].boot()

    def close(self) -> None:
        for shell in self.shells.values():
            if shell.node is not None:
                shell.crash()

    def now(self) -> Now:
        return Now(self.clock.mono, self.clock.time())

    def step(self) -> None:
        self.clock.mono += STEP
        for shell in self.shells.values():
            if shell.node is not None and not shell.paused:
                shell.cycle()
                self._route(shell)

    def _route(self, shell: Shell) -> None:
        out = [(to, [shell.name.encode(), data]) for to, pipe in shell.peers.items()
               for data in pipe.take()]  # fmt: skip
        for data in shell.pub.take():
            out += [(to, [data]) for to in self.names if to != shell.name]
        for to, message in out:
            target = self.shells[to]
            if target.node is None or shell.cut:
                continue  # a dead peer hears nothing; a cut one is heard by no one
            (target.sub if len(message) == 1 else target.peer_in).inbox.append(message)
        sent = shell.clients.take()
        for identity, data in zip(sent[::2], sent[1::2], strict=True):
            if not shell.cut:
                self.replies[identity].append(unpack(data))

    def run_until(self, condition: Callable[[], bool], within: float, what: str) -> None:
        deadline = self.clock.mono + within
        while not condition():
            if self.clock.mono >= deadline:
                raise AssertionError(f"not within {within} simulated s: {what}\n{self.state()}")
            self.step()

    def state(self) -> str:
        rows = []
        for shell in self.shells.values():
            if shell.node is None:
                rows.append(f"{shell.name}: down")
                continue
            r = shell.node.replica
            rows.append(
                f"{shell.name}: {r.role.value} term {r.term} primary {r.primary} last {r.last}"
                f" commit {r.commit} applied {shell.node.applied} paused {shell.paused}"
            )
        return "\n".join(rows)

    def send(self, name: str, request: dict[str, Any]) -> bytes:
        """Hand ``request`` to node ``name``'s client socket; returns the client's identity."""
        identity = f"client-{next(self._ids)}".encode()
        self.shells[name].clients.inbox.append([identity, pack({"v": PROTOCOL_VERSION, **request})])
        return identity

    def ask(self, name: str, request: dict[str, Any], within: float = 3.0) -> dict[str, Any]:
        identity = self.send(name, request)
        self.run_until(lambda: bool(self.replies[identity]), within, f"an answer to {request}")
        return self.replies[identity][0]

    def settled(self) -> bool:
        """Every node up, none recovering, all holding and having applied the same log."""
        nodes = [s.node for s in self.shells.values()]
        if any(n is None for n in nodes):
            return False
        marks = {
            (n.replica.role is rp.Role.RECOVERING, n.replica.last, n.replica.commit, n.applied)
            for n in nodes
            if n is not None
        }
        return len(marks) == 1 and not next(iter(marks))[0]

    def ledgers(self) -> dict[str, dict[str, Any]]:
        return {name: s.n.ledger.snapshot() for name, s in self.shells.items()}


@pytest.fixture(autouse=True)
def _node_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="zbroker.node")


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    made = Cluster(tmp_path / "triad", monkeypatch)
    yield made
    made.close()


def _open(sid: str) -> dict[str, Any]:
    return {"op": "open", "sid": sid, "req": 1, "user": sid, "host": "h", "display": ":0"}


def _checkout(sid: str, req: int, feature: str = "cad") -> dict[str, Any]:
    return {"op": "checkout", "sid": sid, "req": req, "ack": req, "feature": feature, "count": 1}


def _grant_id(reply: dict[str, Any]) -> int:
    assert reply["status"] == "ok", reply
    gid: int = reply["grant"]["id"]
    return gid


def _refuse_once(ledger: Ledger, kind: str, feature: str) -> list[dict[str, Any]]:
    """Make ``ledger`` refuse the first ``kind`` delta of ``feature`` it is asked to apply,
    as a ledger that has drifted from the log would; returns the deltas it refused."""
    refused: list[dict[str, Any]] = []
    apply = ledger.apply

    def refusing(delta: dict[str, Any]) -> None:
        if not refused and delta.get("k") == kind and delta.get("feature") == feature:
            refused.append(delta)
            raise LedgerError(f"{kind} delta refused by the test")
        apply(delta)

    ledger.apply = refusing  # type: ignore[method-assign]
    return refused


def _start_overs(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "zbroker.node"]
    return [line for line in lines if START_OVER in line and f"node {name} " in line]


# --- the cause


def test_a_deposed_primary_whose_proposals_were_replaced_at_once_rebuilds(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The regression of the next_grant crash, step by step (the seed that found it: 626 of
    tests/sim.py with its shell rule made the node's; see the module docstring)."""
    alpha, beta = cluster["alpha"], cluster["beta"]
    cluster.boot()
    cluster.run_until(alpha.serving, 3, "alpha serving")
    assert cluster.ask("alpha", _open("s1"))["status"] == "ok"
    assert _grant_id(cluster.ask("alpha", _checkout("s1", 2))) == 1

    # alpha decides grant 2 and is cut off and paused before any backup hears of it
    alpha.cut = True
    cluster.send("alpha", _checkout("s1", 3))
    cluster.step()
    proposed = alpha.n.applied
    assert alpha.n.ledger.next_grant == 3 and proposed > alpha.n.replica.commit
    alpha.paused, alpha.cut = True, False

    cluster.run_until(beta.serving, 3, "beta serving in alpha's place")
    assert cluster.ask("beta", _open("s2"))["status"] == "ok"
    assert _grant_id(cluster.ask("beta", _checkout("s2", 2))) == 2  # beta's grant 2
    assert beta.n.replica.commit > proposed  # past what alpha applied as primary

    # alpha resumes; of what beta sent meanwhile, only its last append arrived, one that
    # beta sent once it had committed past what alpha proposed
    inbox = alpha.peer_in.inbox

    def appends() -> list[list[bytes]]:
        return [m for m in inbox if m[0] == b"beta" and unpack(m[1])["t"] == "append"]

    cluster.run_until(
        lambda: unpack(appends()[-1][1])["commit"] > proposed, 1, "beta's probe with its commit"
    )
    last = appends()[-1]
    inbox.clear()
    inbox.append(last)
    alpha.sub.inbox.clear()
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


def _damaged(cluster: Cluster, name: str) -> list[Path]:
    return sorted(cluster.config.node(name).data.glob(f"{DAMAGED}*"))


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
    # At once: gamma holds nothing of its own any more, votes for no one, and says why.
    assert gamma.role() is rp.Role.RECOVERING
    (line,) = _start_overs(caplog, "gamma")
    assert "index " in line and "(term 1)" in line and "grant delta refused by the test" in line
    assert len(_damaged(cluster, "gamma")) == 1
    report = gamma.n.report(cluster.now())["nodes"][0]
    assert "grant delta refused by the test" in report["recovering"]

    # The primary never stopped serving; gamma catches up from it and votes again.
    assert _grant_id(cluster.ask("alpha", _checkout("s1", 3))) == 2
    cluster.run_until(cluster.settled, 5, "gamma caught up")
    assert alpha.serving() and gamma.role() is rp.Role.BACKUP
    assert len({repr(v) for v in cluster.ledgers().values()}) == 1
    assert {(g.id, g.feature) for g in gamma.n.ledger.grants()} == {(1, "viewer"), (2, "cad")}
    assert len(_start_overs(caplog, "gamma")) == 1


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
    cluster.run_until(lambda: gamma.n.applied == beta.n.applied, 2, "gamma applied it")
    beta.crash()

    alpha.boot()
    refused = _refuse_once(alpha.n.ledger, "grant", "viewer")
    cluster.run_until(lambda: bool(refused), 5, "alpha primary, applying what it adopted")
    (line,) = _start_overs(caplog, "alpha")
    assert "grant delta refused by the test" in line
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("now primary") and m.endswith("(primary: alpha)") for m in lines)
    assert alpha.role() is rp.Role.RECOVERING and not gamma.serving()
    # No primary without beta: alpha waits and says why; gamma cannot be elected alone.
    for _ in range(100):
        cluster.step()
        assert not any(s.serving() for s in (alpha, gamma))
    report = alpha.n.report(cluster.now())["nodes"][0]
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
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A wiped gamma catches up from a primary that compacted: the snapshot it installs
    does not load the first time (Ledger.from_snapshot refuses it); gamma starts over."""
    cluster = Cluster(tmp_path / "triad", monkeypatch, snapshot_every=4)
    try:
        alpha, gamma = cluster["alpha"], cluster["gamma"]
        cluster.boot("alpha", "beta")
        cluster.run_until(alpha.serving, 3, "alpha serving, gamma down")
        assert cluster.ask("alpha", _open("s1"))["status"] == "ok"
        for req in range(2, 8):
            _grant_id(cluster.ask("alpha", _checkout("s1", req)))
        cluster.run_until(lambda: alpha.n.replica.log.snap_index > 0, 2, "alpha compacted")
        for name in ("alpha", "beta"):  # restarted, a log holds nothing before its snapshot
            cluster[name].crash()
            cluster[name].boot()
        cluster.run_until(alpha.serving, 3, "alpha serving again")

        loads = {"n": 0}
        from_snapshot = Ledger.from_snapshot

        def refusing(cls: type[Ledger], snap: dict[str, Any], **kw: Any) -> Ledger:
            loads["n"] += 1
            if loads["n"] == 1:
                raise LedgerError("snapshot refused by the test")
            return from_snapshot(snap, **kw)

        monkeypatch.setattr(Ledger, "from_snapshot", classmethod(refusing))
        gamma.boot()  # a new member: its directory holds no snapshot to load
        cluster.run_until(lambda: loads["n"] >= 1, 3, "gamma installing alpha's snapshot")
        (line,) = _start_overs(caplog, "gamma")
        assert "snapshot: snapshot refused by the test" in line
        cluster.run_until(cluster.settled, 5, "gamma caught up")
        assert len({repr(v) for v in cluster.ledgers().values()}) == 1
        assert len(gamma.n.ledger.grants()) == 6
    finally:
        cluster.close()


# --- the same in real processes

# ``zbroker run`` whose ledger refuses the first grant of viewer it applies, once.
_REFUSING_NODE = """
import sys
from broker.cli import main
from broker.ledger import Ledger
from broker.seats import LedgerError

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
