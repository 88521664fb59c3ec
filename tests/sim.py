"""Deterministic simulation: three real node cores, real clients, a hostile network, frail disks.

FoundationDB's way: the real code, not a model of it. Each node is a ``NodeCore``
(``broker/core.py``: the real ledger, replica and front) carried out as the node's shell
carries it out (``sim_node.py``) over a simulated disk that loses unsynced writes on a
crash (``sim_disk.py``). The clients are the library's own ``Link``s (``sim_clients.py``):
they open sessions, check out (some queueing), check in, see leases lapse and retry
across failovers, speaking the real protocol in bytes.

One seed drives everything (``random.Random(seed)``), and each seed draws the fault kinds
it uses (swarm testing; ``faults`` and ``fault_rate`` set a hunt's profile instead): the
network's loss, duplication, delay and reordering (``sim_net.py``); partitions both ways
and one way; crashes and restarts; pauses (SIGSTOP: messages queue up and are handled
after the pause); spurious "connection dropped" notices; disks lost (restart fresh) or
damaged (restart fresh, ``damaged``); crashes cut inside a cycle, between its write and
its sync, so that unsynced writes are lost; all three nodes crashed at once; clients
that die holding seats; junk from peers and clients. Client traffic is lost, delayed
and reordered but never duplicated (``sim_net.py`` says why).

Checked after every step (``Violation`` names the seed and how to replay it):

- at most one primary per term, ever;
- a committed entry (index, term, delta) never changes, on any node, and a node never
  loses one it had committed and synced (its disk still holds it, or a snapshot at or
  past it), and a snapshot holds exactly the replay of the committed log;
- commit indexes only grow while a node is up;
- no well-formed message from a correct peer is refused (``Dropped``); no node starts
  over (its ledger refused a committed delta) or stops;
- nothing leaves a node before the cycle's sync but a primary's appends in a cycle that
  wrote only entries; an answer saying a request took effect (or was refused for good)
  leaves only once the delta recording it has committed;
- on every node's ledger, the seats in use of each pool are at most its count;
- every 50 steps, SPEC's invariants 1-3 (no over-allocation, no lost grant, exactly
  once), judged from the clients' history so far by the chaos checker
  (``clients/testing/chaos/checker.py``: the one that judges ``zbroker chaos`` runs).

Then liveness: all faults heal, and within ``heal_time`` simulated seconds one primary
serves, a new client's checkout is answered, every node holds and has applied the same
log, and the ledgers are the same and are the replay of the committed log. The final
status is recorded, the clients check in what they hold, and the checker judges the
whole history, final status and convergence included.
"""

from __future__ import annotations

import logging
import random
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim_clients import Mix, Send, SimClient, SimHistory
from sim_disk import DiskViolation
from sim_net import Network
from sim_node import STAGES, SimNode

from zbroker.broker.config import Config, NodeConfig
from zbroker.broker.core import PeerLost
from zbroker.broker.image import load_image
from zbroker.broker.ledger import Ledger
from zbroker.broker.model import Entitlement, Now
from zbroker.broker.storage import Loaded
from zbroker.broker.wire import pack, unpack
from zbroker.clients.link import Link
from zbroker.clients.testing.chaos.checker import check
from zbroker.clients.testing.chaos.verdict import CheckOptions, Report
from zbroker.peers.types import Image, Role, RoleChanged

NAMES = ("alpha", "beta", "gamma")
WALL = 1_767_225_600.0 - 1000.0  # wall = WALL + the simulated clock: 2026-01-01 at the start
ENTITLEMENTS = (
    Entitlement("solver", "1.0", 2, None),
    Entitlement("cad", "2.0", 3, None),
    Entitlement("cad", "2.0", 2, None),  # two lines of one pool
    Entitlement("viewer", "1.0", 6, None),
)
FEATURES = {"solver": 2, "cad": 5, "viewer": 6}
MIX = {"solver": (0.35, 1), "cad": (0.45, 3), "viewer": (0.2, 2)}
FAULTS = ("crash", "cut", "pause", "partition", "oneway", "heal", "wipe", "corrupt", "lost",
          "all", "client")  # fmt: skip
