"""The replica: election and the replicated log of one node, as a pure state machine.

No sockets, no clock, no disk. Events come in with ``now`` (monotonic seconds); each
entry point returns the effects to carry out, in order (``peers/types.py``)::

    Replica(me, ranks, timing, durable, now)
    on_tick(now, wall) -> list[Effect]                 # call every few ms (<= heartbeat/4)
    on_message(sender, msg, now, wall) -> list[Effect] # a decoded peer map; never raises
    on_peer_lost(peer, now) -> list[Effect]            # the connection to a peer dropped
    propose(deltas, now) -> (indexes, list[Effect])    # serving primary only
    compacted(image) -> None                           # the shell imaged a committed index
    role, term, primary, commit, last, serving, transferring, is_serving(now), peers_alive(now)

Theory of operation
-------------------
Roles (``TRANSITIONS`` below is the whole table)::

    RECOVERING --caught up with a primary--> BACKUP
    BACKUP --no primary for a while--> CANDIDATE (pre-vote, then vote)
    CANDIDATE --majority, log adopted--> PRIMARY
    CANDIDATE / PRIMARY --higher term, or a primary of my term--> BACKUP
    PRIMARY --no quorum heard for peer_timeout--> BACKUP

Terms. Every message carries the sender's term. A higher term is adopted (persisted,
vote cleared) and a primary or candidate that adopts one becomes BACKUP; messages of
an older term are refused, with a reply carrying the current term where the sender
waits for one. Two exceptions keep a node that was cut off from disrupting a healthy
triad: a pre-vote request never changes the voter's state, and a vote request refused
because the voter hears a live primary (stickiness) does not move the voter's term.

Election (bully by rank, safe by terms and majorities). A backup that has not heard a
primary of its term for ``peer_timeout * (1 + 0.5 * k)``, k being the number of live
higher-ranked peers, stands: so the highest-ranked live node stands first, and a
lower one still stands if the higher ones produce no primary. It first asks for
pre-votes for term+1 (granted by a node that is not RECOVERING and hears no live
primary); only with a majority of pre-votes does it take the term, vote for itself
(persisted) and ask for votes. A voter grants at most one vote per term, persists it
before replying, and answers with its log position. Candidates that fail retry after
a rank-staggered timeout, the higher rank first, so split votes resolve.
A node whose shell sets ``stands`` False (it cannot vouch for what it would serve:
broker/served.py) never stands, steps back at once if it is primary or candidate, and
says so in its heartbeats, so that no primary hands over to it and no lower-ranked node
waits for it; it still votes and replicates. The shell also names the peers it finds
unfit to lead (``shunned``: their clock disagrees with this node's, broker/core.py): a
primary never hands over to one, even before its own heartbeats say it does not stand.
Heartbeats carry what the shell gives for the others to compare (``wall``: the wall
clock ``on_tick`` was handed; ``setup``: the settings the triad must agree on); the
replica neither reads nor judges them.

View change (Viewstamped Replication): votes are not restricted by log length, which
is what lets the highest-ranked node win with a shorter log. Instead the winner adopts
the most up-to-date log (by (last_term, last)) among itself and its voters: if a voter
has a better one, the winner fetches it (entries after its own commit, or the voter's
image chunk by chunk, one per round trip, then entries), replaces its uncommitted tail
with it, and only then becomes PRIMARY and
appends a no-op of its term. Every committed entry is on a majority, which meets the
voting majority, so the adopted log holds every committed entry. The no-op names its
primary and the wall time (``{"k": "term", "primary": me, "at": wall}``, for the report
log) when the event that made it primary came with a wall clock reading (``wall``);
the replica reads no clock, so without one the no-op is ``None`` as before.

Replication (Raft's log rules). The primary streams appends per backup (``Progress``:
probing, then pipelined, batched up to ``max_batch``), and an append every heartbeat
even when there is nothing new, which carries the commit index. A backup refuses an
append whose ``prev`` it lacks, and otherwise truncates its log only at the first
entry whose term differs, so a stale duplicate never erases newer entries. The
primary commits an index once a majority holds it and it is of the primary's own
term (which commits everything before it). A backup commits up to
min(primary's commit, what it verified matching the primary in this term).

Serving: PRIMARY, its no-op committed, a backup heard in this term within
``peer_timeout``, and not handing over. A primary that hears no backup for
``peer_timeout`` steps down. A node alone never serves.

RECOVERING (``Durable.fresh``: the data directory was lost). The node may have voted
before losing its disk, so it neither votes nor stands. It follows a primary until
it holds the commit index that primary had at first contact and has committed an
entry of the primary's term (a new primary's commit index may lag), then becomes BACKUP
with the primary's term and a vote for it (persisted), and still refuses votes for
the next term (and does not stand in it), in which it may also have voted before.

Failback (``Timing.failback``). A serving primary that sees a live, caught-up
higher-ranked backup stops taking proposals (``transferring``), waits until the
target holds its whole log, then sends it ``timeout_now``; the target stands at once
with ``transfer`` set, which voters grant despite stickiness. Not done within
``peer_timeout``: the primary serves again and tries later.
The shell may order the nodes otherwise while running (``set_order``: the nodes' configs
disagree on the order, broker/core.py); ``agreed`` False holds failback (and ends a
hand-over under way): a hand-over toward the node this one ranks first, which ranks
another first, would be handed on without end.

Invariants (explicit raises on breach): one vote per term; a log entry at or before
the commit index is never truncated; commit never goes backwards; ``propose`` only
on a serving primary.

Shell contract: persistence effects of one cycle before its sends and before the
client answers that ``Committed`` releases. On ``RoleChanged`` away from PRIMARY the
shell rebuilds its ledger from committed state. On ``RoleChanged`` out of RECOVERING
(after persisting that cycle) it writes its "initialised" marker, so that the next
start is not ``fresh``. Effects made by the constructor (single-server start) are
returned by the first call of any entry point.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zbroker.peers import messages as m
from zbroker.peers.assembly import Piece, Receiver
from zbroker.peers.log import Log
from zbroker.peers.progress import Progress
from zbroker.peers.replication import Replication
from zbroker.peers.types import (
    CorruptState,
    Dropped,
    Durable,
    Effect,
    Entry,
    Image,
    NotServing,
    PersistEntries,
    PersistHardState,
    Publish,
    ReplicaError,
    Role,
    RoleChanged,
    Send,
    Timing,
    TruncateLog,
)

TRANSITIONS: dict[Role, frozenset[Role]] = {
    Role.RECOVERING: frozenset({Role.RECOVERING, Role.BACKUP}),
    Role.BACKUP: frozenset({Role.BACKUP, Role.CANDIDATE}),
    Role.CANDIDATE: frozenset({Role.CANDIDATE, Role.BACKUP, Role.PRIMARY}),
    Role.PRIMARY: frozenset({Role.BACKUP}),
}

NEVER = float("-inf")
FETCH_BATCHES = 8  # a fetch reply carries up to this many append batches


class IllegalTransition(ReplicaError):
    """A role change outside ``TRANSITIONS``: a bug in the replica."""


class Replica(Replication):
    """One node's election and log state. See the module docstring for the rules."""

    def __init__(
        self, me: str, ranks: Sequence[str], timing: Timing, durable: Durable, now: float
    ) -> None:
        if me not in ranks or len(set(ranks)) != len(ranks):
            raise ReplicaError(f"{me!r} must appear once in ranks {list(ranks)!r}")
        self.me = me
        self.ranks = list(ranks)
        self.rank = self.ranks.index(me)
        self.peers = [n for n in self.ranks if n != me]
        self.majority = len(self.ranks) // 2 + 1
        self.timing = timing
        self.term = durable.term
        self.voted_for = durable.voted_for
        self.log = Log(durable.snapshot, durable.entries)
        if self.log.last_term > self.term:
            raise CorruptState(f"log term {self.log.last_term} is beyond hard state {self.term}")
        self.commit = max(self.log.snap_index, min(durable.commit, self.log.last))
        self.role = Role.RECOVERING if durable.fresh and self.peers else Role.BACKUP
        self.primary: str | None = None
        self._now = now
        self._wall: float | None = None  # the wall clock at the last on_message, if given
        self._announced: tuple[Role, int, str | None] = (self.role, self.term, None)
        self._pending: list[Effect] = []
        # what we hear from peers
        self._heard: dict[str, float] = {p: NEVER for p in self.peers}  # any valid message
        # a primary's proof of quorum: acks (or granted votes) of this term, per backup
        self._acked: dict[str, float] = {p: NEVER for p in self.peers}
        self._peer_role: dict[str, Role] = {}
        # Whether this node may become primary, set by its shell (a node that cannot vouch
        # for what it would serve: broker/served.py), and what each peer's heartbeat says.
        self.stands = True
        self._peer_stands: dict[str, bool] = {}
        self.shunned: frozenset[str] = frozenset()  # peers never handed over to (the shell's)
        self.setup: dict[str, str | float] | None = None  # carried in heartbeats (the shell's)
        self.order_agreed = True  # the shell's: False holds failback (``set_order``)
        self._tick_wall: float | None = None  # the wall clock at the last on_tick, if given
        self._primary_seen = NEVER
        self._leaderless_since = now
        self._next_hb = now
        # backup: highest index known to match the primary of this term
        self._verified = 0
        # backup, recovering or candidate: the image being received, chunk by chunk
        self._receiver = Receiver()
        # candidate
        self._pre = False
        self._transfer_vote = False
        self._votes: dict[str, tuple[int, int]] = {}  # voter -> (last_term, last)
        self._deadline = NEVER
        self._fetch_from: str | None = None
        self._fetch_pos = 0
        self._fetch_last = 0
        # primary
        self._progress: dict[str, Progress] = {}
        self._last_append: tuple[tuple[int, ...], dict[str, Any]] | None = None
        self._noop_index = 0
        self._transfer_to: str | None = None
        self._transfer_deadline = NEVER
        self._failback_after = NEVER
        # recovering
        self._recover_target: int | None = None
        self._no_vote_through = 0
        if not self.peers:
            self._start_single()

    def set_order(self, ranks: Sequence[str], *, agreed: bool) -> None:
        """Rank the same nodes in another order from now on (the shell's word); while
        ``agreed`` is False no hand-over by failback starts, and one under way ends (its
        target may still stand on a ``timeout_now`` already sent: one election at most)."""
        if sorted(ranks) != sorted(self.ranks):
            raise ReplicaError(f"order {list(ranks)!r} must name the nodes {self.ranks!r}")
        self.ranks = list(ranks)
        self.rank = self.ranks.index(self.me)
        self.order_agreed = agreed
        if not agreed and self._transfer_to is not None:
            self._transfer_to = None
            self._failback_after = self._now + 4 * self.timing.peer_timeout

    # --- reading ----------------------------------------------------------------------

    @property
    def last(self) -> int:
        return self.log.last

    @property
    def transferring(self) -> bool:
        return self._transfer_to is not None

    @property
    def serving(self) -> bool:
        """``is_serving`` as of the last event handled."""
        return self.is_serving(self._now)

    def is_serving(self, now: float) -> bool:
        if (
            self.role is not Role.PRIMARY
            or self.commit < self._noop_index
            or self.transferring
            or not self.stands
        ):
            return False
        return self._quorum_heard(now)

    def peers_alive(self, now: float) -> list[str]:
        return [p for p in self.peers if now - self._heard[p] < self.timing.peer_timeout]

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Log entries with lo <= index <= hi that this node still holds."""
        return self.log.slice(lo, hi)

    # --- entry points -----------------------------------------------------------------

    def on_tick(self, now: float, wall: float | None = None) -> list[Effect]:
        self._now = now
        self._tick_wall = wall
        self.log.trim()  # what a compaction left to drop, a step a tick
        out = self._take_pending()
        if not self.peers:
            return out
        beat = now >= self._next_hb
        if beat:
            self._next_hb = max(self._next_hb + self.timing.heartbeat_interval, now)
            out.append(Publish(self._heartbeat().to_wire()))
        if not self.stands and self.role in (Role.PRIMARY, Role.CANDIDATE):
            self._stand_down(now, out)
        if self.role is Role.PRIMARY:
            self._primary_tick(now, beat, out)
        elif self.role is Role.CANDIDATE:
            self._candidate_tick(now, beat, out)
        elif self.role is Role.BACKUP:
            self._backup_tick(now)
            if self.role is Role.CANDIDATE:
                self._start_pre_vote(now, out)
        self._announce(out)
        return out

    def on_message(
        self, sender: str, msg: object, now: float, wall: float | None = None
    ) -> list[Effect]:
        self._now = now
        self._wall = wall
        out = self._take_pending()
        if sender not in self._heard:
            out.append(Dropped(str(sender)[:64], "unknown sender"))
            return out
        parsed = m.validate(msg)
        if parsed is None:
            out.append(Dropped(sender, "malformed message"))
            return out
        try:
            self._handle(sender, parsed, now, out)
        except ReplicaError as exc:
            # a well-formed message that contradicts committed state: a hostile or broken
            # peer; refusing it keeps our state as it was before the message
            out.append(Dropped(sender, f"refused: {exc}"))
        self._announce(out)
        return out

    def on_peer_lost(self, peer: str, now: float) -> list[Effect]:
        """The shell saw its connection to ``peer`` drop: that process is gone.

        A killed process's sockets are closed by its kernel at once, so this comes long
        before ``peer_timeout``; a paused one keeps its connections and is found by the
        timeout as before. Only timing changes: the peer counts as unheard, and if it
        was the primary the election may start at the next tick (still in rank order:
        a lower-ranked node waits for live higher-ranked ones). Terms and votes decide
        who wins, so a spurious call costs an election at most, never safety.
        """
        self._now = now
        out = self._take_pending()
        if peer not in self._heard:
            return out
        self._heard[peer] = NEVER
        self._acked[peer] = NEVER
        if peer == self.primary and self.role is not Role.PRIMARY:
            self._primary_seen = NEVER
            self._leaderless_since = min(self._leaderless_since, now - self.timing.peer_timeout)
        return out

    def propose(self, deltas: list[dict[str, Any]], now: float) -> tuple[list[int], list[Effect]]:
        """Append deltas as a serving primary; returns their log indexes and the effects."""
        self._now = now
        if not self.is_serving(now):
            raise NotServing(f"{self.me} is {self.role.value} and not serving")
        out = self._take_pending()
        first = self.log.last + 1
        new = [Entry(self.term, first + i, d) for i, d in enumerate(deltas)]
        self.log.append(new)
        out.append(PersistEntries(tuple(new)))
        if self.peers:
            for p in self.peers:
                self._pump(p, out)
        else:
            self._commit_to(self.log.last, out)
        return [e.index for e in new], out

    def compacted(self, image: Image) -> None:
        """The shell took ``image`` of its ledger at a committed index; keep only a tail
        (and the entries after any older image still being sent to a backup)."""
        if image.index > self.commit:
            raise ReplicaError(
                f"snapshot at {image.index} is beyond the commit index {self.commit}"
            )
        self.log.compact(image, self.timing.keep_tail, self._held_images())

    # --- dispatch ---------------------------------------------------------------------

    def _handle(self, sender: str, msg: m.Message, now: float, out: list[Effect]) -> None:
        self._heard[sender] = now
        if isinstance(msg, m.Heartbeat) and msg.node != sender:
            out.append(Dropped(sender, "heartbeat in another node's name"))
            return
        if isinstance(msg, m.VoteRequest) and msg.candidate != sender:
            out.append(Dropped(sender, "vote request in another node's name"))
            return
        if msg.term > self.term and self._adopts(msg, now):
            self._adopt_term(msg.term, now, out)
        if (msg.term == self.term and isinstance(msg, m.AppendAck | m.SnapshotAck)) or (
            isinstance(msg, m.Vote) and msg.granted and not msg.pre and msg.req_term == self.term
        ):
            # only answers to what we sent prove that a backup hears us; its heartbeats
            # do not (a one-way partition would let a deaf majority look present)
            self._acked[sender] = now
        if isinstance(msg, m.Heartbeat):
            self._on_heartbeat(sender, msg, now, out)
        elif isinstance(msg, m.VoteRequest):
            self._on_vote_request(sender, msg, now, out)
        elif isinstance(msg, m.Vote):
            self._on_vote(sender, msg, now, out)
        elif isinstance(msg, m.Append):
            self._on_append(sender, msg, now, out)
        elif isinstance(msg, m.Snapshot):
            self._on_snapshot(sender, msg, now, out)
        elif isinstance(msg, m.AppendAck):
            self._on_append_ack(sender, msg, now, out)
        elif isinstance(msg, m.SnapshotAck):
            self._on_snapshot_ack(sender, msg, out)
        elif isinstance(msg, m.TimeoutNow):
            if (
                msg.term == self.term
                and sender == self.primary
                and self.role is Role.BACKUP
                and self.stands
            ):
                self._start_election(now, out, transfer=True)
        elif isinstance(msg, m.Fetch):
            self._on_fetch(sender, msg, now, out)
        else:
            self._on_fetch_reply(sender, msg, now, out)

    def _adopts(self, msg: m.Message, now: float) -> bool:
        """Whether a higher term in ``msg`` moves this node to that term."""
        if isinstance(msg, m.VoteRequest):
            # pre-votes change nothing; a vote refused for stickiness changes nothing either
            return not msg.pre and (msg.transfer or not self._primary_recent(now))
        return True

    # --- roles and terms --------------------------------------------------------------

    def _set_role(self, role: Role) -> None:
        if role not in TRANSITIONS[self.role]:
            raise IllegalTransition(f"{self.role.value} -> {role.value}")
        if self.role is Role.PRIMARY:
            self._progress = {}
            self._transfer_to = None
        if role is Role.PRIMARY:
            self._receiver.drop()  # a primary receives no image: free its bytes
        if role is not Role.CANDIDATE:
            self._fetch_from = None
            self._votes = {}
        self.role = role

    def _announce(self, out: list[Effect]) -> None:
        state = (self.role, self.term, self.primary)
        if state != self._announced:
            self._announced = state
            out.append(RoleChanged(*state))

    def _adopt_term(self, term: int, now: float, out: list[Effect]) -> None:
        self.term, self.voted_for = term, None
        out.append(PersistHardState(term, None))
        self.primary = None
        self._verified = 0
        self._recover_target = None
        self._leaderless_since = now
        if self.role in (Role.PRIMARY, Role.CANDIDATE):
            self._set_role(Role.BACKUP)
        self._announce(out)

    def _follow(self, sender: str, now: float, out: list[Effect]) -> None:
        """``sender`` acts as primary of my term: accept it as such."""
        if self.role is Role.PRIMARY:
            raise ReplicaError(f"{sender} claims to be primary of my term {self.term}")
        if self.primary is not None and sender != self.primary:
            # One primary per term: a second one in the same term is forged or broken.
            raise ReplicaError(
                f"{sender} acts as primary of term {self.term}, which is {self.primary}'s"
            )
        if self.role is Role.CANDIDATE:
            self._set_role(Role.BACKUP)
        self.primary = sender
        self._primary_seen = now
        self._leaderless_since = now
        self._announce(out)

    def _primary_recent(self, now: float) -> bool:
        """Whether a live primary of my term is known (the stickiness rule)."""
        if self.role is Role.PRIMARY:
            return True
        return self.primary is not None and now - self._primary_seen < self.timing.peer_timeout

    def _quorum_heard(self, now: float) -> bool:
        recent = sum(1 for p in self.peers if now - self._acked[p] < self.timing.peer_timeout)
        return recent + 1 >= self.majority

    def _take_pending(self) -> list[Effect]:
        out, self._pending = self._pending, []
        return out

    def _heartbeat(self) -> m.Heartbeat:
        return m.Heartbeat(
            self.term,
            self.me,
            self.role,
            self.log.last,
            self.log.last_term,
            self.commit,
            self.primary,
            self.stands,
            self._tick_wall,
            self.setup,
        )

    def _stand_down(self, now: float, out: list[Effect]) -> None:
        """The shell says this node may not lead (``stands``): a primary or a candidate
        steps back at once; the others elect among themselves, with its vote."""
        self._set_role(Role.BACKUP)
        self.primary = None
        self._leaderless_since = now
        self._announce(out)

    def _start_single(self) -> None:
        """One SERVER line: primary at once, everything on disk committed."""
        self.term = max(self.term, 1)
        self.voted_for = self.me
        self._pending.append(PersistHardState(self.term, self.me))
        self._set_role(Role.CANDIDATE)
        self._set_role(Role.PRIMARY)
        self.primary = self.me
        self._announce(self._pending)
        self._commit_to(self.log.last, self._pending)

    # --- heartbeats -------------------------------------------------------------------

    def _on_heartbeat(self, sender: str, hb: m.Heartbeat, now: float, out: list[Effect]) -> None:
        self._peer_role[sender] = hb.role
        self._peer_stands[sender] = hb.stands
        if hb.term != self.term or hb.role is not Role.PRIMARY or hb.primary != sender:
            return
        self._follow(sender, now, out)
        if self.role is Role.RECOVERING and self._recover_target is None:
            self._recover_target = hb.commit
        self._commit_as_backup(hb.commit, out)
        self._check_recovered(out)

    # --- election ---------------------------------------------------------------------

    def _backup_tick(self, now: float) -> None:
        if self._primary_recent(now) or not self.stands:
            return
        higher_alive = sum(
            1
            for p in self.peers_alive(now)
            if self.ranks.index(p) < self.rank
            and self._peer_role.get(p) is not Role.RECOVERING
            and self._peer_stands.get(p, True)
        )
        wait = self.timing.peer_timeout * (1 + 0.5 * higher_alive)
        if now - self._leaderless_since >= wait:
            self._set_role(Role.CANDIDATE)

    def _candidate_wait(self) -> float:
        # the higher rank retries first, which settles split votes without randomness
        return self.timing.peer_timeout * (1 + 0.5 * self.rank)

    def _start_pre_vote(self, now: float, out: list[Effect]) -> None:
        self._pre, self._transfer_vote = True, False
        self.primary = None  # not heard for a while: stale, and shown as unknown
        self._votes = {self.me: (self.log.last_term, self.log.last)}
        self._fetch_from = None
        self._deadline = now + self._candidate_wait()
        self._ask_votes(out, only_missing=False)

    def _start_election(self, now: float, out: list[Effect], *, transfer: bool) -> None:
        if self.role is Role.BACKUP:
            self._set_role(Role.CANDIDATE)
        self._pre, self._transfer_vote = False, transfer
        self.term = self._next_term()
        self.voted_for = self.me
        self.primary = None
        self._verified = 0
        out.append(PersistHardState(self.term, self.me))
        self._announce(out)
        self._votes = {self.me: (self.log.last_term, self.log.last)}
        self._fetch_from = None
        self._deadline = now + self._candidate_wait()
        self._ask_votes(out, only_missing=False)

    def _next_term(self) -> int:
        # a recovered node skips the term it may have voted in before losing its disk
        return max(self.term + 1, self._no_vote_through + 1)

    def _ask_votes(self, out: list[Effect], *, only_missing: bool) -> None:
        term = self._next_term() if self._pre else self.term
        req = m.VoteRequest(
            term, self.me, self.log.last, self.log.last_term, self._transfer_vote, self._pre
        ).to_wire()
        for p in self.peers:
            if not (only_missing and p in self._votes):
                out.append(Send(p, req))

    def _candidate_tick(self, now: float, beat: bool, out: list[Effect]) -> None:
        if now >= self._deadline:
            self._start_pre_vote(now, out)
        elif beat and self._fetch_from is not None:
            self._send_fetch(out)
        elif beat:
            self._ask_votes(out, only_missing=True)

    def _on_vote_request(
        self, sender: str, req: m.VoteRequest, now: float, out: list[Effect]
    ) -> None:
        eligible = (
            self.role is not Role.RECOVERING
            and req.term > self._no_vote_through
            and (req.transfer or not self._primary_recent(now))
        )
        if req.pre:
            granted = eligible and req.term > self.term
        else:
            granted = eligible and req.term == self.term and self.voted_for in (None, sender)
            if granted and self.voted_for is None:
                self.voted_for = sender
                out.append(PersistHardState(self.term, sender))
            if granted:
                self._leaderless_since = now  # give the candidate time before standing
        vote = m.Vote(
            self.term,
            req.term,
            granted,
            req.pre,
            self.log.last,
            self.log.last_term,
            self.commit,
        )
        out.append(Send(sender, vote.to_wire()))

    def _on_vote(self, sender: str, vote: m.Vote, now: float, out: list[Effect]) -> None:
        if self.role is not Role.CANDIDATE or vote.pre != self._pre or not vote.granted:
            return
        if vote.req_term != (self._next_term() if self._pre else self.term):
            return
        if self._fetch_from is not None or sender in self._votes:
            return
        self._votes[sender] = (vote.last_term, vote.last)
        if len(self._votes) < self.majority:
            return
        if self._pre:
            self._start_election(now, out, transfer=False)
        else:
            self._won(now, out)

    def _won(self, now: float, out: list[Effect]) -> None:
        """A majority voted for me: adopt the best log among us, then lead."""
        mine = (self.log.last_term, self.log.last)
        best = max(self._votes.items(), key=lambda kv: (kv[1], kv[0] == self.me))
        if best[1] <= mine:
            self._become_primary(now, out)
            return
        self._fetch_from = best[0]
        self._fetch_last = best[1][1]
        self._fetch_pos = self.commit + 1
        self._deadline = now + self._candidate_wait()
        if self._receiver.held_from(best[0]) == (0, 0):
            self._receiver.drop()  # another node's image: the voter sends its own
        self._send_fetch(out)

    def _send_fetch(self, out: list[Effect]) -> None:
        if self._fetch_from is None:
            return
        offset, snap_index = self._receiver.held_from(self._fetch_from)
        req = m.Fetch(self.term, self._fetch_pos, offset, snap_index)
        out.append(Send(self._fetch_from, req.to_wire()))

    def _on_fetch(self, sender: str, req: m.Fetch, now: float, out: list[Effect]) -> None:
        if req.term < self.term:
            empty = m.FetchReply(self.term, 0, 0, (), 0, None)
            out.append(Send(sender, empty.to_wire()))
            return
        if self.voted_for != sender or self.role is not Role.BACKUP:
            return
        self._leaderless_since = now  # the candidate is making progress
        prev = req.from_index - 1
        if prev > self.log.last:
            return  # asks beyond my log: not from a candidate that saw my vote
        prev_term = self.log.term_at(prev) if prev >= self.log.base_index else None
        chunk = None
        if prev_term is None:
            image = self.log.snapshot
            if image is None:
                return  # cannot be: entries before the base are covered by a snapshot
            # the candidate's offset counts only in this very image (mine may be newer)
            same = req.snap_index == image.index and req.offset < image.size
            offset = req.offset if same else 0
            data = image.chunk(offset, self.timing.snapshot_chunk)
            chunk = m.Chunk(offset, image.size, image.crc, data)
            prev, prev_term = image.index, image.term
            if offset + len(data) < image.size:
                reply = m.FetchReply(self.term, prev, prev_term, (), self.log.last, chunk)
                out.append(Send(sender, reply.to_wire()))
                return
        # a view change waits on this transfer: send more per round trip than an append
        batch = tuple(self.log.slice(prev + 1, prev + FETCH_BATCHES * self.timing.max_batch))
        reply = m.FetchReply(self.term, prev, prev_term, batch, self.log.last, chunk)
        out.append(Send(sender, reply.to_wire()))

    def _on_fetch_reply(
        self, sender: str, rep: m.FetchReply, now: float, out: list[Effect]
    ) -> None:
        if self.role is not Role.CANDIDATE or sender != self._fetch_from or rep.term != self.term:
            return
        self._acked[sender] = now  # a voter answering this term's fetch hears us
        if rep.snapshot is not None:
            if rep.prev_index <= self.commit:
                return  # a duplicate: that image is installed (or not needed)
            c = rep.snapshot
            piece = Piece(rep.prev_index, rep.prev_term, c.offset, c.size, c.crc, c.data)
            got = self._receiver.offer(sender, rep.term, piece, out)
            if got.image is None:
                if got.taken:  # ask for the next chunk (or from 0 after a bad crc)
                    self._deadline = now + self._candidate_wait()
                    self._send_fetch(out)
                elif not self._receiver.holds(piece):
                    self._receiver.drop()  # another image than the one held: from 0
                    self._send_fetch(out)
                return  # a duplicate: the next beat asks again if the answer was lost
            self._install(got.image, out)
        elif rep.prev_index != self._fetch_pos - 1:
            return  # a duplicate of an earlier batch
        if not self._holds(rep.prev_index, rep.prev_term):
            return
        self._merge(list(rep.entries), out)
        self._fetch_pos = rep.prev_index + len(rep.entries) + 1
        self._fetch_last = rep.last
        self._deadline = now + self._candidate_wait()
        if self._fetch_pos <= self._fetch_last:
            self._send_fetch(out)
            return
        if self.log.last > self._fetch_last:
            self.log.truncate_from(self._fetch_last + 1)
            out.append(TruncateLog(self._fetch_last + 1))
        self._become_primary(now, out)

    def _become_primary(self, now: float, out: list[Effect]) -> None:
        for voter in self._votes:
            if voter != self.me:
                # they answered this term's election (and fetches): count them as heard,
                # however long adopting the log took, until their acks take over
                self._acked[voter] = max(self._acked[voter], now)
        self._set_role(Role.PRIMARY)
        self.primary = self.me
        start = self.log.last + 1
        self._progress = {p: Progress(next_index=start) for p in self.peers}
        named = None if self._wall is None else {"k": "term", "primary": self.me, "at": self._wall}
        noop = Entry(self.term, start, named)
        self.log.append([noop])
        self._noop_index = noop.index
        self._failback_after = now + self.timing.peer_timeout
        out.append(PersistEntries((noop,)))
        self._announce(out)
        self._next_hb = now  # tell everyone at once, not a heartbeat later
        for p in self.peers:
            self._send_append(p, out)

    # --- recovering -------------------------------------------------------------------

    def _check_recovered(self, out: list[Effect]) -> None:
        """RECOVERING -> BACKUP once this node holds everything committed so far.

        Two conditions: the commit index covers an entry of the primary's own term (so,
        by the log rules, every entry committed in earlier terms is held: a new
        primary's commit index alone can lag behind them), and it reached the commit
        the primary reported at first contact (entries committed in this term, possibly
        with acks this node sent before it lost its disk).
        """
        if self.role is not Role.RECOVERING or self._recover_target is None:
            return
        if self.primary is None or self.commit < self._recover_target:
            return
        if self.log.term_at(self.commit) != self.term:
            return
        self._set_role(Role.BACKUP)
        self.voted_for = self.primary
        self._no_vote_through = self.term + 1
        out.append(PersistHardState(self.term, self.primary))
        self._announce(out)
