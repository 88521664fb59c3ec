"""Log replication, both ends: the primary streaming appends, the backup taking them.

This is the half of ``Replica`` that moves log entries; ``peers/replica.py`` holds the
roles, terms and election, and documents the rules for both halves. It is a base
class only to keep each file readable in one sitting: the state it uses is created
by ``Replica.__init__`` and declared here.

Primary side: per backup a ``Progress`` (probing, then pipelined streaming). Every
heartbeat each backup gets an append from its ``next_index`` (empty when it has
everything: that carries the commit index and keeps the quorum check fed). A backup
whose ``next_index`` falls at or before the log's base gets the primary's image
instead, in ``snapshot`` chunks with flow control (``progress.Transfer``: a window of
chunks, acknowledged by ``snapshot_ack``, resent on a refusal or a stall). The backup
answers the last chunk with an ok append ack at the image's index and streams from
there. The commit index moves to the highest index held by a majority, only if that
entry is of the current term.

Backup side: an append is taken only if the backup holds ``prev``; entries before
its base count as held, since they are committed and committed prefixes agree.
Matching entries are never rewritten; the log is cut at the first entry whose term
differs, and never at or before the commit index (that would be a hostile or broken
primary: the append is refused and nothing changes). Snapshot chunks are assembled in
order (``peers/assembly.py``); a complete, sound image is installed.
"""

from __future__ import annotations

from typing import Any

from zbroker.peers import messages as m
from zbroker.peers.assembly import Piece, Receiver
from zbroker.peers.log import Log
from zbroker.peers.progress import Progress, Transfer
from zbroker.peers.types import (
    Committed,
    Effect,
    Entry,
    Image,
    InstallSnapshot,
    PersistEntries,
    PersistSnapshot,
    ReplicaError,
    Role,
    Send,
    Timing,
    TruncateLog,
)

WINDOW_BATCHES = 8  # appends in flight per backup before waiting for acks