RESTART_RATE = 0.01  # per step, of a node that is down: back within two seconds or so
RECORDED = frozenset({"open", "checkout", "checkin", "close"})  # ops answered from a delta
CHECK_EVERY = 50  # steps between two runs of the chaos checker on the history so far
# Only the invariants: the simulation judges liveness itself (its faults are not
# recorded as a chaos run's, and their windows are far longer than SPEC 5.4's second).
CHECK = CheckOptions(liveness_limit=0.0)


class Violation(Exception):
    """An invariant broke; the message says which, when, and how to replay."""


@dataclass
class Stats:
    steps: int = 0
    faults: int = 0
    committed: int = 0
    terms: int = 0
    operations: int = 0
    granted: int = 0
    lost_writes: int = 0
    heal_seconds: float = 0.0


def sim_config(
    *, lease: float, snapshot_every: int, failback: bool, snapshot_keep: int = 10_000
) -> Config:
    """The triad's config: plain mode, endpoints that name the nodes, no files read."""
    nodes = tuple(
        NodeConfig(
            name=name,
            rank=rank,
            client=f"tcp://{name}.sim:7000",
            peer=f"tcp://{name}.sim:7100",
            pub=f"tcp://{name}.sim:7200",
            data=Path(f"/sim/{name}"),
        )
        for rank, name in enumerate(NAMES)
    )
    return Config(
        path=Path("/sim/zbroker.toml"),
        license_path=Path("/sim/license.lic"),
        vendor_key=Path("/sim/vendor.pub"),
        heartbeat_interval=0.1,
        peer_timeout=0.5,
        lease=lease,
        failback=failback,
        fsync=True,
        max_message=65536,
        snapshot_every=snapshot_every,
        snapshot_keep=snapshot_keep,
        nodes=nodes,
        secure=False,
    )


