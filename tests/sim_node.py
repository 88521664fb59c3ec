"""One simulated node: a real ``NodeCore`` carried out as ``broker/node.py`` carries it out.

Each cycle hands the core the events that arrived since the last (``step``), asks for
its ``Ready`` and carries it out in the contract's order (broker/core.py): persist to
the simulated disk, the early sends, the sync (then the caught-up marker), the peer
sends and the client answers, ``advance()``. A crash may cut a cycle after any of those
stages (``crash_after``): what was sent has left, what was written but not synced is
lost in any suffix. A start is a new ``NodeCore`` built from what the disk loads.

The node also watches its replica for the simulation's checks: every effect the replica
hands the core passes through ``_watch``, set as the core's ``watch`` (a primary per
term, what commits, the snapshots installed, messages a correct peer sent that were
refused), and after each cycle the commit index, which only grows while the node is up.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sim_disk import SimDisk

from zbroker.broker.apply import LedgerSettings
from zbroker.broker.core import (
    Append,
    ClientMessage,
    Event,
    NodeCore,
    PeerHeartbeat,
    PeerMessage,
    Ready,
    SnapshotTaken,
)
from zbroker.broker.image import image_of
from zbroker.broker.model import Now
from zbroker.broker.taker import NotYet, ShadowLedger
from zbroker.broker.wire import pack
from zbroker.peers.replica import Replica
from zbroker.peers.types import Committed, Dropped, Effect, InstallSnapshot, Role, RoleChanged

if TYPE_CHECKING:
    from sim import Simulation

# Where a crash may cut a cycle: after these stages of carrying out its Ready.
STAGES = ("written", "early", "synced", "sent")
SIM_CHUNK = 300  # bytes of a snapshot per peer message
NEVER = float("-inf")


class Origin:
    """What ZeroMQ would say of a connection: plain mode, from no loopback address."""

    def __init__(self, user: str) -> None:
        self.user = user

    def get(self, key: str) -> Any:
        return self.user if key == "User-Id" else "192.0.2.1"


PLAIN = Origin("")


class SimNode:
    def __init__(self, sim: Simulation, name: str) -> None:
        self.sim = sim
        self.name = name
        self.disk = SimDisk.initialised()
        self.core: NodeCore | None = None
        self.replica: Replica | None = None  # the core's, as last tapped
        self.inbox: list[tuple[Event, bool]] = []  # (event, hostile), handled next cycle
        self.paused_until = NEVER
        self.crash_after: str | None = None  # cut the next cycle after this stage
        self.crash_on_write = False  # ... the next cycle that writes something, that is
        self.commit = 0  # the replica's commit index as last seen (only grows while up)
        self.max_commit = 0  # the highest commit synced to this disk: it must keep it
        self.hostile = False  # the event being handled is one of the simulation's junk
        self.starts_over: list[str] = []  # why, each time the core asked to start over
        self.ledger_checked: tuple[int, int, int] | None = None  # see Simulation.check_ledgers
        # A snapshot the taker is writing: (the cycle it is done at, its SnapshotTaken),
        # made at once from the synced disk, as the taker reads it; handed back later.
        self.taking: tuple[int, Event] | None = None
        self.shadow = ShadowLedger(LedgerSettings.of(sim.config))  # the taker's ledger
        self.cycles = 0

    @property
    def up(self) -> bool:
        return self.core is not None

    @property
    def paused(self) -> bool:
        return self.sim.now < self.paused_until

    def now(self) -> Now:
        return self.sim.clock()

    # --- life cycle
    def boot(self) -> None:
        loaded = self.disk.load()
        self.sim.trace(f"start {self.name}: {loaded.why or 'its data'}")
        if loaded.fresh:
            self.max_commit = 0
        else:
            self.sim.check_disk(self, loaded)
        self.core = NodeCore(
            self.sim.config,
            self.name,
            self.sim.entitlements,
            loaded,
            self.now(),
            mode=self.sim.config.mode,
        )
        self._tap()
        self.commit = self.replica.commit if self.replica is not None else 0

    def crash(self) -> None:
        """The process dies: its unsynced writes may be lost, its queued input is."""
        self.core = self.replica = None
        self.inbox = []
        self.taking = None  # the child dies with its node
        self.paused_until = NEVER
        self.crash_after, self.crash_on_write = None, False
        lost = self.disk.crash(self.sim.rng)
        if lost:
            self.sim.trace(f"{self.name} lost {lost} unsynced write(s)")

    def _tap(self) -> None:
        """Watch every effect the core's replica returns (see the module docstring)."""
        core = self.core
        assert core is not None
        core.watch = self._watch
        replica: Replica = core.replica
        if replica is self.replica:
            return
        self.replica = replica
        # Chunks of a few hundred bytes: the simulation's small images travel in several.
        replica.timing = replace(replica.timing, snapshot_chunk=SIM_CHUNK)

    def _watch(self, effects: list[Effect]) -> None:
        sim = self.sim
        for effect in effects:
            match effect:
                case RoleChanged():
                    sim.on_role(self, effect)
                case Committed():
                    for entry in effect.entries:
                        sim.check_committed(self.name, entry.index, entry.term, entry.delta)
                case InstallSnapshot(image=image):
                    sim.check_snapshot(self.name, image)
                case Dropped() if not self.hostile:
                    raise sim.violation(f"{self.name} refused a correct peer's message: {effect}")
                case _:
                    pass

    # --- input
    def deliver(self, event: Event, hostile: bool = False) -> None:
        if self.core is not None:
            self.inbox.append((event, hostile))

    # --- one cycle
    def cycle(self) -> None:
        core = self.core
        if core is None or self.paused:
            return
        now = self.now()
        self.cycles += 1
        if self.taking is not None and self.taking[0] <= self.cycles:
            self.inbox.append((self.taking[1], False))
            self.taking = None
        events, self.inbox = self.inbox, []
        for event, hostile in events:
            self.hostile = hostile
            core.step(event, now)
            self.hostile = False
        ready = core.ready(now)
        self._carry_out(core, ready, now)

    def _carry_out(self, core: NodeCore, ready: Ready, now: Now) -> None:
        sim, cut = self.sim, self.crash_after
        if cut is not None and self.crash_on_write and not ready.persist:
            cut = None  # a crash that should find writes to lose waits for a cycle that makes some
        if ready.early and not all(isinstance(op, Append) for op in ready.persist):
            # only a primary's appends may leave before the sync: a vote, a term or a
            # truncation must be on disk before anything claims it (broker/core.py)
            raise sim.violation(f"{self.name} sends before the sync of {ready.persist}")
        for op in ready.persist:
            self.disk.write(op)
        if cut == "written":
            return self._cut(cut)
        self._send_peers(ready.early)
        if cut == "early":
            return self._cut(cut)
        if ready.persist:
            self.disk.sync()
        if ready.take_snapshot is not None and self.taking is None:
            self.taking = (self.cycles + sim.rng.randint(0, 5), self._take(*ready.take_snapshot))
        if ready.mark_recovered:
            self.disk.mark_recovered()
        if self.replica is not None:
            self.max_commit = max(self.max_commit, self.replica.commit)
        if cut == "synced":
            return self._cut(cut)
        self._send_peers(ready.peer)
        for frames in ready.answers:
            sim.answer(self.name, frames)
        if self.replica is not None:
            sim.check_on_quorum(self.name, self.replica.commit)
        if cut == "sent":
            return self._cut(cut)
        core.advance()
        if ready.start_over is not None:
            self.starts_over.append(ready.start_over)
            if not sim.start_over_allowed:
                raise sim.violation(f"{self.name} starts over: {ready.start_over}")
            loaded = self.disk.set_aside(ready.start_over)
            self.max_commit = 0
            core.restart(loaded, now)
            self._tap()
            self.commit = core.replica.commit
            self.sim.trace(f"{self.name} starts over: {ready.start_over}")
        if ready.stop:
            raise sim.violation(f"{self.name} stops, though nobody asked it to")
        self._after_cycle()

    def _take(self, index: int, term: int) -> Event:
        """What the node's snapshot taker does (broker/taker.py): the ledger at ``index``
        from what the disk holds, kept from one snapshot to the next. Failing as it does
        when the disk lacks the entry, the image comes back None."""
        durable = self.disk.durable
        try:
            ledger = self.shadow.at(durable.snapshot, durable.entries, index, term)
        except NotYet:
            return SnapshotTaken(None)
        return SnapshotTaken(image_of(ledger, index, term))

    def _cut(self, stage: str) -> None:
        self.sim.trace(f"{self.name} crashes after the cycle's {stage} stage")
        self.sim.crashed(self)

    def _after_cycle(self) -> None:
        self._tap()  # a restart inside the core builds a new replica
        r = self.replica
        if r is None:
            return
        if r.commit < self.commit:
            raise self.sim.violation(f"{self.name}: commit went back {self.commit} -> {r.commit}")
        self.commit = r.commit
        if r.role is Role.PRIMARY:
            self.sim.check_primary(self.name, r.term)

    def _send_peers(self, out: list[tuple[str | None, dict[str, Any]]]) -> None:
        sim = self.sim
        me = self.name.encode()
        for to, msg in out:
            body = pack(msg)
            if to is None:
                for peer in sim.names:
                    if peer != self.name:
                        sim.net.send(sim.now, self.name, peer, "hb", [body])
            else:
                sim.net.send(sim.now, self.name, to, "peer", [me, body])

    # --- reading, for the checks
    def event_of(self, kind: str, frames: list[bytes]) -> Event:
        if kind == "peer":
            return PeerMessage(frames, PLAIN)
        if kind == "hb":
            return PeerHeartbeat(frames)
        return ClientMessage(frames, PLAIN)
