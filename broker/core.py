"""The node core: every decision a node makes, with no sockets, no disk and no clock.

The core owns the ledger, the replica and the client front. The shell feeds it events
(``step``), each with the current time, and at the end of each poll cycle asks for one
``Ready`` record of everything to do, in this order:

1. ``persist``: write these to the data directory, in order;
2. ``early``: peer messages that may leave before the sync (a primary's appends in a
   cycle that wrote nothing but entries: Raft thesis 10.2.1), and so before the writes
   of ``persist`` too, which the shell makes after sending them;
3. sync the data directory (one fsync for the cycle: group commit) when ``persist`` is
   not empty; then, if ``mark_recovered``, write the caught-up marker;
4. ``peer`` then ``answers``: every other peer message and every client answer;
5. ``advance()``: the core then does what may wait until the sends have left (a
   backup applies the committed deltas, once the oldest has waited ``APPLY_WAIT``);
6. ``start_over`` (a reason): set the data directory aside with that reason and hand
   what storage then loads to ``restart``; ``stop``: stop after this cycle's sends.

``report`` holds the report log's records of the entries committed and applied since the
last ``ready`` (``broker/reportlog.py``), in log order, when the node keeps a report log:
a backup derives them as it applies (so what it applies in ``advance`` comes with the
next cycle's), a primary when it decides (from the same ledger state) and hands them out
once their entries commit. ``report_from``: the ledger was replaced by a snapshot at that
index (the shell's writer marks a gap if it must).

The next cycle's poll waits no longer than ``wake_at`` (monotonic seconds).

Within a cycle the core keeps the node's ordering rules: client requests are decided
against a ledger that already holds the deltas decided before them (applied at once),
and the cycle's deltas are proposed as one batch (group commit) at its end, or sooner
when a peer event arrives: a replica event may end the serving that every decision of
the batch was checked against, so the batch goes out first. The ledger ticks (leases,
the queue) at the cycle's end, every ``LEDGER_TICK`` or at once after seats were freed,
and the replica every ``TICK``.
"""

from __future__ import annotations

import logging
import math
import operator
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, assert_never, cast

from zbroker.broker.admin import handle_admin, is_admin, is_peer
from zbroker.broker.apply import AppliedLedger, Unappliable
from zbroker.broker.borrow import BorrowReason, sign_facts
from zbroker.broker.config import ORDER, Config, contract_notes, order_note
from zbroker.broker.expiry import ExpiryWarnings
from zbroker.broker.front import Front, Key
from zbroker.broker.ledger import Decided, Delta, Ledger
from zbroker.broker.model import Entitlement, Now, Reply, Request, reply_denied
from zbroker.broker.options import Options
from zbroker.broker.removal import Removal, decide_removal
from zbroker.broker.reportlog import Record, ReportLogError, derive, settle
from zbroker.broker.reserved import Reservations
from zbroker.broker.seats import day_of
from zbroker.broker.served import OwnLicense, Verdict, judge, same_lines
from zbroker.broker.status_reply import StatusReplies
from zbroker.broker.storage import Loaded
from zbroker.broker.tallies import CHECKINS, Tallies
from zbroker.broker.wire import (
    MAX_TEXT,
    RemoteProtocolError,
    decode_request,
    encode_reply,
    refuse_frames,
    unpack,
)
from zbroker.peers import types as rp
from zbroker.peers.messages import Heartbeat
from zbroker.peers.messages import validate as validate_peer
from zbroker.peers.replica import Replica

if TYPE_CHECKING:
    import zmq
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

log = logging.getLogger("zbroker.node")
REFUSED_SHOWN = 20  # refused license lines a status reply names (the rest are counted)

TICK = 0.01  # seconds between replica ticks: well under heartbeat_interval
# Committed deltas a backup applies per cycle after its sends: about 3-5 ms of them.
APPLY_STEP = 1000
# Seconds committed deltas wait on a backup before advance() applies them, together.
# Applied in the cycle that acknowledged them, they held the CPU while the ack was still
# on its way through the ZeroMQ I/O threads (issue 17, item 4: BENCHMARKS.md).
APPLY_WAIT = 0.01  # at least TICK: the replica's tick is what wakes the loop for them
LEDGER_TICK = 0.05  # lease expiry and queue deadlines need no finer grain
EXPIRY_TICK = 1.0  # the expiry warnings are per day: a look a second is plenty
# After a snapshot that failed (a full disk, no file descriptor left), the next is asked
# for no sooner than this: each cycle, it would log and spawn or write for nothing.
SNAPSHOT_RETRY = 5.0
# A node whose wall clock is further than this (seconds) from both others' does not
# stand for election (``judge_clocks``). The primary decides every wall-time deadline
# (linger, borrow, TIMEOUT, the report log's times) by its own clock, so a primary whose
# clock is off ends them early or late. NTP keeps hosts within milliseconds of each
# other and a heartbeat on a LAN is read within a few: 2 s is far above both, and too
# little to move any of those deadlines (minutes to days) in a way anyone would notice.
MAX_CLOCK_SKEW = 2.0
# A move of this node's wall clock against its monotonic one that is judged at once,
# before the next TICK: NTP slews far slower; a step (by hand, or NTP after a long drift)
# is larger.
CLOCK_MOVED = 0.5
# A peer's clock reading lower than the ones before it is believed once it has lasted
# this long (seconds): a heartbeat read late (this node paused, a backlog read at once)
# looks like a clock behind, for as long as the delay lasts.
CLOCK_CONFIRM = 1.0
# The same peer-connection line is logged at most once per peer per this many seconds;
# the next one says how many were not (a key mismatch drops a connection 7-8 times a second).
CONNECTION_LOG_EVERY = 10.0
# No primary for this many peer_timeouts is logged as a loss of quorum: a failover takes
# up to about 1.5 (broker/design.md, "Election"), which is not worth a warning each time.
UNSERVED_AFTER = 2.0
_UNAVAILABLE: Reply = {"status": "unavailable", "detail": "this node just lost control"}
_FREES_SEATS = frozenset({"release", "close", "expire", "return", "take", "lapse"})