class Simulation:
    def __init__(
        self,
        seed: int,
        steps: int = 300,
        dt: float = 0.02,
        heal_time: float = 10.0,
        verbose: bool = False,
        *,
        scripted: bool = False,
        snapshot_every: int = 10_000,
        faults: tuple[str, ...] | None = None,
        fault_rate: float | None = None,
    ) -> None:
        self.seed = seed
        self.rng = rng = random.Random(seed)
        self.steps = steps
        self.dt = dt
        self.heal_time = heal_time
        self.verbose = verbose
        self.events: list[str] = []
        self.scripted = scripted
        if scripted:  # a test drives it: no draws, no clients, a network that only delays
            self.config = sim_config(lease=30.0, snapshot_every=snapshot_every, failback=True)
            self.net = Network(rng, drop=0.0, dup=0.0, max_delay=dt / 2)
            self.fault_rate = self.hostile_rate = 0.0
            self.fault_kinds = list(FAULTS)
        else:
            self.config = sim_config(
                lease=rng.choice([1.0, 2.0, 5.0]),
                snapshot_every=rng.choice([3, 10, 50, 10_000]),
                failback=rng.random() < 0.8,
                # a small log tail: lagging nodes catch up from snapshots, not the log
                snapshot_keep=rng.choice([0, 5, 10_000]),
            )
            self.net = Network(
                rng,
                drop=rng.choice([0.0, 0.0, 0.01, 0.05, 0.2]),
                dup=rng.choice([0.0, 0.02, 0.1]),
                max_delay=rng.choice([0.002, 0.01, 0.05, 0.2]),
            )
            self.fault_rate = rng.choice([0.0, 0.01, 0.03, 0.08])
            self.hostile_rate = rng.choice([0.0, 0.0, 0.02])
            # Swarm testing (Groce et al., ISSTA 2012): each seed draws some of the fault
            # kinds, so that rare combinations (pauses and one-way partitions alone, say)
            # are not drowned by the others.
            self.fault_kinds = [k for k in FAULTS if rng.random() < 0.5] or list(FAULTS)
            # A profile instead of the draws (a hunt, or a regression found by one): drawn
            # all the same, so that the rest of the seed's draws stay what they were.
            if faults is not None:
                self.fault_kinds = list(faults)
            if fault_rate is not None:
                self.fault_rate = fault_rate
        self.entitlements = ENTITLEMENTS
        # A start-over means a ledger refused a committed delta: never in a correct run
        # (a scripted test may make a ledger refuse one on purpose).
        self.start_over_allowed = scripted
        self.names = NAMES
        self.now = 1000.0 + rng.random()
        self.nodes = {n: SimNode(self, n) for n in NAMES}
        self.rank = {n: i for i, n in enumerate(NAMES)}
        self.by_endpoint = {self.config.node(n).client: n for n in NAMES}
        self.endpoints = tuple(self.config.node(n).client for n in NAMES)
        self.primaries: dict[int, str] = {}
        self.committed: dict[int, tuple[int, Any]] = {}
        self.on_quorum = 0  # every entry committed up to here was on a quorum (check_on_quorum)
        self.decided: set[tuple[str, int]] = set()  # (sid, req) of the committed deltas
        self.requests: dict[tuple[Any, Any], Any] = {}  # (sid, req) -> op, as clients sent
        self.stats = Stats()
        self.history = SimHistory()
        self.history.write(
            "meta", self.now, seed=seed, features=FEATURES, nodes=list(NAMES),
            peer_timeout=self.config.peer_timeout, lease=self.config.lease,
            failback=self.config.failback, options={"simulation": True},
        )  # fmt: skip
        self.history.write("phase", self.now, phase="load")
        self.clients: dict[str, SimClient] = {}
        self.marker: SimClient | None = None  # after the heal: its checkout shows a primary serves
        self.sessions = 0  # client sessions ever started: numbers the next one
        # Raw askers of a scripted test (name -> the replies they got, decoded).
        self.askers: dict[str, list[dict[str, Any]]] = {}
        if scripted:
            return  # the test boots the nodes it wants
        for _ in range(rng.randint(2, 8)):
            self.spawn_client()
        for node in self.nodes.values():
            node.boot()

    def describe(self) -> str:
        """The seed's draw, for a replay's first line."""
        c, n = self.config, self.net
        return (
            f"seed {self.seed}: lease {c.lease}s, snapshot_every {c.snapshot_every}"
            f" (keep {c.snapshot_keep}), failback"
            f" {c.failback}; {len(self.clients)} clients; drop {n.drop} dup {n.dup} delay <="
            f" {n.max_delay}s; fault rate {self.fault_rate} of {', '.join(self.fault_kinds)};"
            f" hostile rate {self.hostile_rate}"
        )

    # --- time, tracing, failing
    def clock(self) -> Now:
        return Now(self.now, WALL + self.now)

    def trace(self, what: str) -> None:
        line = f"{self.now:9.3f} {what}"
        self.events.append(line)
        if self.verbose:
            print(line)

    def violation(self, what: str) -> Violation:
        return Violation(f"seed {self.seed} at t={self.now:.3f}: {what}")

    def status(self) -> str:
        rows = []
        for n in self.nodes.values():
            r = n.replica
            if n.core is None or r is None:
                rows.append(f"{n.name}: down")
                continue
            rows.append(
                f"{n.name}: {r.role.value} term {r.term} voted {r.voted_for} primary {r.primary}"
                f" last {r.last}/{r.log.last_term} commit {r.commit} snap {r.log.snap_index}"
                f" serving {r.is_serving(self.now)} paused {n.paused}"
            )
        return "\n".join(rows)

    # --- clients
    def spawn_client(self) -> SimClient:
        process = self.sessions
        self.sessions += 1
        client = SimClient(
            process, 0, self.endpoints, self._sender(f"c{process}.0"), self.history,
            self.rng, Mix(MIX), self.now,
        )  # fmt: skip
        self.clients[client.name] = client
        return client

    def _sender(self, name: str) -> Send:
        def send(link: Link, node: int, frame: bytes) -> bool:
            target = self.nodes.get(self.by_endpoint.get(link.endpoints[node], ""))
            if target is None or target.core is None:
                return False  # ZMQ_IMMEDIATE: no connection to a node that is down
            self.net.send(self.now, name, target.name, "request", [name.encode(), frame])
            request = unpack(frame)
            self.requests[(request.get("sid"), request.get("req"))] = request.get("op")
            return True

        return send

    def answer(self, node: str, frames: list[bytes]) -> None:
        to = frames[0].decode(errors="replace")
        if to in self.askers:
            if node not in self.net.cut:
                self.askers[to].append(unpack(frames[1]))
        elif to in self.clients:
            self.check_answer(node, unpack(frames[1]))
            self.net.send(self.now, node, to, "reply", frames)

    # --- checks
    def on_role(self, node: SimNode, e: RoleChanged) -> None:
        self.trace(f"{node.name}: {e.role.value} term {e.term} primary {e.primary}")
        if e.role is Role.PRIMARY:
            self.check_primary(node.name, e.term)

    def check_primary(self, name: str, term: int) -> None:
        holder = self.primaries.setdefault(term, name)
        if holder != name:
            raise self.violation(f"two primaries in term {term}: {holder} and {name}")

    def check_committed(self, name: str, index: int, term: int, delta: Any) -> None:
        seen = self.committed.setdefault(index, (term, delta))
        if seen != (term, delta):
            raise self.violation(
                f"{name} committed {index}: {(term, delta)} where {seen} was committed"
            )
        if delta is not None and "req" in delta:
            self.decided.add((delta["sid"], delta["req"]))

    def check_on_quorum(self, name: str, commit: int) -> None:
        """Once the cycle that committed them has sent its answers: no majority of the
        disks that may vote lacks an entry first committed there (synced, or under a
        synced snapshot). A disk lost or damaged may not vote until its node has caught
        up (RECOVERING). What keeps it: a backup acknowledges only what it has synced, and
        the primary's entries leave before its own sync but count only after it."""
        majority = len(self.nodes) // 2 + 1
        for index in range(self.on_quorum + 1, commit + 1):
            seen = self.committed.get(index)
            if seen is None:  # installed from an image, not committed entry by entry
                continue
            term = seen[0]
            lacking = [
                n
                for n, node in self.nodes.items()
                if node.disk.marked and not node.disk.damaged and not node.disk.holds(index, term)
            ]
            if len(lacking) >= majority:
                raise self.violation(
                    f"{name} committed {index} (term {term}), missing from the disks of {lacking}"
                )
        self.on_quorum = max(self.on_quorum, commit)

    def check_answer(self, node: str, reply: dict[str, Any]) -> None:
        """An answer that says a request changed the ledger (or was refused for good)
        leaves only once the delta that records it has committed."""
        key = (reply.get("sid"), reply.get("req"))
        op = self.requests.get(key)
        if op in RECORDED and reply.get("status") in ("ok", "denied") and key not in self.decided:
            raise self.violation(f"{node} answered {op} {key} before its delta committed: {reply}")

    def check_disk(self, node: SimNode, loaded: Loaded) -> None:
        """At a start from a marked directory: it holds what the node committed and synced."""
        snap_index = 0
        if loaded.snapshot is not None:
            self.check_snapshot(node.name, loaded.snapshot)
            snap_index = loaded.snapshot.index
        entries = {i: (t, d) for i, t, d in loaded.entries}
        for i in range(snap_index + 1, node.max_commit + 1):
            if i not in entries:
                raise self.violation(f"{node.name} lost committed entry {i} across a restart")
            self.check_committed(node.name, i, *entries[i])

    def replay(self, upto: int) -> Ledger:
        """A ledger of the committed deltas up to ``upto``, as a backup applies them."""
        lease = self.config.lease
        ledger = Ledger((), lease=lease, heartbeat=lease / 3, limits=self.config.limits)
        for i in range(1, upto + 1):
            if i not in self.committed:
                raise self.violation(f"committed entry {i} unknown to the checker")
            delta = self.committed[i][1]
            if delta is not None:
                ledger.apply(delta)
        return ledger

    def check_snapshot(self, name: str, image: Image) -> None:
        lease = self.config.lease
        held = load_image(image, lease=lease, heartbeat=lease / 3, limits=self.config.limits)
        if held.snapshot() != self.replay(image.index).snapshot():
            raise self.violation(
                f"{name}: the snapshot at {image.index} is not the committed state"
            )

    def check_ledgers(self) -> None:
        """Seats in use of each pool within its count, on every node's ledger."""
        for node in self.nodes.values():
            core = node.core
            if core is None:
                continue
            # The ledger changes only with what it applied: look again only then.
            mark = (id(core.ledger), core.applied.index, core.ledger.next_grant)
            if mark == node.ledger_checked:
                continue
            node.ledger_checked = mark
            for feature in core.ledger.status(None):
                for pool in feature["versions"]:
                    if pool["in_use"] > pool["total"]:
                        raise self.violation(
                            f"{node.name}: {feature['name']} {pool['version']} has "
                            f"{pool['in_use']} seats in use of {pool['total']}"
                        )

    def check_clients(self, *, final: bool = False) -> Report:
        """The chaos checker on the clients' history (so far, unless ``final``)."""
        history = self.history.read(interrupted_at=None if final else self.now)
        report = check(history, CHECK)
        if report.violations:
            found = "\n".join(
                f"  [{v.invariant}] {v.message} {' '.join(v.where)}" for v in report.violations
            )
            raise self.violation(f"the chaos checker found:\n{found}")
        return report

    # --- faults
    def crashed(self, node: SimNode) -> None:
        """``node``'s process died (a fault, or a crash cut into its cycle)."""
        node.crash()
        self.connection_dropped(node.name)

    def connection_dropped(self, victim: str) -> None:
        """A killed process's kernel closes its sockets: most peers see it at once."""
        for node in self.nodes.values():
            if node.name != victim and node.core is not None and self.rng.random() < 0.8:
                node.deliver(PeerLost(victim))
        for client in self.clients.values():
            client.on_disconnected(self.rank[victim], self.now)

    def may_lose_disk(self) -> bool:
        # a second disk loss before the first is repaired can lose committed entries:
        # that is outside the fault model (a majority of disks survives)
        return all(n.core is not None and n.disk.marked for n in self.nodes.values())

    def fault(self) -> None:
        rng, nodes = self.rng, list(self.nodes.values())
        kind = rng.choice(self.fault_kinds)
        victim = rng.choice(nodes)
        self.stats.faults += 1
        self.trace(f"fault {kind} {victim.name} {'(up)' if victim.up else '(down)'}")
        if kind == "crash" and victim.up:
            self.crashed(victim)
        elif kind == "cut" and victim.up:
            # the next cycle that writes stops part way: between its write and its sync, say
            victim.crash_after, victim.crash_on_write = rng.choice(STAGES), True
        elif kind == "all":
            for node in nodes:  # all three at once, each wherever its cycle is
                if node.up:
                    node.crash_after = rng.choice(STAGES)
        elif kind in ("wipe", "corrupt") and victim.up and self.may_lose_disk():
            self.crashed(victim)
            if kind == "wipe":
                victim.disk.wipe()
                self.net.forget(victim.name)  # a dead disk's node sends nothing more
            else:
                victim.disk.corrupt("the log fails its checksum (simulated)")
            self.trace(f"{kind}d {victim.name}")
        elif kind == "lost":
            # a spurious "connection dropped" about a peer that is alive: costs an
            # election at most, and must never cost safety
            observer = rng.choice([n for n in nodes if n is not victim])
            self.trace(f"{observer.name} told {victim.name} dropped (spurious)")
            observer.deliver(PeerLost(victim.name))
        elif kind == "pause" and victim.up:
            victim.paused_until = self.now + rng.uniform(0.2, 2.0)
        elif kind == "partition":
            self.net.isolate(victim.name, [*NAMES, *self.clients])
        elif kind == "oneway":
            other = rng.choice([n for n in NAMES if n != victim.name])
            self.net.blocked.add((victim.name, other))
        elif kind == "client" and self.clients:
            gone = self.clients.pop(rng.choice(sorted(self.clients)))
            self.trace(f"client {gone.name} dies holding {len(gone.held)} grant(s)")
            gone.crash(self.now)
            self.net.forget(gone.name)
            self.spawn_client()
        elif kind == "heal":
            self.net.blocked.clear()
        for node in nodes:
            if not node.up and rng.random() < 0.3:
                node.boot()

    def hostile(self) -> None:
        target, sender = self.rng.sample(NAMES, 2)
        junk: list[Any] = [
            None,
            [],
            {"t": "append"},
            {"t": "hb", "term": -1},
            {"t": "vote_req", "term": True, "candidate": sender},
            {"t": "append", "term": 2**64 - 1, "prev_index": 0, "prev_term": 0, "entries": "x"},
            {"t": "snapshot", "term": 1, "index": 1, "term_at": 1, "data": [1]},
            {"t": "fetch", "term": 1, "from_index": 0},
            {"t": "nope", "term": 1},
        ]
        node = self.nodes[target]
        body = pack(self.rng.choice(junk))
        self.net.send(self.now, sender, target, "peer", [sender.encode(), body], hostile=True)
        node.deliver(node.event_of("peer", [b"mallory", pack({"t": "hb"})]), hostile=True)
        request = self.rng.choice(
            [b"\xc1", pack([]), pack({"v": 1, "op": "checkout", "sid": "x" * 300, "req": 1}),
             pack({"v": 1, "op": "admin", "action": "down", "sid": "m", "req": 1})]
        )  # fmt: skip
        node.deliver(node.event_of("request", [b"mallory", request]), hostile=True)

    # --- driving
    def step(self, faults: bool, load: bool) -> None:
        self.now += self.dt
        for src, dst, kind, frames, hostile in list(self.net.due(self.now)):
            node = self.nodes.get(dst)
            if node is not None:
                node.deliver(node.event_of(kind, frames), hostile)
                continue
            client = self.clients.get(dst)
            if client is not None and src in self.rank:
                client.on_frame(self.rank[src], frames[1], self.now)
        order = list(self.nodes.values())
        self.rng.shuffle(order)
        for node in order:
            node.cycle()
        for name in sorted(self.clients):
            client = self.clients[name]
            client.step(self.now, load or client is self.marker)
        if faults and self.rng.random() < self.fault_rate:
            self.fault()
        if faults and self.rng.random() < self.hostile_rate:
            self.hostile()
        if faults:
            for node in self.nodes.values():
                if not node.up and self.rng.random() < RESTART_RATE:
                    node.boot()
        self.check_ledgers()
        self.stats.steps += 1
        if not self.scripted and self.stats.steps % CHECK_EVERY == 0:
            self.check_clients()

    def heal(self) -> None:
        self.trace("heal")
        self.net.blocked.clear()
        self.net.drop, self.net.dup, self.net.max_delay = 0.0, 0.0, 0.005
        for node in self.nodes.values():
            node.paused_until = float("-inf")
            node.crash_after = None
            if not node.up:
                node.boot()

    def converged(self, marker: SimClient) -> bool:
        """One serving primary, the marker's checkout answered, every node at its last."""
        reps = [n.replica if n.core is not None else None for n in self.nodes.values()]
        serving = [r for r in reps if r is not None and r.is_serving(self.now)]
        if len(serving) != 1 or not marker.answered:
            return False
        p = serving[0]
        applying = any(n.core is not None and n.core.applying for n in self.nodes.values())
        return not applying and all(
            r is not None and r.role is not Role.RECOVERING and r.commit == p.last for r in reps
        )

    def final_view(self) -> dict[str, Any]:
        """Each node's own view, as the chaos runner records it after the faults healed."""
        views: dict[str, Any] = {}
        primary = None
        for node in self.nodes.values():
            core, r = node.core, node.replica
            assert core is not None and r is not None
            if r.is_serving(self.now):
                primary = node.name
            holders, _ = core.ledger.holders(None, 0, 1_000_000)
            features = {
                f["name"]: {"total": f["total"], "in_use": f["in_use"], "holders": []}
                for f in core.ledger.status(None)
            }
            for h in holders:
                features[h["feature"]]["holders"].append(
                    {"grant": h["grant"], "user": h["user"], "count": h["count"]}
                )
            views[node.name] = {"role": r.role.value, "term": r.term, "commit": r.commit,
                                "last": r.last, "features": features}  # fmt: skip
        return {"primary": primary, "nodes": views}

    def run(self) -> Stats:
        quiet = logging.getLogger("zbroker")
        level = quiet.level
        if not self.verbose:
            quiet.setLevel(logging.CRITICAL)  # the nodes' and the library's log lines
        try:
            self._run()
        except (Violation, DiskViolation) as v:
            raise Violation(f"{v}\n{self.status()}") from None
        except Exception as exc:  # the code under test crashed: a failed seed, not a failed run
            where = "".join(traceback.format_exception(exc)[-4:])
            crash = self.violation(f"{type(exc).__name__}: {exc}\n{where}")
            raise Violation(f"{crash}\n{self.status()}") from None
        finally:
            quiet.setLevel(level)
        s = self.stats
        s.committed, s.terms = len(self.committed), len(self.primaries)
        s.lost_writes = sum(n.disk.lost_writes for n in self.nodes.values())
        return s

    def _run(self) -> None:
        for _ in range(self.steps):
            self.step(faults=True, load=True)
        self.heal()
        start = self.now
        marker = self.marker = self.spawn_client()
        marker.mix = Mix({"viewer": (1.0, 1)}, wait_share=0.0, hold_min=1e6, hold_max=1e6,
                         max_held=1)  # fmt: skip
        # The clients finish the operation in hand and hold what they hold (the chaos
        # runner's "hold" phase), so that the final status sees every answered checkout.
        while not self.converged(marker) or any(c.busy for c in self.clients.values()):
            if self.now - start > self.heal_time:
                raise self.violation(f"no convergence {self.heal_time}s after healing")
            self.step(faults=False, load=False)
        self.stats.heal_seconds = self.now - start
        self.check_converged()
        view = self.final_view()
        self.history.write("phase", self.now, phase="hold")
        self.history.write("final", self.now, **view)
        self.history.write("phase", self.now, phase="final")
        for client in self.clients.values():
            client.start_final()
        start = self.now
        while not all(c.final_done for c in self.clients.values()):
            if self.now - start > self.heal_time:
                busy = [c.name for c in self.clients.values() if not c.final_done]
                raise self.violation(f"final check-ins not done in {self.heal_time}s: {busy}")
            self.step(faults=False, load=False)
        self.history.write("phase", self.now, phase="end")
        report = self.check_clients(final=True)
        self.stats.operations = sum(sum(c.values()) for c in report.counts.values())
        self.stats.granted = report.counts["checkout"]["ok"] if "checkout" in report.counts else 0

    def check_converged(self) -> None:
        """The ledgers agree, and are the replay of the committed log."""
        snaps = {}
        for node in self.nodes.values():
            assert node.core is not None and node.replica is not None
            snaps[node.name] = node.core.ledger.snapshot()
        if len({repr(s) for s in snaps.values()}) != 1:
            raise self.violation("the nodes converged to different ledgers")
        commit = next(n.replica.commit for n in self.nodes.values() if n.replica is not None)
        if next(iter(snaps.values())) != self.replay(commit).snapshot():
            raise self.violation("the converged ledger is not the replay of the committed log")