class Replication:
    """Replication half of ``Replica`` (see the module docstring)."""

    me: str
    ranks: list[str]
    rank: int
    peers: list[str]
    majority: int
    timing: Timing
    term: int
    role: Role
    primary: str | None
    log: Log
    commit: int
    _now: float
    _verified: int
    _recover_target: int | None
    _progress: dict[str, Progress]
    _receiver: Receiver
    _last_append: tuple[tuple[int, ...], dict[str, Any]] | None
    _peer_role: dict[str, Role]
    _peer_stands: dict[str, bool]  # what each peer's heartbeat says (Replica.stands)
    shunned: frozenset[str]  # peers the shell finds unfit to lead (Replica.shunned)
    order_agreed: bool  # False: the nodes' orders differ, no failback (Replica.set_order)
    _leaderless_since: float
    _transfer_to: str | None
    _transfer_deadline: float
    _failback_after: float

    # provided by Replica
    def _follow(self, sender: str, now: float, out: list[Effect]) -> None:
        raise NotImplementedError

    def _check_recovered(self, out: list[Effect]) -> None:
        raise NotImplementedError

    def _set_role(self, role: Role) -> None:
        raise NotImplementedError

    def _announce(self, out: list[Effect]) -> None:
        raise NotImplementedError

    def _quorum_heard(self, now: float) -> bool:
        raise NotImplementedError

    def is_serving(self, now: float) -> bool:
        raise NotImplementedError

    def peers_alive(self, now: float) -> list[str]:
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------

    def _commit_to(self, index: int, out: list[Effect]) -> None:
        index = min(index, self.log.last)
        if index <= self.commit:
            return
        newly = tuple(self.log.slice(self.commit + 1, index))
        self.commit = index
        out.append(Committed(index, newly))

    def _holds(self, prev_index: int, prev_term: int) -> bool:
        if prev_index <= self.log.base_index:
            return True  # committed (base <= snapshot <= commit): committed prefixes agree
        return self.log.term_at(prev_index) == prev_term

    def _merge(self, entries: list[Entry], out: list[Effect]) -> None:
        cut, fresh = self.log.merge(entries, floor=self.commit)
        if cut is not None:
            out.append(TruncateLog(cut))
        if fresh:
            out.append(PersistEntries(tuple(fresh)))

    def _install(self, image: Image, out: list[Effect]) -> None:
        if image.index <= self.commit:
            raise ReplicaError(f"snapshot at {image.index} is not past my commit {self.commit}")
        dropped_tail = self.log.install(image)
        out.append(PersistSnapshot(image))
        if dropped_tail:
            out.append(TruncateLog(image.index + 1))
        out.append(InstallSnapshot(image))
        self.commit = image.index

    # --- backup side ------------------------------------------------------------------

    def _on_append(self, sender: str, msg: m.Append, now: float, out: list[Effect]) -> None:
        if not self._primary_of_my_term(sender, msg.term, msg.prev_index, now, out):
            return
        if self.role is Role.RECOVERING and self._recover_target is None:
            self._recover_target = msg.commit
        if not self._holds(msg.prev_index, msg.prev_term):
            refuse = m.AppendAck(self.term, False, 0, msg.prev_index, self.log.last, self.commit)
            out.append(Send(sender, refuse.to_wire()))
            return
        self._merge(list(msg.entries), out)
        match = msg.prev_index + len(msg.entries)
        self._verified = max(self._verified, match)
        self._commit_as_backup(msg.commit, out)
        self._ack(sender, match, msg.prev_index, out)

    def _on_snapshot(self, sender: str, msg: m.Snapshot, now: float, out: list[Effect]) -> None:
        """One chunk of the primary's image: taken in order; the last one installs it."""
        if not self._primary_of_my_term(sender, msg.term, msg.index, now, out):
            return
        if self.role is Role.RECOVERING and self._recover_target is None:
            self._recover_target = msg.index
        if msg.index <= self.commit:
            # installed already (the ack was lost), or the log caught up past it
            current = self._receiver.current
            if current is not None and current.index <= self.commit:
                self._receiver.drop()
        else:
            piece = Piece(msg.index, msg.term_at, msg.offset, msg.size, msg.crc, msg.data)
            got = self._receiver.offer(sender, msg.term, piece, out)
            if got.image is None:
                ack = m.SnapshotAck(self.term, msg.index, got.held)
                out.append(Send(sender, ack.to_wire()))
                return
            self._install(got.image, out)
        self._verified = max(self._verified, msg.index)
        self._ack(sender, msg.index, msg.index, out)

    def _primary_of_my_term(
        self, sender: str, term: int, prev: int, now: float, out: list[Effect]
    ) -> bool:
        """Whether ``sender`` may append to me: the primary of my term (followed from now
        on). An older term is refused with mine, so that a deposed primary steps down."""
        if term < self.term:
            refuse = m.AppendAck(self.term, False, 0, prev, self.log.last, self.commit)
            out.append(Send(sender, refuse.to_wire()))
            return False
        self._follow(sender, now, out)
        return True

    def _ack(self, sender: str, match: int, prev: int, out: list[Effect]) -> None:
        ack = m.AppendAck(self.term, True, match, prev, self.log.last, self.commit)
        out.append(Send(sender, ack.to_wire()))
        self._check_recovered(out)

    def _commit_as_backup(self, primary_commit: int, out: list[Effect]) -> None:
        # only what was verified against this term's primary may be committed: entries
        # beyond it may be a deposed primary's leftovers that this primary will cut
        self._commit_to(min(primary_commit, self._verified), out)

    # --- primary side -----------------------------------------------------------------

    def _on_append_ack(self, sender: str, ack: m.AppendAck, now: float, out: list[Effect]) -> None:
        if self.role is not Role.PRIMARY or ack.term != self.term:
            return
        pr = self._progress[sender]
        if ack.ok:
            if ack.match > self.log.last:
                raise ReplicaError(f"ack for {ack.match}, beyond my last {self.log.last}")
            pr.acked(ack.match)
            self._primary_commit(out)
            if sender == self._transfer_to:
                self._send_timeout_now(out)
            self._pump(sender, out)
        elif pr.rejected(ack.prev_index, ack.last, ack.commit):
            pr.next_index = min(pr.next_index, self.log.last + 1)
            self._send_append(sender, out)

    def _on_snapshot_ack(self, sender: str, ack: m.SnapshotAck, out: list[Effect]) -> None:
        if self.role is not Role.PRIMARY or ack.term != self.term:
            return
        pr = self._progress[sender]
        if pr.transfer is None or pr.transfer.image.index != ack.index:
            return  # a transfer that ended (or another image's): the stream goes on
        pr.transfer.on_ack(ack.offset, self._now, self.timing.heartbeat_interval)
        self._send_chunks(sender, pr, out)

    def _primary_commit(self, out: list[Effect]) -> None:
        held = sorted([self.log.last, *(p.match for p in self._progress.values())], reverse=True)
        index = held[self.majority - 1]
        # Raft's rule: count replicas only for entries of my own term
        if index > self.commit and self.log.term_at(index) == self.term:
            self._commit_to(index, out)

    def _pump(self, peer: str, out: list[Effect]) -> None:
        """Stream what ``peer`` lacks, pipelined, within the in-flight window."""
        pr = self._progress[peer]
        window = WINDOW_BATCHES * self.timing.max_batch
        while not pr.probing and pr.next_index <= self.log.last and pr.in_flight() < window:
            self._send_append(peer, out)

    def _send_append(self, peer: str, out: list[Effect], *, heartbeat: bool = False) -> None:
        """Send ``peer`` its probe, its next batch, or (``heartbeat``) an empty append.

        A streaming heartbeat is anchored at ``match``, which the backup surely holds,
        so it carries the commit index without ever being rejected while appends are in
        flight; lost appends are caught by ``Progress.beat`` instead.
        """
        pr = self._progress[peer]
        streaming_beat = heartbeat and not pr.probing
        prev = pr.match if streaming_beat else pr.next_index - 1
        prev_term = self.log.term_at(prev) if prev >= self.log.base_index else None
        if prev_term is None:
            self._send_snapshot(peer, pr, out)
            return
        pr.transfer = None  # the log serves it now (a reject placed it after the base)
        batch: tuple[Entry, ...] = ()
        if not streaming_beat:
            batch = tuple(self.log.slice(prev + 1, prev + self.timing.max_batch))
        out.append(Send(peer, self._append_wire(prev, prev_term, batch)))
        if pr.probing:
            pr.probe_prev = prev
        else:
            pr.next_index += len(batch)

    def _append_wire(self, prev: int, prev_term: int, batch: tuple[Entry, ...]) -> dict[str, Any]:
        """The append's wire map, the same object for both backups when they are in step.

        Backups that are level get the same append; building (and, in the shell, packing)
        it once per batch instead of once per backup. Reuse is safe because within one
        term the primary's log never changes at an index it holds, and every field that
        tells two appends apart is in the key; wire maps are never mutated.
        """
        last = batch[-1].index if batch else prev
        key = (self.term, prev, prev_term, last, self.commit)
        if self._last_append is not None and self._last_append[0] == key:
            return self._last_append[1]
        wire = m.Append(self.term, prev, prev_term, batch, self.commit).to_wire()
        self._last_append = (key, wire)
        return wire

    def _send_snapshot(self, peer: str, pr: Progress, out: list[Effect]) -> None:
        """``peer`` needs entries the log no longer holds: send it the image, or go on."""
        if pr.transfer is None:
            if self.log.snapshot is None:
                raise ReplicaError(
                    f"{peer} needs entries before {self.log.base_index} and no snapshot"
                )
            pr.transfer = Transfer(
                self.log.snapshot, self.timing.snapshot_chunk, progress_at=self._now
            )
        pr.probing = True
        pr.probe_prev = pr.transfer.image.index
        self._send_chunks(peer, pr, out)

    def _send_chunks(self, peer: str, pr: Progress, out: list[Effect]) -> None:
        t = pr.transfer
        if t is None:
            return
        img = t.image
        for offset, data in t.due(self._now, self.timing.peer_timeout):
            chunk = m.Snapshot(self.term, img.index, img.term, offset, img.size, img.crc, data)
            out.append(Send(peer, chunk.to_wire()))

    def _held_images(self) -> int | None:
        """The lowest index of an image being sent: the log keeps the entries after it."""
        sending = [pr.transfer.image.index for pr in self._progress.values() if pr.transfer]
        return min(sending, default=None)

    def _primary_tick(self, now: float, beat: bool, out: list[Effect]) -> None:
        if not self._quorum_heard(now):
            # cut off: stop granting at once; the others elect among themselves
            self._set_role(Role.BACKUP)
            self.primary = None
            self._leaderless_since = now
            self._announce(out)
            return
        if beat:
            for peer, pr in self._progress.items():
                pr.beat()  # probing again if the stream stalled
                self._send_append(peer, out, heartbeat=True)  # probing: the probe again
                self._pump(peer, out)
        self._failback(now, out)

    # --- failback ---------------------------------------------------------------------

    def _failback(self, now: float, out: list[Effect]) -> None:
        if self._transfer_to is not None:
            if now >= self._transfer_deadline:
                self._transfer_to = None  # hand-over failed: serve again, retry later
                self._failback_after = now + 4 * self.timing.peer_timeout
            else:
                self._send_timeout_now(out)
            return
        if (
            not self.timing.failback
            or not self.order_agreed
            or now < self._failback_after
            or not self.is_serving(now)
        ):
            return
        alive = self.peers_alive(now)
        for peer in self.ranks[: self.rank]:
            caught_up = self._progress[peer].match >= self.log.last - self.timing.max_batch
            # never hand over to who may not lead, by its word or by this node's shell's
            stands = self._peer_stands.get(peer, True) and peer not in self.shunned
            if peer in alive and self._peer_role.get(peer) is Role.BACKUP and caught_up and stands:
                self._transfer_to = peer
                self._transfer_deadline = now + self.timing.peer_timeout
                self._send_timeout_now(out)
                return

    def _send_timeout_now(self, out: list[Effect]) -> None:
        target = self._transfer_to
        if target in self.shunned:
            return  # found unfit since: the hand-over lapses at its deadline
        if target is not None and self._progress[target].match >= self.log.last:
            out.append(Send(target, m.TimeoutNow(self.term).to_wire()))