def _same_objects(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """Whether two readings hold the very same objects: the ledger and the node replace
    what they read (license, options), never change it in place, so the same objects
    mean nothing changed (and no ``==`` walks every line to say so)."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


class Origin(Protocol):
    """What ZeroMQ knows of the connection a message came in on (a ``zmq.Frame``):
    ``get("User-Id")`` is the name the ZAP handler gave it, ``get("Peer-Address")`` the
    remote address. Read only when a decision needs it (admin requests, peer messages,
    and the address a session opens from, kept in the ledger for the report log)."""

    def get(self, key: str) -> Any: ...


# --- events -------------------------------------------------------------------------
# The events of a message are not frozen: one is made per message, and a frozen
# dataclass's __init__ sets each field through object.__setattr__ (0.4-0.6 us a message,
# measured by scripts/ab_instructions.py). Nothing changes them after they are made.


@dataclass(slots=True)
class ClientMessage:
    """The frames of one message on the client ROUTER, the connection's routing id first."""

    frames: list[bytes]
    origin: Origin


@dataclass(slots=True)
class PeerMessage:
    """The frames of one message on the peer ROUTER: the sender's routing id, the body."""

    frames: list[bytes]
    origin: Origin


@dataclass(slots=True)
class PeerHeartbeat:
    """The frames of one message on the heartbeat SUB socket."""

    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class PeerLost:
    """The connection to peer ``peer`` dropped (its process died, or the network)."""

    peer: str


@dataclass(frozen=True, slots=True)
class SnapshotTaken:
    """The snapshot the shell was asked to take (``Ready.take_snapshot``) is written:
    ``image`` over its file, or None when taking it failed (the shell said why)."""

    image: rp.Image | None


Event = ClientMessage | PeerMessage | PeerHeartbeat | PeerLost | SnapshotTaken


# --- what to persist ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Append:
    """Append these (index, term, delta) records to the log."""

    entries: list[tuple[int, int, Any]]


@dataclass(frozen=True, slots=True)
class Truncate:
    """Drop the log's records from ``from_index`` on."""

    from_index: int


@dataclass(frozen=True, slots=True)
class SaveHardState:
    term: int
    voted_for: str | None


@dataclass(frozen=True, slots=True)
class SaveSnapshotChunk:
    """Write this chunk of the snapshot being received from a peer (offset 0 starts one)."""

    index: int
    term: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SaveSnapshot:
    """Make ``image`` the node's snapshot, then rewrite the log to follow it, keeping every
    entry after ``image.index`` it holds. ``source``: "taken" (the file the snapshot taker
    wrote for ``Ready.take_snapshot``) or "received" (the chunks written as they came)."""

    image: rp.Image
    source: str


Persist = Append | Truncate | SaveHardState | SaveSnapshotChunk | SaveSnapshot

# A peer message: to a peer by name over its DEALER, or published (None) on the PUB.
Outgoing = tuple[str | None, dict[str, Any]]


@dataclass(slots=True)
class Ready:
    """Everything one cycle decided (see the module docstring for the order)."""

    persist: list[Persist] = field(default_factory=list)
    early: list[Outgoing] = field(default_factory=list)
    mark_recovered: bool = False
    peer: list[Outgoing] = field(default_factory=list)
    answers: list[list[bytes]] = field(default_factory=list)  # frames, routing id first
    # Seconds from the cycle each mutating request arrived to this one, which releases its
    # committed answer (the queue's wait included).
    latencies: list[float] = field(default_factory=list)
    start_over: str | None = None
    stop: bool = False
    reread: bool = False  # read the license and options files again (then call reread)
    wake_at: float = 0.0
    report: list[Record] = field(default_factory=list)  # see the module docstring
    report_from: int | None = None
    # Take the snapshot at the committed (index, term), once this cycle is synced: the
    # snapshot taker process writes it while the loop goes on (broker/taker.py), and its
    # file comes back as SnapshotTaken.
    take_snapshot: tuple[int, int] | None = None


# A delta of the batch being decided: the delta, the request it answers (None: no client
# waits for it), and that answer.
_Proposal = tuple[Delta, Key | None, Reply | None]


class PeerClocks:
    """Each peer's wall clock as this node sees it, from the ``wall`` of its heartbeats.

    A reading is kept as the peer's wall minus this node's monotonic clock as it read the
    heartbeat, so that the offset (their wall minus this node's, ``offset``) moves at once
    when this node's own wall clock steps, before any heartbeat comes. A heartbeat read
    late only lowers a reading: the offset is taken from the highest of those of the
    last ``CLOCK_CONFIRM`` seconds and the newest one before them, so a lower one counts
    once it has lasted that long (the peer's clock was set back).
    """

    def __init__(self) -> None:
        self._readings: dict[str, deque[tuple[float, float]]] = {}  # (read at, wall - mono)

    def read(self, peer: str, wall: float, now: Now) -> None:
        readings = self._readings.setdefault(peer, deque(maxlen=256))
        readings.append((now.mono, wall - now.mono))
        while len(readings) > 1 and readings[1][0] <= now.mono - CLOCK_CONFIRM:
            readings.popleft()

    def forget(self, peer: str) -> None:
        """The peer's process is gone: another (another clock, perhaps) may come back."""
        self._readings.pop(peer, None)

    def offset(self, peer: str, now: Now) -> float | None:
        """The peer's wall clock minus this node's, in seconds; None: never read."""
        readings = self._readings.get(peer)
        if not readings:
            return None
        return max(r for _, r in readings) - (now.wall - now.mono)


@dataclass(frozen=True)
class ClockVerdict:
    """What this node makes of the clocks of the peers it hears (``judge_clocks``)."""

    stands: bool = True  # False: its own clock is the odd one out
    note: str | None = None  # what is wrong, for a person; None: nothing
    far: frozenset[str] = frozenset()  # peers whose clock is beyond MAX_CLOCK_SKEW of this one
    key: tuple[object, ...] = ()  # a change of it is logged, not each new offset


def judge_clocks(offsets: Mapping[str, float], majority: int) -> ClockVerdict:
    """This node's standing from the clock offsets of the peers it hears now.

    A majority of the triad against this node (in a triad both others, agreeing with each
    other) means its own clock is wrong: it does not stand for election. With only one
    peer heard, or peers that disagree with each other, nobody can tell which clock is
    wrong: a note, and the node still stands (no outage from a clock problem alone).
    """
    far = {p: o for p, o in sorted(offsets.items()) if abs(o) > MAX_CLOCK_SKEW}
    if not far:
        return ClockVerdict()
    names = frozenset(far)
    key = ("far", tuple(sorted((p, o > 0) for p, o in far.items())))
    agree = max(far.values()) - min(far.values()) <= MAX_CLOCK_SKEW
    if len(far) == len(offsets) and len(far) >= majority and agree:
        mean = sum(far.values()) / len(far)
        return ClockVerdict(
            False,
            f"clock is {abs(mean):.1f} s {_ahead(-mean)} {_and(far)}: this node will not "
            "stand for election until its clock is set right (wall-time deadlines: linger, "
            "borrow, TIMEOUT, the report log)",
            names,
            ("skewed", *key),
        )
    parts = [
        f"{p}'s clock is {abs(o):.1f} s {_ahead(o)} this node's" for p, o in sorted(far.items())
    ]
    if len(offsets) == 1:
        return ClockVerdict(
            True,
            f"{parts[0]}, and no third node is heard to tell which is wrong: this node still "
            "stands for election; set both clocks right (NTP)",
            names,
            key,
        )
    near = sorted(set(offsets) - names)
    why = f"{_and(near)} agrees with this node" if near else "no two clocks agree"
    return ClockVerdict(
        True,
        f"{'; '.join(parts)} ({why}): set {'its' if len(far) == 1 else 'their'} clock right "
        "(NTP); a node whose clock both others disagree with does not stand for election",
        names,
        key,
    )


def _ahead(offset: float) -> str:
    return "ahead of" if offset > 0 else "behind"


def _and(names: Iterable[str]) -> str:
    listed = sorted(names)
    return (
        " and ".join(listed) if len(listed) <= 2 else ", ".join(listed[:-1]) + " and " + listed[-1]
    )


class NodeCore:
    """One node's decisions. Built from what storage loaded; never reads a clock.

    The ledger follows the log (``broker/apply.py``). When a primary loses control, it
    rebuilds its ledger from its last snapshot and its committed log, and sends every
    waiting client a redirect. A committed delta or snapshot that the ledger refuses ends
    the cycle (``Unappliable``): the cycle's ``Ready`` says ``start_over``, and the shell
    hands ``restart`` what storage loads once it has set the data aside.

    Raises ``LedgerError`` (the snapshot makes no ledger) or ``rp.CorruptState`` (the log
    makes no replica) when what was loaded is damage.
    """

    def __init__(
        self,
        config: Config,
        name: str,
        entitlements: tuple[Entitlement, ...],
        loaded: Loaded,
        now: Now,
        *,
        mode: str,
        options: Options | None = None,
        borrow_key: Ed25519PrivateKey | None = None,
        signed: tuple[str, ...] = (),
        vendor_key: Ed25519PublicKey | None = None,
        refused: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        # The triad's borrow key (broker/borrow.py): the primary signs borrow tokens with
        # it; None (no ``borrow_key`` in the config): borrows are refused.
        self._borrow_key = borrow_key
        self.me = config.node(name)
        self.mode = mode
        self.secure = mode == "curve"
        self.entitlements = entitlements
        self.options = options  # the options file this node read (broker/options.py)
        # What this node read, to check the triad's license against (broker/served.py):
        # ``signed`` its file's verified lines (License.signed), ``vendor_key`` its key.
        self._own = OwnLicense(str(config.license_path), entitlements, signed, vendor_key, refused)
        self.verdict = Verdict()  # whether it vouches for the triad's license (``_judge``)
        self._judged: tuple[object, ...] = ()  # what the verdict was judged on
        self._reload_checked: tuple[object, ...] = ()  # what ``_reload`` last compared
        self._reread_asked = False  # a reread to act on: as primary, or hearing none (reread)
        # The shell's reread of its files is under way (set by the shell: it reads them off
        # the loop): until it ends, what the status says of this node's files is of before.
        self.rereading = False
        self._expiry = ExpiryWarnings()  # the 30/14/7-day warnings logged (broker/expiry.py)
        self.endpoints = {n.name: n.client for n in config.nodes}
        self.peers = frozenset(n.name for n in config.nodes if n.name != name)
        # Decisions since start, per feature, for the metrics (``tallies``).
        self._tallies = Tallies()
        self.heard: dict[str, tuple[float, dict[str, Any]]] = {}  # peer heartbeats, for status
        # The peers' clocks (their heartbeats' wall) and what this node makes of them.
        self._clocks = PeerClocks()
        self.clock = ClockVerdict()
        self._clock_at: Now | None = None  # the cycle's reading the clocks were checked at
        self._clock_own = math.nan  # this node's wall minus monotonic at the last judgment
        # What the triad's configs must agree on (Config.contract), this node's, and how
        # each peer's differs from it (``_compare_setup``), as last logged.
        self._contract = config.contract()
        self._setup_notes: dict[str, list[str]] = {}
        # The SERVER lines' order each peer's heartbeats last gave (kept while it is down:
        # every node then ranks alike), and what this node made of them (``_order``).
        self._peer_orders: dict[str, str] = {}
        self._order_note: str | None = None
        self._order_key: frozenset[str] = frozenset()
        # How the SERVER lines of the file last reread differ from those this node runs
        # by (config.server_changes), for status; None: they do not.
        self._restart: str | None = None
        # Peer-connection lines: when each peer's was last logged, and how many were not.
        self._connection_logged: dict[str, tuple[float, int]] = {}
        # Since when this node has known no serving primary (None: it knows one), and
        # whether that was logged (``_watch_service``).
        self._unserved_since: float | None = now.mono
        self._unserved_said = False
        self._reservations = Reservations()  # the features' reservations, for status
        self._reporting = self.me.report_log is not None
        self._out = Ready()  # the cycle being decided
        # Sees every effect the replica returns before the core acts on it; None in a
        # node. The simulation's checker (tests/sim_node.py) watches the triad here: a
        # compiled core calls the replica's methods directly, past any wrapper set on it.
        self.watch: Callable[[list[rp.Effect]], None] | None = None
        how = self._build(loaded, now)
        if loaded.fresh:
            (log.warning if loaded.damaged else log.info)(
                "%s; node %s starts %s", loaded.why, name, how
            )

    def _build(self, loaded: Loaded, now: Now) -> str:
        """Everything that follows from what storage loaded; how the node starts, in words."""
        self.applied = AppliedLedger(self.config, loaded.snapshot)
        snap_index = self.applied.index
        self.replica = Replica(
            self.me.name,
            self.config.ranks,
            rp.Timing(
                heartbeat_interval=self.config.heartbeat_interval,
                peer_timeout=self.config.peer_timeout,
                failback=self.config.failback,
                keep_tail=self.config.snapshot_keep,
            ),
            rp.Durable(
                term=loaded.term,
                voted_for=loaded.voted_for,
                snapshot=loaded.snapshot,
                entries=[rp.Entry(term=t, index=i, delta=d) for i, t, d in loaded.entries],
                commit=snap_index,
                fresh=loaded.fresh,
            ),
            now.mono,
        )
        self.replica.setup = self._contract  # in its heartbeats, for the others to compare
        self._order(logged=False)
        self._judged = ()
        self._judge()  # before the replica's first tick: whether it may stand
        self.was_recovering = self.replica.role is rp.Role.RECOVERING
        self.why_fresh = loaded.why  # why the data directory held no state to vote with
        self.front = Front()
        self.status_asks = StatusReplies()  # this cycle's status requests
        self._batch: list[_Proposal] = []  # decided, applied, not proposed yet
        self._batch_records: list[list[Record]] = []  # the report's, one list per proposal
        self._pending: list[Record] = []  # a primary's, of proposals not committed yet
        self._reported = snap_index  # every entry up to here has its records
        self._batch_now = now  # the clock reading the batch was decided at (serving then)
        self._serving_at = math.nan  # is_serving held at this reading, no replica event since
        self._unapplied: list[rp.Entry] = []  # committed on a backup, applied in advance()
        self._unapplied_since = now.mono  # when the first of them committed
        self._apply_due = False  # advance() applies them (ready)
        # Compaction (``_compact``): a snapshot the shell's taker is writing, and one it
        # wrote, adopted at the next ready().
        self._taking = False
        self._taken: rp.Image | None = None
        self._snapshot_not_before = 0.0  # after a snapshot that failed
        self._next_ledger_tick = now.mono
        self._next_expiry_tick = now.mono
        # The replica's effects from its construction (a single server's start) come with
        # its first entry point: take them now, before any request is decided.
        self._next_tick = now.mono + TICK
        try:
            self._take(self.replica.on_tick(now.mono, now.wall), now)
        except Unappliable as exc:  # a single server's log that its ledger refuses
            self._give_up(exc)
        if not loaded.fresh:
            return ""
        if self.replica.role is rp.Role.RECOVERING:
            return "as a wiped node: no vote until it has caught up from a primary"
        self._out.mark_recovered = True  # a single server has no one to catch up from
        return "empty: a single server has no one to catch up from"

    # --- entry points --------------------------------------------------------------

    def step(self, event: Event, now: Now) -> None:
        """Decide what ``event`` asks; what to do comes out of the next ``ready``."""
        if self._out.start_over is not None:
            return  # this node starts over at the end of the cycle: nothing else counts
        if now is not self._clock_at:  # the shell hands every event of a cycle one Now
            self._clock_at = now
            self._check_clock(now)  # a step of this node's clock counts before any decision
        try:
            match event:
                case ClientMessage():
                    self._on_client(event, now)
                case PeerMessage():
                    self._on_peer(event, now)
                case PeerHeartbeat():
                    self._on_heartbeat(event, now)
                case PeerLost(peer=peer):
                    self._log_connection(f"connection to {peer} dropped", peer, now)
                    self._clocks.forget(peer)
                    self._before_replica()
                    self._take(self.replica.on_peer_lost(peer, now.mono), now)
                case SnapshotTaken(image=image):
                    self._taking = False
                    self._taken = image
                    if image is None:  # a fault that may last (a full disk): not each cycle
                        self._snapshot_not_before = now.mono + SNAPSHOT_RETRY
                case _:
                    assert_never(event)
        except Unappliable as exc:
            self._give_up(exc)

    def ready(self, now: Now) -> Ready:
        """End the cycle: tick, propose what was decided, and hand back what to do."""
        if self._out.start_over is None:
            try:
                self._end_cycle(now)
            except Unappliable as exc:
                self._give_up(exc)
        out, self._out = self._out, Ready()
        # A primary's appends go out before its own sync, so that its fsync and the
        # backups' overlap (Raft thesis 10.2.1). They vouch for nothing on this disk: an
        # entry commits only with a backup's ack, which this node reads in a later cycle,
        # after the sync. Other state written this cycle (a term, a vote, a truncation, a
        # snapshot) must be durable before any message leaves.
        if (
            out.peer
            and out.start_over is None
            and self.replica.role is rp.Role.PRIMARY
            and all(type(op) is Append for op in out.persist)
        ):
            out.early, out.peer = out.peer, out.early
        # An install or a backlog of deltas goes on at once, a step per cycle (advance).
        unapplied = len(self._unapplied)
        busy = self.applied.installing is not None or unapplied > APPLY_STEP
        self._apply_due = unapplied >= APPLY_STEP or (
            unapplied > 0 and now.mono - self._unapplied_since >= APPLY_WAIT
        )
        # The replica's TICK (no longer than APPLY_WAIT) wakes it for deltas waiting.
        out.wake_at = now.mono if busy else self._next_tick
        return out

    def advance(self) -> None:
        """After the cycle's sends: a backup applies the committed deltas that are due
        (``ready``), or takes the next step of a snapshot's install. Both in bounded
        steps, so that no cycle's answers and acknowledgements wait long for them."""
        if self._out.start_over is not None:
            return
        try:
            if self.applied.installing is not None:
                self._install_step()
            elif self._apply_due:
                self._apply_unapplied(APPLY_STEP)
        except Unappliable as exc:
            self._give_up(exc)  # the next ready() says start_over

    def restart(self, loaded: Loaded, now: Now) -> None:
        """Come back from a ``start_over`` on what storage loaded after setting data aside."""
        how = self._build(loaded, now)
        log.error(
            "node %s stops serving and voting (%s) and starts over %s",
            self.me.name,
            loaded.why,
            how,
        )

    @property
    def ledger(self) -> Ledger:
        """The ledger as this node holds it (read it; the core alone changes it)."""
        return self.applied.ledger

    @property
    def applying(self) -> bool:
        """Whether a snapshot install or committed deltas still wait to reach the ledger."""
        return self.applied.installing is not None or bool(self._unapplied)

    @property
    def tallies(self) -> Mapping[tuple[str, ...], int]:
        """Decisions since start, per feature, for the metrics (broker/tallies.py):
        ("checkout", feature), ("checkin", how, feature), ("denied", reason, feature)."""
        return self._tallies.counts

    @property
    def session_count(self) -> int:
        """Sessions open in this node's ledger (broker/metrics.py)."""
        return self.ledger.session_count

    def report(self, now: Now) -> dict[str, Any]:
        """The status report (docs/protocol.md), as a status request is answered."""
        try:
            return self._report(now)
        except Unappliable as exc:
            self._give_up(exc)
            return self._report(now)

    def reread(
        self,
        entitlements: tuple[Entitlement, ...],
        options: Options | None,
        signed: tuple[str, ...] = (),
        vendor_key: Ed25519PublicKey | None = None,
        now: Now | None = None,
        refused: tuple[str, ...] = (),
        *,
        restart: str | None = None,
    ) -> None:
        """The shell read the license and options files again (SIGHUP, ``zbroker reread``).
        A primary replicates them at its next ledger tick (``_reload``) as one reload delta
        when they differ from the triad's; a backup keeps them only to compare with the
        triad's (the triad's license changes by a reread on the primary, never by a
        failover: broker/served.py). A node that hears no primary (``now``) stands for
        election after a reread even if it cannot vouch for the triad's license, and
        replicates its own if it wins: the way out when no node can (all three restarted
        with a new vendor key), until it hears another primary."""
        same = entitlements == self.entitlements and options == self.options
        self.entitlements, self.options = entitlements, options
        self._own = OwnLicense(self._own.path, entitlements, signed, vendor_key, refused)
        primary = self.replica.primary
        self._reread_asked = self.replica.role is rp.Role.PRIMARY or (
            now is not None
            and (primary is None or primary not in self.replica.peers_alive(now.mono))
        )
        self._judged = ()  # judge again, standing as the reread says
        if restart is not None and restart != self._restart:
            log.warning("%s", restart)
        self._restart = restart
        log.info(
            "reread: %d license lines, %s; %s",
            len(entitlements),
            "no options file" if options is None else f"{len(options.lines)} options lines",
            "nothing changed"
            if same
            else "serving them"
            if self._reread_asked
            else "serving them when the primary rereads too",
        )

    def _reload(self, now: Now) -> Delta | None:
        """The reload a serving primary replicates now, if any (``_reload_of``). Looked
        for again only when the ledger's license or this node's files change (by
        identity), or after a reread, not every tick: a single server would compare every
        line's map with the ledger's 20 times a second (scripts/ab_instructions.py)."""
        ledger = self.ledger
        on = (ledger.entitlements, ledger.license_lines, ledger.options, self._own, self.options)
        if not self._reread_asked and _same_objects(on, self._reload_checked):
            return None
        reload = self._reload_of(now)
        # Only "nothing to replicate" is remembered: a reload that is then dropped (lost
        # control) may leave the very same objects (an empty ledger's), to be tried again.
        self._reload_checked = on if reload is None else ()
        return reload

    def _reload_of(self, now: Now) -> Delta | None:
        """Its own files when they differ from the triad's after a reread on it, on a
        brand-new triad (a ledger without entitlements) or alone; and an older node's
        reload again with its signed lines when this node's file has exactly its
        entitlements."""
        ledger, own = self.ledger, self._own
        if self._reread_asked or not self.peers or not ledger.entitlements:
            self._reread_asked = False
            if (
                same_lines(own.entitlements, ledger.entitlements)
                and self.options == ledger.options
                and (not own.signed or own.signed == ledger.license_lines)
            ):
                return None
            log.info("replicating this node's license and options as the triad's (a reload)")
            return ledger.reload_delta(own.entitlements, self.options, now, own.signed or None)
        if (
            ledger.license_lines is None
            and own.signed
            and same_lines(own.entitlements, ledger.entitlements)
        ):
            return ledger.reload_delta(own.entitlements, ledger.options, now, own.signed)
        return None

    def _expiry_warnings(self, now: Now) -> None:
        """Log the 30/14/7-day warnings of the triad's lines that are due (broker/expiry.py)."""
        for message in self._expiry.check(self.ledger.entitlements, day_of(now.wall)):
            log.warning("%s", message)

    def _judge(self) -> Verdict:
        """Whether this node vouches for the triad's license (broker/served.py); judged
        again only when the ledger's license or this node's files change (by identity)."""
        ledger = self.applied.ledger  # every replica tick: not through the property
        on = (ledger.entitlements, ledger.license_lines, ledger.options, self._own, self.options)
        if not _same_objects(on, self._judged):
            self._judged = on
            verdict = judge(self.me.name, self._own, self.options, *on[:3])
            if verdict != self.verdict:
                for note in verdict.notes:
                    log.warning("%s", note)
                if not verdict.notes:
                    log.info("node %s's license and options are the triad's", self.me.name)
            self.verdict = verdict
        # Alone, a node serves its own file (``_reload``): nothing to stand against; after
        # a reread it replicates its own if it leads, which it vouches for.
        # A node installing a snapshot has no ledger to serve from until it is done.
        # A node whose clock the others agree is wrong would decide wall-time deadlines
        # by it (``judge_clocks``).
        self.replica.stands = (
            (self.verdict.stands or not self.peers or self._reread_asked)
            and self.applied.installing is None
            and self.clock.stands
        )
        return self.verdict

    def _check_clock(self, now: Now, *, again: bool = False) -> None:
        """Judge the clocks (``judge_clocks``) when ``again`` (a heartbeat read, each
        ``TICK``) or when this node's own wall clock moved against its monotonic one by
        more than ``CLOCK_MOVED`` since the last judgment (a step): in between, nothing
        judged can change, and a judgment each cycle cost a tenth of a primary's
        instructions per request (scripts/ab_instructions.py). A change is logged once,
        and the replica told at once whether this node stands and which peers it must not
        hand over to."""
        own = now.wall - now.mono
        if not again and abs(own - self._clock_own) <= CLOCK_MOVED:  # NaN at first: judged
            return
        self._clock_own = own
        offsets = {}
        for peer in self.replica.peers_alive(now.mono):
            offset = self._clocks.offset(peer, now)
            if offset is not None:
                offsets[peer] = offset
        if not offsets:
            return  # no clock heard to compare with: nothing known changed
        verdict = judge_clocks(offsets, self.replica.majority)
        old, self.clock = self.clock, verdict
        if verdict.key != old.key:
            if verdict.note is not None:
                log.warning("%s", verdict.note)
            else:
                log.warning(
                    "clock agrees with %s again (within %.0f s)%s",
                    _and(offsets),
                    MAX_CLOCK_SKEW,
                    "" if old.stands else ": this node stands for election again",
                )
        if verdict.far != old.far:
            self.replica.shunned = verdict.far
        if verdict.stands != old.stands:
            self._judge()

    def _compare_setup(self, peer: str, setup: dict[str, str | float]) -> None:
        """Log how ``peer``'s config differs from this node's on the triad's contract,
        each difference once (and once when they agree again); never refused over."""
        order = setup.get(ORDER)
        if isinstance(order, str) and order != self._peer_orders.get(peer):  # else unknown
            self._peer_orders[peer] = order
            self._order()
        notes = (
            []
            if setup == self._contract
            else contract_notes(self.me.name, peer, self._contract, setup)
        )
        old = self._setup_notes.get(peer, [])
        if notes == old:
            return
        self._setup_notes[peer] = notes
        for note in notes:
            if note not in old:
                log.warning("%s", note)
        if not notes:
            log.warning("%s's config agrees with this node's on the triad's settings again", peer)

    def _order(self, *, logged: bool = True) -> None:
        """Rank the nodes as the config's SERVER lines do while every peer heard agrees;
        while one differs, by name, the same on every node (each has heard the odd one
        out), and no failback: a hand-over toward a node this one ranks first, which
        ranks another first, is handed on without end (SPEC §6: nodes given different
        license files). One WARNING when they start to differ, one when they agree."""
        mine = str(self._contract[ORDER])
        differ = {p: o for p, o in self._peer_orders.items() if o != mine}
        self._order_note = order_note(self.me.name, mine, differ) if differ else None
        key = frozenset(differ.values())
        if logged and key != self._order_key:
            if self._order_note is not None:
                log.warning("%s", self._order_note)
            else:
                log.warning(
                    "the nodes' license files order the SERVER lines alike again (%s): "
                    "failback resumes",
                    ", ".join(mine.split()),
                )
        self._order_key = key
        ranks = self.config.ranks if not differ else sorted(self.config.ranks)
        self.replica.set_order(ranks, agreed=not differ)

    def _log_connection(self, line: str, peer: str, now: Now) -> None:
        """A peer-connection line, at most once per peer per ``CONNECTION_LOG_EVERY``."""
        at, quiet = self._connection_logged.get(peer, (-math.inf, 0))
        if now.mono - at < CONNECTION_LOG_EVERY:
            self._connection_logged[peer] = (at, quiet + 1)
            return
        more = f" ({quiet} more times since the last line, not logged each)" if quiet else ""
        log.info("%s%s", line, more)
        self._connection_logged[peer] = (now.mono, 0)

    def _watch_service(self, now: Now) -> None:
        """Warn once when this node has known no serving primary for ``UNSERVED_AFTER``
        peer_timeouts (checkouts are unavailable), and once when it knows one again."""
        replica = self.replica
        if not self.peers:
            return
        alive = replica.peers_alive(now.mono)
        if replica.role is rp.Role.PRIMARY:
            served = replica.is_serving(now.mono) or replica.transferring
        else:
            served = replica.primary is not None and replica.primary in alive
        if served:
            if self._unserved_since is not None and self._unserved_said:
                log.warning(
                    "serving again: %s is primary in term %d (checkouts were unavailable "
                    "for %.1f s)",
                    "this node" if replica.role is rp.Role.PRIMARY else replica.primary,
                    replica.term,
                    now.mono - self._unserved_since,
                )
            self._unserved_since, self._unserved_said = None, False
        elif self._unserved_since is None:
            self._unserved_since = now.mono
        elif (
            not self._unserved_said
            and now.mono - self._unserved_since > UNSERVED_AFTER * self.config.peer_timeout
        ):
            self._unserved_said = True
            need = replica.majority
            log.warning(
                "lost quorum: checkouts unavailable, no primary for %.1f s (this node, %s in "
                "term %d, hears %s; a primary needs %d of the %d nodes up and reaching "
                "each other)",
                now.mono - self._unserved_since,
                replica.role.value,
                replica.term,
                _and(alive) if alive else "no other node",
                need,
                len(self.config.nodes),
            )

    # --- one cycle -----------------------------------------------------------------

    def _end_cycle(self, now: Now) -> None:
        out = self._out
        # Before the ledger's tick, which ends wall-time deadlines, and the replica's, which
        # may hand over: with the peers heard in this cycle's events.
        self._check_clock(now, again=now.mono >= self._next_tick)
        if self.status_asks:  # answered together (broker/status_reply.py)
            out.answers += self.status_asks.answer(self._report(now), self.ledger)
        if self._batch and now.mono != self._batch_now.mono:
            self._propose()  # decided at another reading: propose under its serving check
        if (
            now.mono >= self._next_ledger_tick
            and self.replica.role is rp.Role.PRIMARY  # cheap first: backups cycle often
            and self._refusal(now) is None
        ):
            self._next_ledger_tick = now.mono + LEDGER_TICK
            reload = self._reload(now)
            if reload is not None:
                self._decide((reload, None), now)
            ticked = self.ledger.tick(now)
            for decided in ticked.decided:
                self._decide(decided, now)
            for key in ticked.ended:
                self.front.forget(key)
        if self._batch:
            self._propose()  # before the replica's tick: the serving check still holds
        if now.mono >= self._next_tick:
            self._next_tick = now.mono + TICK
            self._judge()  # before the replica's tick: it stands for election or not
            if now.mono >= self._next_expiry_tick:
                self._next_expiry_tick = now.mono + EXPIRY_TICK
                self._expiry_warnings(now)
            self._take(self.replica.on_tick(now.mono, now.wall), now)
            self._watch_service(now)
        self._compact(now)

    def _give_up(self, exc: Unappliable) -> None:
        """Stop serving and voting at once, and have the shell start the node over.

        A ledger that refuses what a quorum committed holds a history no other node has,
        or its snapshot does: nothing this node holds can be vouched for, so it keeps
        none of it (its files go aside for an administrator, its term and vote with them)
        and catches up from the primary before it votes again (RECOVERING), as a node whose
        disk was lost does. A primary steps down by the same move: its replica is gone, so
        the others stop hearing it as primary and elect another. What this cycle had not
        sent to peers or written is dropped (the peers re-send what they need; the files go
        aside); clients still waiting here are told to ask the next primary, which answers
        from the replicated request table. The answers already decided vouch for nothing
        on this disk (replays, refusals, and commits a quorum holds): they still leave.
        """
        log.error("node %s cannot apply the committed log at %s", self.me.name, exc)
        old = self._out
        self._out = Ready(
            answers=old.answers,
            latencies=old.latencies,
            stop=old.stop,
            start_over=f"its ledger cannot follow the committed log at {exc}",
            report=old.report,  # of entries that were committed and did apply
        )
        self._pending.clear()
        self._batch_records.clear()
        self._tallies.forget()
        self._abandon(None)
        self._batch.clear()
        self._unapplied.clear()
        self.status_asks = StatusReplies()  # their askers retry; the report would be stale

    # --- clients -------------------------------------------------------------------

    def _on_client(self, event: ClientMessage, now: Now) -> None:
        frames = event.frames
        if len(frames) != 2:
            # Several frames: a REQ socket, say. The error goes back in its envelope.
            self._out.answers.append(refuse_frames(frames))
            return
        identity, data = frames
        try:
            request = decode_request(data)
        except RemoteProtocolError as exc:
            self._reply(identity, exc.sid, exc.req, exc.reply)
            return
        op = request.op
        if op == "status":
            self.status_asks.add(identity, request)  # answered together at the cycle's end
            return
        if op == "admin":
            admin = is_admin(cast("zmq.Frame", event.origin), secure=self.secure)
            decision = handle_admin(
                request.action, admin=admin, node=self.me.name, secure=self.secure
            )
            if decision.reply is not None:  # else remove: decided below, as a client's
                self._reply(identity, request.sid or None, request.req, decision.reply)
                if decision.stop:
                    self._out.stop = True  # the reply leaves in this cycle
                self._out.reread |= decision.reread
                return
        if self._batch and now.mono != self._batch_now.mono:
            self._propose()  # decided at another reading: propose under its serving check
        if now.mono != self._serving_at:  # else it serves: no call (the hot path)
            refusal = self._refusal(now)
            if refusal is not None:
                self._reply(identity, request.sid, request.req, refusal)
                return
        key = (request.sid, request.req)
        if self.front.waiting(key):
            self.front.wait(key, identity, now.mono)  # a retry: answer where the client is now
            return
        if op == "admin":  # remove (broker/removal.py): the primary's decision
            self._remove(identity, request, now, key)
            return
        if op == "open":  # the session keeps the address it opened from; no other op reads it
            request = replace(request, address=client_address(event.origin))
        if op == "borrow" and self._borrow_key is None:
            why = f"node {self.me.name} has no borrow key (borrow_key in {self.config.path.name})"
            refusal = reply_denied(BorrowReason.NOT_BORROWABLE, why)
            self._reply(identity, request.sid, request.req, refusal)
            return
        outcome = self.applied.ledger.handle(request, now)  # not the property: hot path
        if outcome.reply is not None:
            self._reply(identity, request.sid, request.req, outcome.reply)
            return
        self.front.wait(key, identity, now.mono)
        for decided in outcome.decided:
            self._decide(decided, now)

    def _refusal(self, now: Now) -> Reply | None:
        """None while this node is a serving primary; else what a client is told."""
        if now.mono == self._serving_at:
            return None  # no replica event since it was found serving at this reading
        if self.replica.is_serving(now.mono):
            self._serving_at = now.mono
            return None
        primary = self.replica.primary
        if self.replica.role is rp.Role.PRIMARY or primary is None:
            return {
                "status": "unavailable",
                "detail": f"node {self.me.name} has no quorum or an election is in progress",
            }
        return {"status": "redirect", "primary": self.endpoints.get(primary)}

    def _remove(self, identity: bytes, request: Request, now: Now, key: Key) -> None:
        """``zbroker remove``, admitted as a client's request is (a serving primary, not a
        retry of one waiting): answered once the last of its ``take`` deltas commits (at
        once if there are none)."""
        removal = Removal.of(request)
        deltas, reply = decide_removal(self.ledger, removal, now, self.config.min_remove)
        log.warning("administrator asked to remove %s: %s", removal.describe(), reply.get("detail"))
        if not deltas:
            self._reply(identity, request.sid, request.req, reply)
            return
        self.front.wait(key, identity, now.mono)
        for delta in deltas[:-1]:
            self._decide((delta, None), now)
        self._decide((deltas[-1], reply), now, key)

    def _decide(self, decided: Decided, now: Now, key: Key | None = None) -> None:
        """Apply at once (the next decision must see it) and add it to the batch; ``key``:
        the request its reply answers, when the delta names no session's (remove)."""
        delta, reply = decided
        if "token" in delta and self._borrow_key is not None:  # a borrow: sign its token
            delta["token"] = sign_facts(self._borrow_key, delta["token"])
            if reply is not None:
                reply["token"] = delta["token"]
        # The report's records, from the ledger before the delta, as a backup derives them.
        records = self._derive(0, 0, delta) if self._reporting else None
        kind = delta["k"]
        if kind in CHECKINS:  # the features it checks in, read before it applies
            self._tallies.decided(len(self._batch), delta, self.applied.ledger)
        self.applied.ledger.apply_decided(delta)  # checked as it was decided
        if records is not None:
            settle(records, self.applied.ledger)  # seats in use after it
            self._batch_records.append(records)
        if kind in _FREES_SEATS:
            self._next_ledger_tick = now.mono  # waiters may fit now: tick at this cycle's end
        if not self._batch:
            self._batch_now = now
        if key is None and reply is not None:
            key = (delta["sid"], delta["req"])
        self._batch.append((delta, key, reply))

    def _propose(self) -> None:
        """Propose the batch as one group commit (one append message per backup)."""
        batch, self._batch = self._batch, []
        records, self._batch_records = self._batch_records, []
        now = self._batch_now
        try:
            indexes, effects = self.replica.propose([d for d, _, _ in batch], now.mono)
        except rp.NotServing:
            # Cannot happen while decisions check serving at the reading the batch is
            # proposed at, but if it did, the ledger holds deltas no one will replicate:
            # undo, and tell the clients truthfully that nothing happened.
            log.error("lost control between decision and proposal; %d deltas dropped", len(batch))
            self._tallies.dropped()
            self.applied.rebuild(self.replica.log, self.replica.last)
            for _, key, _ in batch:
                if key is not None and (routed := self.front.answer(key)) is not None:
                    self._reply(routed[0], *key, self._refusal(now) or _UNAVAILABLE)
            return
        self._tallies.proposed(indexes)
        front = self.front
        for index, (_, key, reply) in zip(indexes, batch, strict=True):
            if key is not None and reply is not None:
                front.proposed(index, key, reply)
        if records:
            term = self.replica.term
            for index, derived in zip(indexes, records, strict=True):
                for record in derived:
                    record["ix"], record["term"] = index, term
                self._pending += derived
        self.applied.proposed(indexes[-1], self.replica.term)
        self._take(effects, now)

    def _reply(self, identity: bytes, sid: str | None, req: int | None, reply: Reply) -> None:
        self._out.answers.append([identity, encode_reply(reply, sid, req)])

    # --- peers ---------------------------------------------------------------------

    def _on_peer(self, event: PeerMessage, now: Now) -> None:
        frames = event.frames
        if len(frames) != 2:
            return
        try:
            sender = frames[0].decode()
        except UnicodeDecodeError:
            return
        if not is_peer(cast("zmq.Frame", event.origin), sender, secure=self.secure):
            return  # a triad key posing as another node than its own
        msg = _decode_peer(frames[1])
        if msg is not None and sender in self.peers:
            self._before_replica()
            self._take(self.replica.on_message(sender, msg, now.mono, now.wall), now)

    def _on_heartbeat(self, event: PeerHeartbeat, now: Now) -> None:
        frames = event.frames
        msg = _decode_peer(frames[-1]) if len(frames) == 1 else None
        sender = msg.get("node") if msg is not None else None
        if msg is not None and isinstance(sender, str) and sender in self.peers:
            hb = validate_peer(msg)
            if isinstance(hb, Heartbeat):  # status shows only well-formed ones
                self.heard[sender] = (now.mono, msg)
                if hb.setup is not None:
                    self._compare_setup(sender, hb.setup)
                if hb.wall is not None:
                    self._clocks.read(sender, hb.wall, now)
                    self._check_clock(now, again=True)  # before the replica reads on
            self._before_replica()
            self._take(self.replica.on_message(sender, msg, now.mono, now.wall), now)

    def _before_replica(self) -> None:
        """Before any replica event: the batch goes out under the serving check it was
        decided by, which the event may end."""
        if self._batch:
            self._propose()

    # --- the replica's effects -------------------------------------------------------

    def _take(self, effects: list[rp.Effect], now: Now) -> None:
        """The replica's effects, in order: persist ops and sends go into the cycle's
        Ready; the ledger follows commits at once, so it is current for the next decision."""
        if self.watch is not None:
            self.watch(effects)
        out = self._out
        self._serving_at = math.nan
        for effect in effects:
            match effect:
                case rp.Send(to=to, msg=msg):
                    out.peer.append((to, msg))
                case rp.Publish(msg=msg):
                    out.peer.append((None, msg))
                case rp.PersistEntries(entries=entries):
                    if entries:
                        out.persist.append(Append([(e.index, e.term, e.delta) for e in entries]))
                case rp.TruncateLog(from_index=from_index):
                    out.persist.append(Truncate(from_index))
                case rp.PersistHardState(term=term, voted_for=voted_for):
                    out.persist.append(SaveHardState(term, voted_for))
                case rp.PersistSnapshotChunk(index=index, term=term, offset=offset, data=data):
                    out.persist.append(SaveSnapshotChunk(index, term, offset, data))
                case rp.PersistSnapshot(image=image):
                    out.persist.append(SaveSnapshot(image, "received"))
                case rp.InstallSnapshot(image=image):
                    self._start_install(image)
                case rp.Committed():
                    self._on_committed(effect, now)
                case rp.RoleChanged():
                    self._on_role_changed(effect)
                case rp.Dropped(sender=sender, reason=reason):
                    log.debug("dropped a message from %s: %s", sender, reason)
                case _:
                    assert_never(effect)

    def _on_committed(self, effect: rp.Committed, now: Now) -> None:
        if self.replica.role is rp.Role.PRIMARY:
            self._apply(effect.entries)
            if self._pending:
                self._release_reports(effect.upto)
            # Counted once, by the primary that decided it (entries of its own term).
            self._tallies.committed(effect.entries, self.replica.term)
        else:
            # A backup's acknowledgement of this cycle's appends need not wait for its
            # ledger: apply after the sends (advance). Anything that reads the ledger
            # sooner (a role change, a status) applies them first.
            if not self._unapplied:
                self._unapplied_since = now.mono
            self._unapplied.extend(effect.entries)
        released = self.front.committed(effect.upto)
        if released:
            mono = now.mono
            latencies = self._out.latencies
            for identity, (sid, req), reply, arrived in released:
                self._reply(identity, sid, req, reply)
                latencies.append(mono - arrived)

    def _apply(self, entries: Sequence[rp.Entry]) -> None:
        if self._reporting:
            self._apply_reporting(entries)
        else:
            self.applied.apply(entries, self.replica.log)

    def _apply_reporting(self, entries: Sequence[rp.Entry]) -> None:
        """Apply as ``AppliedLedger.apply`` does, one entry at a time, each entry's records
        derived just before it applies (committed entries only come here)."""
        applied, log_, out = self.applied, self.replica.log, self._out.report
        for entry in entries:
            if entry.index <= applied.index:
                continue  # a primary's own proposal: its records wait in _pending
            fresh = entry.index > self._reported
            records = self._derive(entry.index, entry.term, entry.delta) if fresh else None
            applied.apply([entry], log_)  # Unappliable: no record of it goes out
            if records is not None:
                settle(records, applied.ledger)  # seats in use after it
                out += records
                self._reported = entry.index

    def _derive(self, index: int, term: int, delta: Delta | None) -> list[Record]:
        try:
            return derive(index, term, delta, self.ledger)
        except ReportLogError:
            return []  # the ledger refuses the delta too, and says why (Unappliable)

    def _release_reports(self, upto: int) -> None:
        """A primary's records of proposals now committed go out, in log order."""
        pending = self._pending
        k = 0
        while k < len(pending) and pending[k]["ix"] <= upto:
            k += 1
        if k:
            self._out.report += pending[:k]
            del pending[:k]
        self._reported = max(self._reported, upto)

    def _apply_unapplied(self, limit: int | None = None) -> None:
        """Apply the committed deltas waiting (``limit``: at most that many); none while a
        snapshot is being installed: they follow it."""
        if self._unapplied and self.applied.installing is None:
            entries = self._unapplied if limit is None else self._unapplied[:limit]
            self._unapplied = self._unapplied[len(entries) :]
            self._apply(entries)

    # --- snapshots ---------------------------------------------------------------------

    def _start_install(self, image: rp.Image | None) -> None:
        """Install ``image`` in steps (None: start from the empty ledger); the committed
        deltas after it wait in ``_unapplied``."""
        self.applied.start_install(image)
        index = 0 if image is None else image.index
        self._unapplied = [e for e in self._unapplied if e.index > index]

    def _install_step(self) -> None:
        if self.applied.install_step():
            self._installed(self.applied.index)

    def _finish_install(self) -> None:
        """Every step of the install left, at once: the one place a node blocks for it, a
        candidate that adopted a snapshot in its view change and is primary now."""
        if self.applied.installing is not None:
            self.applied.finish_install()
            self._installed(self.applied.index)

    def _installed(self, index: int) -> None:
        log.info("snapshot at %d installed", index)
        if self._reporting and index > self._reported:
            self._reported = index
            self._out.report_from = index

    def _compact(self, now: Now) -> None:
        """Ask for a snapshot at the commit index every ``snapshot_every`` committed deltas,
        and adopt the one taken while the log still holds its entry in its term.

        The shell's snapshot taker builds it from the snapshot file and the committed
        entries of the log on disk (broker/taker.py), which the cycle's sync wrote; the
        node's own ledger is never copied (a primary's runs ahead of its commit anyway).
        It is dropped if a newer snapshot came first (one received from the primary).
        """
        log_, taken = self.replica.log, self._taken
        if taken is not None:
            self._taken = None
            if taken.index > log_.snap_index and log_.term_at(taken.index) == taken.term:
                self._out.persist.append(SaveSnapshot(taken, "taken"))
                self.replica.compacted(taken)
            return
        if self._taking or self.applied.installing is not None:
            return
        if now.mono < self._snapshot_not_before:
            return
        commit = self.replica.commit
        if commit - log_.snap_index < self.config.snapshot_every:
            return
        term = log_.term_at(commit)
        if term is not None:
            self._taking = True
            self._out.take_snapshot = (commit, term)

    def _on_role_changed(self, effect: rp.RoleChanged) -> None:
        log.info(
            "now %s in term %d (primary: %s)",
            effect.role.value,
            effect.term,
            effect.primary,
        )
        if self.was_recovering and effect.role is not rp.Role.RECOVERING:
            self._out.mark_recovered = True  # the marker, once this cycle's state is on disk
        self.was_recovering = effect.role is rp.Role.RECOVERING
        if effect.role is rp.Role.PRIMARY:
            self._finish_install()
        self._apply_unapplied()  # before any decision of the new role reads the ledger
        # Leases and waiters are the primary's alone; a new reign starts them afresh.
        self.ledger.forget_volatile()
        self._tallies.forget()
        if effect.role is not rp.Role.PRIMARY and effect.primary not in (None, self.me.name):
            self._reread_asked = False  # another primary serves the triad's: it stands as it
        applied, log_ = self.applied, self.replica.log
        if effect.role is rp.Role.PRIMARY:
            if not applied.follows(log_):  # it would decide from deltas nobody else has
                raise Unappliable(applied.index, applied.term, "the log lost this delta")
            return
        if self._pending and applied.index <= self.replica.commit and applied.follows(log_):
            self._release_reports(self.replica.commit)  # committed: the log vouches for them
        self._pending.clear()  # the rest may never commit: rederived if they do
        if applied.installing is None and (
            applied.index > self.replica.commit or not applied.follows(log_)
        ):
            # As primary we applied deltas that may never commit, or that the event which
            # deposed us has already replaced (an append of the next primary, read after a
            # pause or a loss, can cut them and commit past them at once; the issue 11
            # next_grant crash): rebuild from what is certain, the snapshot and the
            # committed log, in steps as a snapshot from a peer is installed (the report
            # log's records come as the entries past ``_reported`` apply). The snapshot
            # being taken, if any, may hold the deltas cut: ``_compact`` drops it then.
            self._start_install(log_.snapshot)
            self._unapplied = log_.slice(log_.snap_index + 1, self.replica.commit)
        self._abandon(self.endpoints.get(effect.primary or ""))

    def _abandon(self, primary: str | None) -> None:
        """Redirect every waiting client to ``primary`` (an endpoint; None: unknown yet).
        Their requests may or may not commit under the next primary: say so, and let the
        clients ask it (it answers a retry from the replicated request table)."""
        abandoned: Reply = {"status": "redirect", "primary": primary, "outcome": "unknown"}
        for identity, (sid, req) in self.front.abandon():
            self._reply(identity, sid, req, abandoned)

    # --- status ----------------------------------------------------------------------

    def _recovering(self) -> str:
        """Why this node does not vote yet, and what it waits for."""
        primary = self.replica.primary
        if primary is not None:
            return f"{self.why_fresh}; catching up from primary {primary}"
        return (
            f"{self.why_fresh}; waiting for a primary to catch up from (the two other"
            " nodes must be up and hold their data to elect one)"
        )

    def _not_standing(self) -> str:
        """Why this node does not stand for election, for a person."""
        if not self.clock.stands:
            return self.clock.note or "its clock disagrees with the others'"
        if self.applied.installing is not None:
            return "it is installing a snapshot from the primary"
        return self.verdict.note or "it cannot vouch for the license the triad serves"

    def _report(self, now: Now) -> dict[str, Any]:
        self._apply_unapplied()
        # Every entry has name, endpoint, role, term, last and commit (nil while a node is
        # not heard); the own entry also what only this node knows (docs/protocol.md).
        own: dict[str, Any] = {
            "name": self.me.name,
            "endpoint": self.me.client,
            "role": self.replica.role.value,
            "term": self.replica.term,
            "last": self.replica.last,
            "commit": self.replica.commit,
            "peers": sorted(self.replica.peers_alive(now.mono)),
            "serving": self.replica.is_serving(now.mono),
            # how this node's files differ from the triad's, or None (broker/served.py)
            "license": self._judge().note,
        }
        if self.rereading:
            own["rereading"] = True
        if self._restart is not None:
            own["restart"] = self._restart
        refused = self._own.refused  # its license file's lines it refused, as last read
        if refused:  # a few: a reply must fit max_message
            more = len(refused) - REFUSED_SHOWN
            own["refused"] = [*refused[:REFUSED_SHOWN], *([f"and {more} more"] if more > 0 else [])]
        if self.replica.role is rp.Role.RECOVERING:
            own["recovering"] = self._recovering()
        # Only when something is wrong (so a healthy triad's report is as before):
        if not self.replica.stands:
            own["not_standing"] = self._not_standing()
        if self.clock.note is not None:
            own["clock"] = self.clock.note
            own["clocks"] = {
                p: round(offset, 3)
                for p in sorted(self.peers)
                if (offset := self._clocks.offset(p, now)) is not None
            }
        settings = [note for peer in sorted(self._setup_notes) for note in self._setup_notes[peer]]
        if self._order_note is not None:
            settings.insert(0, self._order_note)
        if settings:
            own["settings"] = settings
        others = []
        for other in self.config.nodes:
            if other.name == self.me.name:
                continue
            at, hb = self.heard.get(other.name, (float("-inf"), {}))
            if now.mono - at > self.config.peer_timeout:
                hb = {"role": "down"}  # term, last and commit: nil
            others.append(
                {"name": other.name, "endpoint": other.client}
                | {k: hb.get(k) for k in ("role", "term", "last", "commit")}
            )
        # The vendor of each feature as this node's license file names it (not replicated:
        # every node reads the same file); nil for a feature it no longer has a line for.
        vendors = {e.feature: e.vendor or None for e in self.entitlements}
        features = self.ledger.status(now)
        for feature in features:
            feature["vendor"] = vendors.get(feature["name"])
        self._reservations.add_to(features, self.ledger, now.date)
        return {
            "node": self.me.name,
            "mode": self.mode,
            "nodes": [own, *others],
            "features": features,
        }


def _decode_peer(data: bytes) -> dict[str, Any] | None:
    try:
        msg = unpack(data)
    except Exception:  # hostile bytes on a peer socket are dropped, never a crash
        return None
    return msg if isinstance(msg, dict) else None


def client_address(origin: Origin) -> str:
    """The remote address ZeroMQ saw the connection at, "" when it has none to give."""
    try:
        address = origin.get("Peer-Address")
    except Exception:  # zmq.ZMQError: no such metadata on this transport (ipc, inproc)
        return ""
    return address[:MAX_TEXT] if isinstance(address, str) else ""
