"""Deterministic simulation: three replicas, a fake clock, a hostile network, honest disks.

One seed drives everything (``random.Random(seed)``): the network's loss, duplication,
delay and reordering, partitions (both ways and one way), crashes and restarts, pauses
(SIGSTOP: messages queue up and are handled after the pause), and crashes that lose
the data directory (restart ``fresh``). A toy application runs on top: the serving
primary proposes ``{"op": "inc", "key": k, "id": n}`` deltas, each id once.

Each ``SimNode`` plays the shell: it executes effects exactly as ``broker/node.py``
must (all persistence effects of a cycle before its sends; ``Committed`` applies on a
backup; the primary applies at propose time and rebuilds from committed state when it
stops being primary; ``InstallSnapshot`` replaces the application state). Its ``Disk``
holds exactly what the persistence effects wrote, nothing more: a restart builds the
replica from it, so a missing persist shows up as a lost committed entry.

Checked after every step (``Violation`` names the seed):

- at most one primary per term, ever;
- a committed entry (index, term, delta) never changes, on any node, and a node never
  loses one it had committed (its disk still holds it, or a snapshot covering it);
- commit indexes only grow while a node is up;
- applied state equals the replay of the committed log (every 25 steps and at the end)
  and no delta id is ever applied twice on a node;
- no well-formed message from a correct peer is ever refused (``Dropped``).

Then liveness: all faults heal, and within ``heal_time`` simulated seconds a primary
serves, a fresh delta commits everywhere, and all three nodes hold the same state.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from peers.replica import Replica
from peers.types import (
    Committed,
    Dropped,
    Durable,
    Effect,
    Entry,
    InstallSnapshot,
    PersistEntries,
    PersistHardState,
    PersistSnapshot,
    Publish,
    Role,
    RoleChanged,
    Send,
    Timing,
    TruncateLog,
)

NAMES = ("alpha", "beta", "gamma")
PERSIST = (PersistEntries, TruncateLog, PersistHardState, PersistSnapshot)


class Violation(Exception):
    """An invariant broke; the message says which, when, and how to replay."""


# --- the toy application ------------------------------------------------------------


@dataclass
class App:
    counts: dict[str, int] = field(default_factory=dict)
    ids: set[int] = field(default_factory=set)

    def apply(self, delta: dict[str, Any] | None) -> None:
        if delta is None:
            return
        if delta["id"] in self.ids:
            raise Violation(f"delta {delta['id']} applied twice")
        self.ids.add(delta["id"])
        self.counts[delta["key"]] = self.counts.get(delta["key"], 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "ids": sorted(self.ids)}

    @classmethod
    def from_snapshot(cls, snap: dict[str, Any] | None) -> App:
        if snap is None:
            return cls()
        return cls(dict(snap["counts"]), set(snap["ids"]))


# --- the disk -----------------------------------------------------------------------


@dataclass
class Disk:
    term: int = 0
    voted_for: str | None = None
    snapshot_index: int = 0
    snapshot_term: int = 0
    snapshot: dict[str, Any] | None = None
    entries: dict[int, Entry] = field(default_factory=dict)
    initialised: bool = True  # the marker file: absent means the next start is fresh

    @property
    def last(self) -> int:
        return (
            max(self.entries, default=self.snapshot_index) if self.entries else self.snapshot_index
        )

    def write(self, effect: Effect) -> None:
        if isinstance(effect, PersistEntries):
            for e in effect.entries:
                if e.index != max(self.last, self.snapshot_index) + 1:
                    raise Violation(f"persisted entry {e.index} after disk last {self.last}")
                self.entries[e.index] = e
        elif isinstance(effect, TruncateLog):
            for i in [i for i in self.entries if i >= effect.from_index]:
                del self.entries[i]
        elif isinstance(effect, PersistHardState):
            if effect.term < self.term:
                raise Violation(f"hard state term went back {self.term} -> {effect.term}")
            self.term, self.voted_for = effect.term, effect.voted_for
        elif isinstance(effect, PersistSnapshot):
            self.snapshot_index, self.snapshot_term = effect.index, effect.term
            self.snapshot = effect.snapshot
            for i in [i for i in self.entries if i <= effect.index]:
                del self.entries[i]

    def durable(self) -> Durable:
        entries = [self.entries[i] for i in sorted(self.entries) if i > self.snapshot_index]
        return Durable(
            term=self.term,
            voted_for=self.voted_for,
            snapshot_index=self.snapshot_index,
            snapshot_term=self.snapshot_term,
            snapshot=self.snapshot,
            entries=entries,
            commit=self.snapshot_index,
            fresh=not self.initialised,
        )


# --- the network --------------------------------------------------------------------


@dataclass
class Network:
    rng: random.Random
    drop: float
    dup: float
    max_delay: float
    queue: list[tuple[float, int, str, str, dict[str, Any], bool]] = field(default_factory=list)
    blocked: set[tuple[str, str]] = field(default_factory=set)
    seq: int = 0

    def send(
        self, now: float, src: str, dst: str, msg: dict[str, Any], hostile: bool = False
    ) -> None:
        if self.rng.random() < self.drop:
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            self.seq += 1
            at = now + self.rng.uniform(0.0002, self.max_delay)
            heapq.heappush(self.queue, (at, self.seq, src, dst, msg, hostile))

    def due(self, now: float) -> Iterable[tuple[float, str, str, dict[str, Any], bool]]:
        while self.queue and self.queue[0][0] <= now:
            at, _, src, dst, msg, hostile = heapq.heappop(self.queue)
            if (src, dst) not in self.blocked:
                yield at, src, dst, msg, hostile

    def forget_from(self, src: str) -> None:
        self.queue = [q for q in self.queue if q[2] != src]
        heapq.heapify(self.queue)


# --- a node, as the shell runs it ---------------------------------------------------


class SimNode:
    def __init__(self, sim: Simulation, name: str) -> None:
        self.sim = sim
        self.name = name
        self.disk = Disk()
        self.replica: Replica | None = None
        self.app = App()
        self.applied = 0
        self.paused_until = float("-inf")
        self.deferred: list[tuple[str, dict[str, Any], bool]] = []
        self.max_commit = 0  # highest commit this node ever reached: its disk must keep it

    @property
    def up(self) -> bool:
        return self.replica is not None

    def boot(self, now: float) -> None:
        durable = self.disk.durable()
        self.replica = Replica(self.name, NAMES, self.sim.timing, durable, now)
        self.app = App.from_snapshot(durable.snapshot)
        self.applied = durable.snapshot_index
        self.sim.check_snapshot(self, durable.snapshot_index, durable.snapshot)
        # the disk must still hold every entry this node ever saw committed
        for i in range(durable.snapshot_index + 1, self.max_commit + 1):
            e = self.disk.entries.get(i)
            if e is None:
                raise Violation(f"{self.name} lost committed entry {i} across a restart")
            self.sim.check_committed(self.name, e)

    def crash(self, *, wipe: bool) -> None:
        self.replica = None
        self.deferred = []
        self.paused_until = float("-inf")
        self.was_primary = False
        if wipe:
            self.disk = Disk(initialised=False)
            self.max_commit = 0
            self.app = App()
            self.applied = 0

    def run(self, effects: list[Effect], now: float) -> None:
        """Execute effects as the shell does: persistence first (group commit), then the rest."""
        for e in effects:
            if isinstance(e, PERSIST):
                self.disk.write(e)
        for e in effects:
            if isinstance(e, Send):
                self.sim.net.send(now, self.name, e.to, e.msg)
            elif isinstance(e, Publish):
                for peer in NAMES:
                    if peer != self.name:
                        self.sim.net.send(now, self.name, peer, e.msg)
            elif isinstance(e, Committed):
                self.on_committed(e)
            elif isinstance(e, InstallSnapshot):
                self.sim.check_snapshot(self, e.index, e.snapshot)
                self.app = App.from_snapshot(e.snapshot)
                self.applied = e.index
                self.max_commit = max(self.max_commit, e.index)
            elif isinstance(e, RoleChanged):
                self.on_role(e)
            elif isinstance(e, Dropped) and not self.sim.hostile_in_flight:
                raise Violation(f"{self.name} refused a correct peer's message: {e}")

    def on_committed(self, e: Committed) -> None:
        if e.entries and e.entries[0].index > self.applied + 1:
            raise Violation(f"{self.name}: commit gap, applied {self.applied}, got {e.entries[0]}")
        for entry in e.entries:
            self.sim.check_committed(self.name, entry)
            if entry.index > self.applied:
                self.app.apply(entry.delta)
                self.applied = entry.index
        self.max_commit = max(self.max_commit, e.upto)

    def on_role(self, e: RoleChanged) -> None:
        sim = self.sim
        sim.trace(f"{self.name}: {e.role.value} term {e.term} primary {e.primary}")
        if e.role is Role.PRIMARY:
            holder = sim.primaries.setdefault(e.term, self.name)
            if holder != self.name:
                raise Violation(f"two primaries in term {e.term}: {holder} and {self.name}")
        if e.role is not Role.RECOVERING:
            self.disk.initialised = True  # the shell writes its marker
        if self.was_primary and e.role is not Role.PRIMARY and self.replica is not None:
            # the shell's rule: a deposed primary rebuilds its ledger from committed state
            r = self.replica
            self.app = App.from_snapshot(r.log.snapshot)
            for entry in r.entries(r.log.snap_index + 1, r.commit):
                self.app.apply(entry.delta)
            self.applied = r.commit
        self.was_primary = e.role is Role.PRIMARY

    was_primary = False

    def deliver(self, src: str, msg: dict[str, Any], now: float, hostile: bool) -> None:
        if self.replica is None:
            return
        if now < self.paused_until:
            self.deferred.append((src, msg, hostile))
            return
        self.sim.hostile_in_flight = hostile
        self.run(self.replica.on_message(src, msg, now), now)
        self.sim.hostile_in_flight = False

    def tick(self, now: float) -> None:
        if self.replica is None or now < self.paused_until:
            return
        backlog, self.deferred = self.deferred, []
        for src, msg, hostile in backlog:
            self.deliver(src, msg, now, hostile)
        self.run(self.replica.on_tick(now), now)

    def propose(self, deltas: list[dict[str, Any]], now: float) -> None:
        r = self.replica
        if r is None or now < self.paused_until or not r.is_serving(now):
            return
        if self.applied != r.last:
            raise Violation(f"{self.name} serves with applied {self.applied} != last {r.last}")
        _, effects = r.propose(deltas, now)
        self.sim.stats.proposed += len(deltas)
        for d in deltas:
            self.app.apply(d)
        self.applied = r.last
        self.run(effects, now)


# --- the simulation -----------------------------------------------------------------


@dataclass
class Stats:
    steps: int = 0
    proposed: int = 0
    committed: int = 0
    faults: int = 0
    terms: int = 0
    heal_seconds: float = 0.0


class Simulation:
    def __init__(
        self,
        seed: int,
        steps: int = 300,
        dt: float = 0.02,
        heal_time: float = 10.0,
        verbose: bool = False,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        rng = self.rng
        self.steps = steps
        self.dt = dt
        self.heal_time = heal_time
        self.timing = Timing(
            heartbeat_interval=0.1,
            peer_timeout=0.5,
            failback=rng.random() < 0.8,
            max_batch=rng.choice([1, 3, 256]),
            keep_tail=rng.choice([0, 4, 50]),
        )
        self.net = Network(
            rng,
            drop=rng.choice([0.0, 0.0, 0.01, 0.05, 0.2]),
            dup=rng.choice([0.0, 0.02, 0.1]),
            max_delay=rng.choice([0.002, 0.01, 0.05, 0.2]),
        )
        self.fault_rate = rng.choice([0.0, 0.01, 0.03, 0.08])
        self.propose_rate = rng.choice([0.05, 0.15, 0.4])
        self.hostile_rate = rng.choice([0.0, 0.0, 0.02])
        self.now = 1000.0 + rng.random()
        self.nodes = {n: SimNode(self, n) for n in NAMES}
        self.primaries: dict[int, str] = {}
        self.committed: dict[int, tuple[int, Any]] = {}
        self.committed_ids: set[int] = set()
        self.next_id = 0
        self.hostile_in_flight = False
        self.stats = Stats()
        self.verbose = verbose
        self.events: list[str] = []
        for node in self.nodes.values():
            node.boot(self.now + rng.uniform(0, 0.3))

    def trace(self, what: str) -> None:
        line = f"{self.now:9.3f} {what}"
        self.events.append(line)
        if self.verbose:
            print(line)

    def status(self) -> str:
        rows = []
        for n in self.nodes.values():
            r = n.replica
            if r is None:
                rows.append(f"{n.name}: down")
                continue
            rows.append(
                f"{n.name}: {r.role.value} term {r.term} voted {r.voted_for} primary {r.primary}"
                f" last {r.last}/{r.log.last_term} commit {r.commit} applied {n.applied}"
                f" serving {r.is_serving(self.now)} paused {self.now < n.paused_until}"
            )
        return "\n".join(rows)

    # --- checks -----------------------------------------------------------------------

    def fail(self, what: str) -> Violation:
        return Violation(f"seed {self.seed} at t={self.now:.3f}: {what}")

    def check_committed(self, name: str, e: Entry) -> None:
        if e.delta is not None:
            self.committed_ids.add(e.delta["id"])
        seen = self.committed.setdefault(e.index, (e.term, e.delta))
        if seen != (e.term, e.delta):
            raise Violation(f"{name} committed {e} where {seen} was committed")

    def replay(self, upto: int) -> App:
        app = App()
        for i in range(1, upto + 1):
            if i not in self.committed:
                raise Violation(f"committed entry {i} unknown to the checker")
            app.apply(self.committed[i][1])
        return app

    def check_snapshot(self, node: SimNode, index: int, snap: dict[str, Any] | None) -> None:
        if index == 0:
            return
        if snap is None or App.from_snapshot(snap) != self.replay(index):
            raise Violation(f"{node.name}: snapshot at {index} is not the committed state")

    def check_applied(self) -> None:
        for node in self.nodes.values():
            r = node.replica
            if r is None:
                continue
            if r.role is Role.PRIMARY:
                expect = self.replay(r.commit)
                for e in r.entries(r.commit + 1, node.applied):
                    expect.apply(e.delta)
            else:
                expect = self.replay(node.applied)
            if node.app != expect:
                raise Violation(f"{node.name}: applied state differs from the committed log")

    # --- driving ----------------------------------------------------------------------

    def fault(self) -> None:
        rng, nodes = self.rng, list(self.nodes.values())
        kind = rng.choice(
            ["crash", "crash", "pause", "partition", "oneway", "heal", "wipe", "lost"]
        )
        victim = rng.choice(nodes)
        self.stats.faults += 1
        self.trace(f"fault {kind} {victim.name} {'(up)' if victim.up else '(down)'}")
        if kind == "crash" and victim.up:
            victim.crash(wipe=False)
            self.connection_dropped(victim.name)
        elif kind == "wipe" and victim.up and self.may_wipe():
            self.trace(f"wiped {victim.name}")
            victim.crash(wipe=True)
            self.net.forget_from(victim.name)  # a dead disk's node sends nothing more
            self.connection_dropped(victim.name)
        elif kind == "lost":
            # a spurious "connection dropped" about a peer that is alive: costs an
            # election at most, and must never cost safety
            observer = rng.choice([n for n in nodes if n is not victim])
            if observer.replica is not None and self.now >= observer.paused_until:
                self.trace(f"{observer.name} told {victim.name} dropped (spurious)")
                observer.run(observer.replica.on_peer_lost(victim.name, self.now), self.now)
        elif kind == "pause" and victim.up:
            victim.paused_until = self.now + rng.uniform(0.2, 2.0)
        elif kind == "partition":
            for other in NAMES:
                if other != victim.name:
                    self.net.blocked |= {(victim.name, other), (other, victim.name)}
        elif kind == "oneway":
            other = rng.choice([n for n in NAMES if n != victim.name])
            self.net.blocked.add((victim.name, other))
        else:
            self.net.blocked.clear()
        for node in nodes:
            if not node.up and rng.random() < 0.3:
                self.trace(f"restart {node.name} fresh={not node.disk.initialised}")
                node.boot(self.now)

    def connection_dropped(self, victim: str) -> None:
        """A killed process's kernel closes its sockets: most peers see it at once."""
        for node in self.nodes.values():
            if node.name == victim or node.replica is None or self.now < node.paused_until:
                continue
            if self.rng.random() < 0.8:
                node.run(node.replica.on_peer_lost(victim, self.now), self.now)

    def may_wipe(self) -> bool:
        # a second disk loss before the first is repaired can lose committed entries:
        # that is outside the fault model (a majority of disks survives)
        return all(n.up and n.disk.initialised for n in self.nodes.values())

    def hostile(self) -> None:
        target, sender = self.rng.sample(NAMES, 2)
        junk: list[Any] = [
            None,
            [],
            {"t": "append"},
            {"t": "hb", "term": -1},
            {"t": "vote_req", "term": True, "candidate": sender},
            {"t": "append", "term": 10**30, "prev_index": 0, "prev_term": 0, "entries": "x"},
            {"t": "snapshot", "term": 1, "index": 1, "term_at": 1, "data": [1]},
            {"t": "fetch", "term": 1, "from_index": 0},
            {"t": "nope", "term": 1},
        ]
        self.net.send(self.now, sender, target, self.rng.choice(junk), hostile=True)
        # and one from a stranger
        node = self.nodes[target]
        if node.replica is not None and self.now >= node.paused_until:
            self.hostile_in_flight = True
            node.run(node.replica.on_message("mallory", {"t": "hb"}, self.now), self.now)
            self.hostile_in_flight = False

    def step(self, faults: bool) -> None:
        self.now += self.dt
        for _, src, dst, msg, hostile in list(self.net.due(self.now)):
            self.nodes[dst].deliver(src, msg, self.now, hostile)
        order = list(self.nodes.values())
        self.rng.shuffle(order)
        for node in order:
            node.tick(self.now)
        for node in order:
            if self.rng.random() < self.propose_rate:
                deltas = []
                for _ in range(self.rng.randint(1, 3)):
                    self.next_id += 1
                    deltas.append({"op": "inc", "key": self.rng.choice("abc"), "id": self.next_id})
                node.propose(deltas, self.now)
        if faults and self.rng.random() < self.fault_rate:
            self.fault()
        if faults and self.rng.random() < self.hostile_rate:
            self.hostile()
        if self.rng.random() < 0.05:
            self.compact(self.rng.choice(order))
        self.stats.steps += 1

    def compact(self, node: SimNode) -> None:
        r = node.replica
        if r is None or r.role is Role.PRIMARY or node.applied != r.commit:
            return
        if r.commit <= r.log.snap_index:
            return
        term = r.log.term_at(r.commit)
        if term is None:
            return
        snap = node.app.snapshot()
        r.compacted(r.commit, term, snap)
        # the shell's storage writes the snapshot and drops the log it covers
        node.disk.write(PersistSnapshot(r.commit, term, snap))

    def heal(self) -> None:
        self.trace("heal")
        self.net.blocked.clear()
        self.net.drop, self.net.dup, self.net.max_delay = 0.0, 0.0, 0.005
        for node in self.nodes.values():
            node.paused_until = float("-inf")
            if not node.up:
                node.boot(self.now)

    def converged(self, marker: int) -> bool:
        """One serving primary, a marker committed since the heal, every node at its last."""
        reps = [n.replica for n in self.nodes.values()]
        serving = [r for r in reps if r is not None and r.is_serving(self.now)]
        if len(serving) != 1 or marker not in self.committed_ids:
            return False
        p = serving[0]
        return all(
            r is not None and r.role is not Role.RECOVERING and r.commit == p.last for r in reps
        )

    def propose_marker(self, marker: int, term: int) -> int:
        """Propose ``marker`` at the serving primary if not yet proposed in its term."""
        for node in self.nodes.values():
            r = node.replica
            if r is not None and r.is_serving(self.now) and r.term > term:
                node.propose([{"op": "inc", "key": "z", "id": marker}], self.now)
                return r.term
        return term

    def run(self) -> Stats:
        try:
            for i in range(self.steps):
                self.step(faults=True)
                if i % 25 == 0:
                    self.check_applied()
            self.heal()
            self.propose_rate = 0.0
            start, marker, marker_term = self.now, 0, 0
            while not self.converged(marker):
                if self.now - start > self.heal_time:
                    raise Violation(
                        f"no convergence {self.heal_time}s after healing\n{self.status()}"
                    )
                self.step(faults=False)
                term = self.propose_marker(marker - 1, marker_term)
                if term != marker_term:
                    # a new primary since the last marker: that one may never commit
                    marker, marker_term = marker - 1, term
            self.stats.heal_seconds = self.now - start
            self.check_applied()
            apps = {n.name: n.app for n in self.nodes.values()}
            if len({repr(sorted(a.counts.items())) for a in apps.values()}) != 1:
                raise Violation("nodes converged to different states")
        except Violation as v:
            raise self.fail(str(v)) from None
        self.stats.committed = len(self.committed)
        self.stats.terms = len(self.primaries)
        return self.stats


def run_seed(seed: int, steps: int = 300) -> Stats:
    """Run one seed; raises ``Violation`` (whose text says how to replay) on a broken rule."""
    try:
        return Simulation(seed, steps).run()
    except Violation as v:
        raise Violation(f"{v}\nreplay with: python scripts/simulate.py --seed {seed}") from None


def seed_failures(chunk: tuple[int, int, int]) -> list[str]:
    """Run seeds ``start`` to ``stop - 1`` for ``steps`` each; the text of each violation.

    One ``(start, stop, steps)`` argument, so that a process pool can map it over chunks.
    """
    start, stop, steps = chunk
    failures = []
    for seed in range(start, stop):
        try:
            run_seed(seed, steps)
        except Violation as v:
            failures.append(str(v))
    return failures