def replay_command(
    seed: int, faults: tuple[str, ...] | None = None, fault_rate: float | None = None
) -> str:
    command = f"python scripts/simulate.py --seed {seed}"
    if faults is not None:
        command += f" --faults {','.join(faults)}"
    if fault_rate is not None:
        command += f" --fault-rate {fault_rate}"
    return command


def run_seed(
    seed: int,
    steps: int = 300,
    faults: tuple[str, ...] | None = None,
    fault_rate: float | None = None,
) -> Stats:
    """Run one seed; raises ``Violation`` (whose text says how to replay) on a broken rule."""
    try:
        return Simulation(seed, steps, faults=faults, fault_rate=fault_rate).run()
    except Violation as v:
        replay = replay_command(seed, faults, fault_rate)
        raise Violation(f"{v}\nreplay with: {replay}") from None


Chunk = tuple[int, int, int, tuple[str, ...] | None, float | None]


def seed_failures(chunk: Chunk) -> list[str]:
    """Run seeds ``start`` to ``stop - 1`` for ``steps`` each; the text of each violation.

    One ``(start, stop, steps, faults, fault_rate)`` argument, so that a process pool can
    map it over chunks (``faults`` and ``fault_rate`` None: each seed draws its own).
    """
    start, stop, steps, faults, fault_rate = chunk
    failures = []
    for seed in range(start, stop):
        try:
            run_seed(seed, steps, faults, fault_rate)
        except Violation as v:
            failures.append(str(v))
    return failures
