"""Focused tests of the replica state machine, with a fake clock and a lock-step network."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zbroker.peers import messages
from zbroker.peers.log import TRIM_STEP, Log
from zbroker.peers.progress import SNAPSHOT_WINDOW
from zbroker.peers.replica import Replica
from zbroker.peers.types import (
    MAX_SNAPSHOT_CHUNK,
    SNAPSHOT_CHUNK,
    Committed,
    Dropped,
    Durable,
    Effect,
    Entry,
    Image,
    InstallSnapshot,
    NotServing,
    PersistEntries,
    PersistHardState,
    PersistSnapshot,
    PersistSnapshotChunk,
    Publish,
    Role,
    RoleChanged,
    Send,
    Timing,
    TruncateLog,
)

pytestmark = pytest.mark.unit

NAMES = ("alpha", "beta", "gamma")
T = Timing(heartbeat_interval=0.1, peer_timeout=0.5)


# What a hook does to a message on its way: the maps to deliver instead (none: lost; two:
# duplicated; another: changed in transit).
Hook = Callable[[str, str, dict[str, Any]], list[dict[str, Any]]]


class Triad:
    """Replicas wired by an instant, lossless network; ``down`` and ``blocked`` cut links,
    ``hook`` loses, duplicates or changes messages. Every snapshot chunk sent is checked
    against the window: it ends at most ``SNAPSHOT_WINDOW`` chunks past the highest offset
    its receiver acknowledged so far."""

    def __init__(
        self,
        durables: dict[str, Durable] | None = None,
        timing: Timing = T,
        down: set[str] | None = None,
    ) -> None:
        self.now = 0.0
        self.timing = timing
        self.durables = durables or {}
        self.down: set[str] = set(down or ())
        self.blocked: set[tuple[str, str]] = set()
        self.reps = {n: self._make(n) for n in NAMES}
        self.queue: deque[tuple[str, str, dict[str, Any]]] = deque()
        self.seen: dict[str, list[Effect]] = {n: [] for n in NAMES}
        self.hook: Hook | None = None
        self.acked: dict[tuple[str, str, int], int] = {}  # (primary, backup, index) -> offset
        self.chunks: list[tuple[str, str, dict[str, Any]]] = []  # every chunk sent, in order

    def _make(self, name: str) -> Replica:
        return Replica(name, NAMES, self.timing, self.durables.get(name, Durable()), self.now)

    def restart(self, name: str, durable: Durable) -> None:
        self.durables[name] = durable
        self.reps[name] = self._make(name)
        self.down.discard(name)

    def do(self, name: str, effects: list[Effect]) -> None:
        self.seen[name].extend(effects)
        for e in effects:
            if isinstance(e, Send):
                if e.msg["t"] == "snapshot":
                    self._check_window(name, e.to, e.msg)
                self.queue.append((name, e.to, e.msg))
            elif isinstance(e, Publish):
                for peer in NAMES:
                    if peer != name:
                        self.queue.append((name, peer, e.msg))

    def _check_window(self, src: str, dst: str, msg: dict[str, Any]) -> None:
        self.chunks.append((src, dst, msg))
        acked = self.acked.get((src, dst, msg["index"]), 0)
        chunk = self.timing.snapshot_chunk
        assert len(msg["data"]) <= chunk
        assert msg["offset"] + len(msg["data"]) <= acked + SNAPSHOT_WINDOW * chunk

    def _note_ack(self, src: str, dst: str, msg: dict[str, Any]) -> None:
        if msg["t"] == "snapshot_ack":
            key = (dst, src, msg["index"])
            self.acked[key] = max(self.acked.get(key, 0), msg["offset"])

    def step(self, dt: float = 0.01) -> None:
        self.now += dt
        for name in NAMES:
            if name not in self.down:
                self.do(name, self.reps[name].on_tick(self.now))
        budget = 10_000
        while self.queue and budget:
            budget -= 1
            src, dst, msg = self.queue.popleft()
            if dst in self.down or src in self.down or (src, dst) in self.blocked:
                continue
            for delivered in [msg] if self.hook is None else self.hook(src, dst, msg):
                self._note_ack(src, dst, delivered)
                self.do(dst, self.reps[dst].on_message(src, delivered, self.now))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.step()

    def serving(self) -> list[str]:
        return [n for n in NAMES if n not in self.down and self.reps[n].is_serving(self.now)]

    def propose(self, name: str, n: int = 1) -> list[int]:
        idx, effects = self.reps[name].propose([{"n": i} for i in range(n)], self.now)
        self.do(name, effects)
        return idx


def log_of(entries: list[tuple[int, int]]) -> list[Entry]:
    """(term, index) pairs as entries with a delta naming them."""
    return [Entry(t, i, {"t": t, "i": i}) for t, i in entries]


# --- single server ---------------------------------------------------------------------


def test_single_server_is_primary_at_once_and_commits_on_propose() -> None:
    r = Replica("solo", ["solo"], T, Durable(), 0.0)
    assert r.role is Role.PRIMARY and r.term == 1 and r.serving
    idx, effects = r.propose([{"k": "open"}], 0.1)
    assert idx == [1]
    assert isinstance(effects[0], PersistHardState) and effects[0].term == 1
    kinds = [type(e) for e in effects]
    assert kinds.index(PersistEntries) < kinds.index(Committed)
    assert r.commit == 1 and effects[-1] == Committed(1, (Entry(1, 1, {"k": "open"}),))


def test_single_server_restart_commits_what_is_on_disk() -> None:
    durable = Durable(term=1, voted_for="solo", entries=log_of([(1, 1), (1, 2)]))
    r = Replica("solo", ["solo"], T, durable, 0.0)
    effects = r.on_tick(0.0)
    assert Committed(2, tuple(durable.entries)) in effects
    assert r.on_message("solo", {"t": "hb"}, 0.0) == [Dropped("solo", "unknown sender")]


# --- election --------------------------------------------------------------------------


def test_highest_ranked_node_is_elected_and_serves() -> None:
    triad = Triad()
    triad.run(2.0)
    assert triad.serving() == ["alpha"]
    assert [triad.reps[n].role for n in NAMES] == [Role.PRIMARY, Role.BACKUP, Role.BACKUP]
    assert {triad.reps[n].primary for n in NAMES} == {"alpha"}
    idx = triad.propose("alpha", 3)
    triad.step()
    assert triad.reps["alpha"].commit == idx[-1]
    triad.run(0.2)  # backups learn the commit index from the next append
    assert all(triad.reps[n].commit == idx[-1] for n in NAMES)


def test_failover_elects_next_rank_within_a_second() -> None:
    triad = Triad()
    triad.run(1.5)
    triad.down.add("alpha")
    t0 = triad.now
    while not triad.serving():
        triad.step()
    assert triad.serving() == ["beta"]
    assert triad.now - t0 < 1.0


def test_a_dropped_connection_starts_the_election_at_once_in_rank_order() -> None:
    triad = Triad()
    triad.run(1.5)
    triad.down.add("alpha")
    t0 = triad.now
    for name in ("beta", "gamma"):
        triad.do(name, triad.reps[name].on_peer_lost("alpha", triad.now))
    while not triad.serving():
        triad.step()
    assert triad.serving() == ["beta"]  # gamma still waits for the live, higher beta
    assert triad.now - t0 < 0.1  # not peer_timeout (0.5 s)


def test_a_spurious_dropped_connection_does_not_depose_a_live_primary() -> None:
    triad = Triad()
    triad.run(1.5)
    term = triad.reps["alpha"].term
    triad.do("gamma", triad.reps["gamma"].on_peer_lost("alpha", triad.now))
    triad.run(2.0)
    # gamma may ask for a pre-vote, but beta still hears alpha and refuses it
    assert triad.serving() == ["alpha"]
    assert triad.reps["alpha"].term == term


def test_liveness_does_not_depend_on_the_higher_ranked_node() -> None:
    # beta hears alpha's heartbeats but alpha never stands (it cannot reach anyone)
    triad = Triad()
    triad.blocked |= {(n, "alpha") for n in NAMES} | {("alpha", "gamma")}
    triad.run(4.0)
    assert triad.serving() in (["beta"], ["gamma"])


def test_cut_off_node_does_not_inflate_its_term() -> None:
    triad = Triad()
    triad.run(1.5)
    term = triad.reps["gamma"].term
    triad.blocked |= {("gamma", "alpha"), ("alpha", "gamma"), ("gamma", "beta"), ("beta", "gamma")}
    triad.run(5.0)
    assert triad.reps["gamma"].term == term  # pre-votes never got a majority
    triad.blocked.clear()
    triad.run(0.5)
    assert triad.serving() == ["alpha"] and triad.reps["alpha"].term == term


def test_higher_term_makes_a_primary_step_down() -> None:
    triad = Triad()
    triad.run(1.5)
    alpha = triad.reps["alpha"]
    hb = messages.Heartbeat(alpha.term + 5, "beta", Role.BACKUP, 0, 0, 0, None).to_wire()
    effects = alpha.on_message("beta", hb, triad.now)
    assert alpha.role is Role.BACKUP and alpha.term == hb["term"] and not alpha.serving
    assert PersistHardState(hb["term"], None) in effects
    assert RoleChanged(Role.BACKUP, hb["term"], None) in effects


def test_older_terms_are_refused_with_the_current_term() -> None:
    triad = Triad()
    triad.run(1.5)
    beta = triad.reps["beta"]
    beta_term = beta.term
    stale = messages.Append(0, 0, 0, (Entry(0, 1, {"x": 1}),), 1).to_wire()
    (reply,) = beta.on_message("gamma", stale, triad.now)
    assert isinstance(reply, Send) and reply.msg["ok"] is False and reply.msg["term"] == beta_term
    req = messages.VoteRequest(0, "gamma", 9, 0, False, False).to_wire()
    (vote,) = beta.on_message("gamma", req, triad.now + 1)
    assert isinstance(vote, Send) and vote.msg["granted"] is False
    assert beta.last == triad.reps["alpha"].last and beta.term == beta_term


def test_voter_is_sticky_to_a_live_primary_but_grants_a_transfer() -> None:
    triad = Triad()
    triad.run(1.5)
    beta = triad.reps["beta"]
    term = beta.term
    req = messages.VoteRequest(term + 1, "gamma", beta.last, 1, False, False).to_wire()
    (vote,) = beta.on_message("gamma", req, triad.now)
    assert isinstance(vote, Send) and vote.msg["granted"] is False and beta.term == term
    req["transfer"] = True
    effects = beta.on_message("gamma", req, triad.now)
    assert PersistHardState(term + 1, "gamma") in effects
    assert effects[-1] == Send("gamma", effects[-1].msg) and effects[-1].msg["granted"]  # type: ignore[union-attr]


def test_primary_without_quorum_stops_serving_and_steps_down() -> None:
    triad = Triad()
    triad.run(1.5)
    triad.down |= {"beta", "gamma"}
    t0 = triad.now
    while triad.reps["alpha"].serving:
        triad.step()
    assert triad.now - t0 <= T.peer_timeout + 0.02
    triad.step()
    assert triad.reps["alpha"].role is Role.BACKUP
    with pytest.raises(NotServing):
        triad.reps["alpha"].propose([{"x": 1}], triad.now)
    triad.run(3.0)
    assert not triad.serving()  # alone: never serves, and never grants itself a term


# --- view change ----------------------------------------------------------------------


def test_winner_adopts_a_voters_longer_log_before_serving() -> None:
    # beta holds entries 1..5 of term 1 (committed to 3); alpha only 1..2. gamma is down,
    # so 4 and 5 may have been committed with gamma: alpha must not drop them.
    durables = {
        "alpha": Durable(term=1, entries=log_of([(1, 1), (1, 2)]), commit=2),
        "beta": Durable(term=1, entries=log_of([(1, i) for i in range(1, 6)]), commit=3),
    }
    triad = Triad(durables, down={"gamma"}, timing=Timing(max_batch=2))
    triad.run(2.0)
    alpha = triad.reps["alpha"]
    assert triad.serving() == ["alpha"]
    assert [e.index for e in alpha.entries(1, 5)] == [1, 2, 3, 4, 5]
    assert alpha.entries(6, 6) == [Entry(alpha.term, 6, None)]  # the no-op
    assert alpha.commit == 6 and triad.reps["beta"].commit == 6
    persisted = [
        e for eff in triad.seen["alpha"] if isinstance(eff, PersistEntries) for e in eff.entries
    ]
    assert [e.index for e in persisted] == [3, 4, 5, 6]


def test_winner_drops_an_uncommitted_tail_of_an_older_term() -> None:
    durables = {
        "alpha": Durable(term=2, entries=log_of([(1, 1), (1, 2), (1, 3)]), commit=1),
        "beta": Durable(term=2, entries=log_of([(1, 1), (2, 2)]), commit=1),
    }
    triad = Triad(durables, down={"gamma"})
    triad.run(2.0)
    alpha = triad.reps["alpha"]
    assert triad.serving() == ["alpha"]
    assert [(e.term, e.index) for e in alpha.entries(1, alpha.last)] == [
        (1, 1),
        (2, 2),
        (alpha.term, 3),
    ]
    assert TruncateLog(2) in triad.seen["alpha"]


def test_stale_duplicate_append_never_truncates_newer_entries() -> None:
    beta = Replica("beta", NAMES, T, Durable(term=1), 0.0)
    first = messages.Append(1, 0, 0, tuple(log_of([(1, 1), (1, 2), (1, 3)])), 0).to_wire()
    beta.on_message("alpha", first, 0.1)
    stale = messages.Append(1, 0, 0, tuple(log_of([(1, 1)])), 0).to_wire()
    effects = beta.on_message("alpha", stale, 0.2)
    assert beta.last == 3
    assert not any(isinstance(e, TruncateLog | PersistEntries) for e in effects)


def test_append_that_rewrites_a_committed_entry_is_refused() -> None:
    beta = Replica("beta", NAMES, T, Durable(term=1), 0.0)
    beta.on_message("alpha", messages.Append(1, 0, 0, tuple(log_of([(1, 1)])), 1).to_wire(), 0.1)
    assert beta.commit == 1
    liar = messages.Append(2, 0, 0, (Entry(2, 1, {"evil": True}),), 1).to_wire()
    effects = beta.on_message("alpha", liar, 0.2)
    assert any(isinstance(e, Dropped) for e in effects)
    assert beta.entries(1, 1) == log_of([(1, 1)])


# --- recovering ------------------------------------------------------------------------


def test_recovering_node_neither_votes_nor_stands_until_caught_up() -> None:
    triad = Triad()
    triad.run(1.5)
    for _ in range(20):
        triad.propose("alpha", 1)
        triad.step()
    triad.restart("gamma", Durable(fresh=True))
    gamma = triad.reps["gamma"]
    assert gamma.role is Role.RECOVERING
    req = messages.VoteRequest(gamma.term + 1, "beta", 0, 0, True, False).to_wire()
    (vote,) = [e for e in gamma.on_message("beta", req, triad.now) if isinstance(e, Send)]
    assert vote.msg["granted"] is False
    triad.run(0.5)
    assert gamma.role is Role.BACKUP and gamma.commit == triad.reps["alpha"].commit
    assert gamma.voted_for == "alpha"
    assert PersistHardState(gamma.term, "alpha") in triad.seen["gamma"]
    # it may have voted in the next term before its disk was lost: it still refuses there
    req = messages.VoteRequest(gamma.term + 1, "beta", 99, 9, True, False).to_wire()
    (vote,) = [e for e in gamma.on_message("beta", req, triad.now) if isinstance(e, Send)]
    assert vote.msg["granted"] is False


def test_two_nodes_with_one_recovering_cannot_elect() -> None:
    triad = Triad(down={"alpha"}, durables={"gamma": Durable(fresh=True)})
    triad.run(5.0)
    assert not triad.serving()
    assert triad.reps["gamma"].role is Role.RECOVERING


# --- snapshots and catch-up -----------------------------------------------------------

SIZE = 10 * SNAPSHOT_CHUNK + 12_345  # 11 chunks, the last one short
OFFSETS = list(range(0, SIZE, SNAPSHOT_CHUNK))


def image_at(rep: Replica, index: int, seed: int = 1, size: int = SIZE) -> Image:
    """An image of arbitrary bytes at ``index`` of ``rep``'s log: the replica treats an
    image's bytes as opaque."""
    term = rep.log.term_at(index)
    assert term is not None
    return Image.of(index, term, random.Random(seed).randbytes(size))


def lagging(chunk: int = SNAPSHOT_CHUNK) -> Triad:
    """A triad whose primary, alpha, committed 60 entries while gamma was down."""
    triad = Triad(timing=Timing(keep_tail=2, max_batch=4, snapshot_chunk=chunk))
    triad.run(1.5)
    triad.down.add("gamma")
    for _ in range(30):
        triad.propose("alpha", 2)
        triad.step()
    return triad


def written(effects: list[Effect]) -> list[tuple[int, int]]:
    """(index, offset) of every chunk a node wrote, in order."""
    return [(e.index, e.offset) for e in effects if isinstance(e, PersistSnapshotChunk)]


def sent(triad: Triad, src: str = "alpha", dst: str = "gamma") -> list[int]:
    """The offsets of the chunks ``src`` sent ``dst``, in order."""
    return [msg["offset"] for s, d, msg in triad.chunks if (s, d) == (src, dst)]


def installed(effects: list[Effect]) -> Image:
    (image,) = [e.image for e in effects if isinstance(e, InstallSnapshot)]
    return image


def once(match: Callable[[str, str, dict[str, Any]], bool], then: Hook) -> Hook:
    """A hook that applies ``then`` to the first message ``match`` picks, once."""
    done: list[bool] = []

    def hook(src: str, dst: str, msg: dict[str, Any]) -> list[dict[str, Any]]:
        if not done and match(src, dst, msg):
            done.append(True)
            return then(src, dst, msg)
        return [msg]

    return hook


def chunk_at(offset: int) -> Callable[[str, str, dict[str, Any]], bool]:
    return lambda src, dst, msg: msg["t"] == "snapshot" and msg["offset"] == offset


def test_a_wiped_backup_catches_up_from_a_many_chunk_image_within_the_window() -> None:
    triad = lagging()
    alpha = triad.reps["alpha"]
    image = image_at(alpha, alpha.commit)
    alpha.compacted(image)
    assert alpha.log.base_index == image.index - 2
    more = triad.propose("alpha", 3)  # after the image: streamed once it is installed
    triad.step()
    triad.restart("gamma", Durable(fresh=True))
    triad.run(1.0)
    gamma = triad.reps["gamma"]
    assert gamma.role is Role.BACKUP
    assert gamma.commit == alpha.commit == alpha.last == more[-1]
    # every chunk sent once, written once, in order; the harness checked the window
    assert sent(triad) == OFFSETS
    assert written(triad.seen["gamma"]) == [(image.index, o) for o in OFFSETS]
    got = installed(triad.seen["gamma"])
    assert isinstance(got.buf, memoryview) and got.buf.readonly  # the bytes, not a copy
    assert (got.index, got.term, got.crc, bytes(got.buf)) == (
        image.index,
        image.term,
        image.crc,
        image.buf,
    )
    kinds = [type(e) for e in triad.seen["gamma"]]
    assert kinds.index(PersistSnapshot) < kinds.index(InstallSnapshot)
    assert gamma.log.snapshot is got
    assert [e.index for e in gamma.entries(1, gamma.last)] == list(
        range(image.index + 1, alpha.last + 1)
    )


def test_a_lost_chunk_is_resent_at_the_backups_refusal() -> None:
    triad = lagging()
    alpha = triad.reps["alpha"]
    image = image_at(alpha, alpha.commit)
    alpha.compacted(image)
    triad.hook = once(chunk_at(3 * SNAPSHOT_CHUNK), lambda src, dst, msg: [])
    triad.restart("gamma", Durable(fresh=True))
    triad.run(0.3)  # under peer_timeout: the chunks after the gap, refused, brought it
    assert triad.reps["gamma"].commit == alpha.commit
    assert written(triad.seen["gamma"]) == [(image.index, o) for o in OFFSETS]
    assert sent(triad).count(3 * SNAPSHOT_CHUNK) == 2
    assert len(sent(triad)) <= len(OFFSETS) + SNAPSHOT_WINDOW


def test_a_duplicated_chunk_is_written_once_and_answered_with_the_offset_held() -> None:
    triad = lagging()
    alpha = triad.reps["alpha"]
    image = image_at(alpha, alpha.commit)
    alpha.compacted(image)
    triad.hook = once(chunk_at(2 * SNAPSHOT_CHUNK), lambda src, dst, msg: [msg, msg])
    triad.restart("gamma", Durable(fresh=True))
    triad.run(1.0)
    assert triad.reps["gamma"].commit == alpha.commit
    assert written(triad.seen["gamma"]) == [(image.index, o) for o in OFFSETS]
    held = [
        e.msg["offset"]
        for e in triad.seen["gamma"]
        if isinstance(e, Send) and e.msg["t"] == "snapshot_ack"
    ]
    assert held.count(3 * SNAPSHOT_CHUNK) == 2  # the chunk, then its duplicate
    # the refusal costs one window resent at most, not a resend of every later window
    assert len(sent(triad)) <= len(OFFSETS) + SNAPSHOT_WINDOW
    assert bytes(installed(triad.seen["gamma"]).buf) == image.buf


def test_a_chunk_changed_in_transit_fails_the_crc_and_the_transfer_starts_over() -> None:
    triad = lagging()
    alpha = triad.reps["alpha"]
    image = image_at(alpha, alpha.commit)
    alpha.compacted(image)

    def flip(src: str, dst: str, msg: dict[str, Any]) -> list[dict[str, Any]]:
        data = bytearray(msg["data"])
        data[100] ^= 0xFF
        return [{**msg, "data": bytes(data)}]

    triad.hook = once(chunk_at(5 * SNAPSHOT_CHUNK), flip)
    triad.restart("gamma", Durable(fresh=True))
    triad.run(1.0)
    effects = triad.seen["gamma"]
    (drop,) = [e for e in effects if isinstance(e, Dropped)]
    assert drop.sender == "alpha" and "crc" in drop.reason
    # all of it written, refused at the end, then all of it again from 0
    assert written(effects) == [(image.index, o) for o in OFFSETS + OFFSETS]
    kinds = [type(e) for e in effects]
    assert kinds.index(Dropped) < kinds.index(PersistSnapshot)
    assert kinds.count(PersistSnapshot) == kinds.count(InstallSnapshot) == 1
    assert bytes(installed(effects).buf) == image.buf
    assert triad.reps["gamma"].commit == alpha.commit


def test_a_compaction_mid_transfer_neither_restarts_it_nor_drops_the_entries_it_needs() -> None:
    triad = lagging()
    alpha = triad.reps["alpha"]
    first = image_at(alpha, alpha.commit - 20)
    second = image_at(alpha, alpha.commit, seed=2)
    alpha.compacted(first)
    bases: list[int] = []

    def compact(src: str, dst: str, msg: dict[str, Any]) -> list[dict[str, Any]]:
        alpha.compacted(second)
        bases.append(alpha.log.base_index)
        return [msg]

    triad.hook = once(chunk_at(4 * SNAPSHOT_CHUNK), compact)
    triad.restart("gamma", Durable(fresh=True))
    triad.run(1.0)
    # the log kept the entries after the image in flight, though a newer one was taken
    assert alpha.log.snapshot is second and bases == [first.index]
    # the transfer went on with its image to the end, never from 0 again
    assert {msg["index"] for _, _, msg in triad.chunks} == {first.index}
    assert sent(triad) == OFFSETS
    gamma = triad.reps["gamma"]
    assert installed(triad.seen["gamma"]).index == first.index
    assert gamma.commit == alpha.commit and gamma.role is Role.BACKUP
    assert [e.index for e in gamma.entries(1, gamma.last)] == list(
        range(first.index + 1, alpha.last + 1)
    )
    # with no transfer left, the next compaction keeps the tail only
    triad.propose("alpha", 4)
    triad.step()
    alpha.compacted(image_at(alpha, alpha.commit, seed=3))
    assert alpha.log.base_index == alpha.commit - 2


def test_the_log_keeps_the_entries_after_an_image_still_being_sent() -> None:
    log = Log(None, log_of([(1, i) for i in range(1, 21)]))
    log.compact(Image.of(15, 1, b"a"), keep_tail=2, hold=5)
    assert (log.snap_index, log.snap_term, log.base_index, log.last) == (15, 1, 5, 20)
    assert log.slice(1, 6) == log_of([(1, 6)])
    log.compact(Image.of(18, 1, b"b"), keep_tail=2, hold=None)
    assert (log.snap_index, log.base_index) == (18, 16)
    log.compact(Image.of(19, 1, b"c"), keep_tail=0, hold=7)  # base never moves back
    assert log.base_index == 16


def test_a_compaction_drops_the_entries_before_its_base_a_step_a_tick() -> None:
    """Freeing tens of thousands of entries at once held a loop for 50-150 ms: the log
    drops ``TRIM_STEP`` of them at the compaction and each tick after it."""
    log = Log(None, log_of([(1, i) for i in range(1, 2 * TRIM_STEP + 501)]))
    log.compact(Image.of(2 * TRIM_STEP + 400, 1, b"a"), keep_tail=0)
    assert (log.snap_index, log.base_index) == (2 * TRIM_STEP + 400, TRIM_STEP)
    assert log.slice(1, TRIM_STEP + 1) == log_of([(1, TRIM_STEP + 1)])  # still held
    log.trim()
    assert log.base_index == 2 * TRIM_STEP
    log.trim()
    log.trim()
    assert (log.base_index, log.base_term, log.last) == (
        2 * TRIM_STEP + 400,
        1,
        2 * TRIM_STEP + 500,
    )
    # the replica trims at each tick
    many = log_of([(1, i) for i in range(1, 2 * TRIM_STEP + 1)])
    timing = Timing(heartbeat_interval=0.1, peer_timeout=0.5, keep_tail=0)
    solo = Replica("solo", ["solo"], timing, Durable(term=1, voted_for="solo", entries=many), 0.0)
    solo.on_tick(0.0)
    solo.compacted(Image.of(2 * TRIM_STEP, 1, b"b"))
    assert solo.log.base_index == TRIM_STEP
    solo.on_tick(0.01)
    assert solo.log.base_index == 2 * TRIM_STEP


def test_a_backup_takes_chunks_in_order_only_and_a_newer_image_from_0() -> None:
    gamma = Replica("gamma", NAMES, T, Durable(term=2), 0.0)
    older = Image.of(10, 1, bytes(range(250)) * 3)  # 750 bytes: chunks of 300, 300, 150
    newer = Image.of(12, 2, bytes(range(150)) * 5)

    def chunk(image: Image, offset: int) -> list[Effect]:
        data = image.buf[offset : offset + 300]
        msg = messages.Snapshot(2, image.index, image.term, offset, image.size, image.crc, data)
        return gamma.on_message("alpha", msg.to_wire(), 1.0)

    def answer(effects: list[Effect]) -> tuple[str, int, int]:
        """The snapshot_ack sent: (kind, index, offset held)."""
        (send,) = [e for e in effects if isinstance(e, Send)]
        return send.msg["t"], send.msg["index"], send.msg["offset"]

    first = chunk(older, 0)
    assert written(first) == [(10, 0)] and answer(first) == ("snapshot_ack", 10, 300)
    for offset in (600, 0):  # a gap, then a duplicate: neither written, the offset held
        refused = chunk(older, offset)
        assert written(refused) == [] and answer(refused) == ("snapshot_ack", 10, 300)
    restart = chunk(newer, 0)  # a newer image starts over
    assert written(restart) == [(12, 0)] and answer(restart) == ("snapshot_ack", 12, 300)
    for offset in (300, 0):  # the older one's chunks are refused now, even at 0
        late = chunk(older, offset)
        assert written(late) == [] and answer(late) == ("snapshot_ack", 10, 0)
    assert written(chunk(newer, 300)) == [(12, 300)]
    done = chunk(newer, 600)
    assert written(done) == [(12, 600)]
    assert [type(e) for e in done] == [
        PersistSnapshotChunk,
        PersistSnapshot,
        InstallSnapshot,
        Send,
    ]
    assert bytes(installed(done).buf) == newer.buf and gamma.commit == 12
    assert done[-1] == Send("alpha", messages.AppendAck(2, True, 12, 12, 12, 12).to_wire())


def test_a_stalled_transfer_resends_from_what_was_acknowledged() -> None:
    triad = lagging()
    alpha = triad.reps["alpha"]
    image = image_at(alpha, alpha.commit)
    alpha.compacted(image)
    cut = [True]

    def lose_from_two(src: str, dst: str, msg: dict[str, Any]) -> list[dict[str, Any]]:
        lost = cut[0] and msg["t"] == "snapshot" and msg["offset"] >= 2 * SNAPSHOT_CHUNK
        return [] if lost else [msg]

    triad.hook = lose_from_two
    triad.restart("gamma", Durable(fresh=True))
    triad.run(0.3)
    started = sent(triad)
    assert started == OFFSETS[: 2 + SNAPSHOT_WINDOW]  # two taken, then a window lost
    assert written(triad.seen["gamma"]) == [(image.index, o) for o in OFFSETS[:2]]
    cut[0] = False
    triad.run(0.4)
    assert sent(triad)[len(started)] == 2 * SNAPSHOT_CHUNK  # from what gamma acknowledged
    triad.run(0.3)
    assert written(triad.seen["gamma"]) == [(image.index, o) for o in OFFSETS]
    assert triad.reps["gamma"].commit == alpha.commit


def test_a_backup_that_restarts_mid_transfer_is_sent_the_image_again_from_0() -> None:
    triad = lagging()
    alpha = triad.reps["alpha"]
    image = image_at(alpha, alpha.commit)
    alpha.compacted(image)
    before: list[int] = []

    def restart(src: str, dst: str, msg: dict[str, Any]) -> list[dict[str, Any]]:
        before.append(len(triad.seen["gamma"]))
        triad.restart("gamma", Durable(fresh=True))  # it lost the chunks it held
        return [msg]

    triad.hook = once(chunk_at(5 * SNAPSHOT_CHUNK), restart)
    triad.restart("gamma", Durable(fresh=True))
    triad.run(0.3)  # under peer_timeout: its refusals (it holds 0) brought the resend
    (cut,) = before
    assert written(triad.seen["gamma"][:cut]) == [(image.index, o) for o in OFFSETS[:5]]
    assert written(triad.seen["gamma"][cut:]) == [(image.index, o) for o in OFFSETS]
    assert sent(triad).count(0) == 2
    assert triad.reps["gamma"].commit == alpha.commit
    assert bytes(installed(triad.seen["gamma"]).buf) == image.buf


def test_the_chunk_size_is_a_timing_setting_within_what_a_peer_may_send() -> None:
    assert Timing().snapshot_chunk == SNAPSHOT_CHUNK == 256 * 1024
    assert Timing(snapshot_chunk=MAX_SNAPSHOT_CHUNK).snapshot_chunk == MAX_SNAPSHOT_CHUNK
    for bad in (0, MAX_SNAPSHOT_CHUNK + 1):
        with pytest.raises(ValueError, match="snapshot_chunk"):
            Timing(snapshot_chunk=bad)


def test_a_small_chunk_size_sends_an_image_in_many_chunks() -> None:
    triad = lagging(chunk=1000)
    alpha = triad.reps["alpha"]
    image = image_at(alpha, alpha.commit, size=99_999)
    alpha.compacted(image)
    triad.restart("gamma", Durable(fresh=True))
    triad.run(1.0)
    assert sent(triad) == list(range(0, 99_999, 1000))  # 100 chunks, each once
    assert bytes(installed(triad.seen["gamma"]).buf) == image.buf
    assert triad.reps["gamma"].commit == alpha.commit


def fetching(image: Image) -> Triad:
    """beta holds ``image`` (at 30) and entries to 35, committed to 33; alpha only 1..5.
    gamma is down: alpha, elected first, must adopt beta's log."""
    durables = {
        "alpha": Durable(term=1, entries=log_of([(1, i) for i in range(1, 6)]), commit=5),
        "beta": Durable(
            term=1, snapshot=image, entries=log_of([(1, i) for i in range(31, 36)]), commit=33
        ),
    }
    return Triad(durables, down={"gamma"})


def fetched(triad: Triad) -> list[tuple[int, int]]:
    """(snap_index, offset) of alpha's fetches."""
    return [
        (e.msg["snap_index"], e.msg["offset"])
        for e in triad.seen["alpha"]
        if isinstance(e, Send) and e.msg["t"] == "fetch"
    ]


def test_a_candidate_fetches_a_voters_image_chunk_by_chunk_then_its_entries() -> None:
    image = Image.of(30, 1, random.Random(4).randbytes(SIZE))
    triad = fetching(image)
    triad.run(2.0)
    alpha = triad.reps["alpha"]
    assert triad.serving() == ["alpha"]
    assert written(triad.seen["alpha"]) == [(30, o) for o in OFFSETS]
    assert fetched(triad) == [(0, 0)] + [(30, o) for o in OFFSETS[1:]]
    got = installed(triad.seen["alpha"])
    assert (got.index, got.term, bytes(got.buf)) == (30, 1, image.buf)
    assert [e.index for e in alpha.entries(1, alpha.last)] == [31, 32, 33, 34, 35, 36]
    assert alpha.entries(36, 36) == [Entry(alpha.term, 36, None)]  # the no-op
    assert alpha.commit == 36 and triad.reps["beta"].commit == 36


def test_a_lost_fetch_reply_is_asked_for_again_at_the_next_beat() -> None:
    image = Image.of(30, 1, random.Random(4).randbytes(SIZE))
    triad = fetching(image)

    def fourth_reply(src: str, dst: str, msg: dict[str, Any]) -> bool:
        chunk = msg.get("snapshot") if msg["t"] == "fetch_reply" else None
        return chunk is not None and chunk["offset"] == 3 * SNAPSHOT_CHUNK

    triad.hook = once(fourth_reply, lambda src, dst, msg: [])
    triad.run(2.0)
    assert triad.serving() == ["alpha"]
    asked = fetched(triad)
    assert asked.count((30, 3 * SNAPSHOT_CHUNK)) == 2 and len(asked) == len(OFFSETS) + 1
    assert written(triad.seen["alpha"]) == [(30, o) for o in OFFSETS]
    assert bytes(installed(triad.seen["alpha"]).buf) == image.buf


def test_a_voter_whose_image_changes_mid_fetch_sends_its_new_one_from_0() -> None:
    image = Image.of(30, 1, random.Random(4).randbytes(SIZE))
    newer = Image.of(33, 1, random.Random(5).randbytes(SIZE))
    triad = fetching(image)
    beta = triad.reps["beta"]

    def compact(src: str, dst: str, msg: dict[str, Any]) -> list[dict[str, Any]]:
        beta.compacted(newer)
        return [msg]

    def third_reply(src: str, dst: str, msg: dict[str, Any]) -> bool:
        chunk = msg.get("snapshot") if msg["t"] == "fetch_reply" else None
        return chunk is not None and chunk["offset"] == 2 * SNAPSHOT_CHUNK

    triad.hook = once(third_reply, compact)
    triad.run(2.0)
    alpha = triad.reps["alpha"]
    assert triad.serving() == ["alpha"]
    assert written(triad.seen["alpha"]) == [(30, o) for o in OFFSETS[:3]] + [
        (33, o) for o in OFFSETS
    ]
    got = installed(triad.seen["alpha"])
    assert (got.index, bytes(got.buf)) == (33, newer.buf)
    assert [e.index for e in alpha.entries(1, alpha.last)] == [34, 35, 36]
    assert alpha.commit == 36


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    drop=st.sampled_from([0.0, 0.05, 0.2]),
    dup=st.sampled_from([0.0, 0.05, 0.2]),
    swap=st.sampled_from([0.0, 0.1, 0.3]),
)
def test_a_transfer_over_a_lossy_network_delivers_the_image_exactly(
    seed: int, drop: float, dup: float, swap: float
) -> None:
    """Chunks and their acks lost, duplicated and reordered: the backup writes each run
    of chunks in order from 0 without gaps, and installs the image's very bytes."""
    triad = lagging(chunk=1000)
    alpha = triad.reps["alpha"]
    image = image_at(alpha, alpha.commit, size=40_007)  # 41 chunks
    alpha.compacted(image)
    rng = random.Random(seed)
    held: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def network(src: str, dst: str, msg: dict[str, Any]) -> list[dict[str, Any]]:
        if msg["t"] not in ("snapshot", "snapshot_ack"):
            return [msg]
        out = [] if rng.random() < drop else [msg, msg] if rng.random() < dup else [msg]
        back = held.setdefault((src, dst), [])
        if back:
            out.append(back.pop())  # a message held back goes after this one
        if out and rng.random() < swap:
            back.append(out.pop(0))
        return out

    triad.hook = network
    triad.restart("gamma", Durable(fresh=True))
    for _ in range(6000):  # a minute: at the worst rates, most windows end in a stall
        triad.step()
        if triad.reps["gamma"].commit == alpha.commit:
            break
    assert triad.reps["gamma"].commit == alpha.commit
    end = 0
    for e in triad.seen["gamma"]:
        if isinstance(e, PersistSnapshotChunk):
            assert e.offset in (0, end)  # each chunk follows the last, or starts over
            end = e.offset + len(e.data)
    assert bytes(installed(triad.seen["gamma"]).buf) == image.buf


def test_pipelined_backup_recovers_from_lost_appends() -> None:
    triad = Triad(timing=Timing(max_batch=1))
    triad.run(1.5)
    triad.blocked.add(("alpha", "beta"))
    for _ in range(20):
        triad.propose("alpha", 1)
    triad.step()
    triad.blocked.clear()
    triad.run(0.5)
    assert triad.reps["beta"].last == triad.reps["alpha"].last == triad.reps["beta"].commit


# --- failback -------------------------------------------------------------------------


def test_failback_hands_over_to_the_returning_higher_ranked_node() -> None:
    triad = Triad(down={"alpha"})
    triad.run(2.0)
    assert triad.serving() == ["beta"]
    idx = triad.propose("beta", 5)
    triad.step()
    triad.restart("alpha", Durable())
    saw_transfer = False
    for _ in range(300):
        triad.step()
        saw_transfer = saw_transfer or triad.reps["beta"].transferring
        if triad.serving() == ["alpha"]:
            break
    assert saw_transfer and triad.serving() == ["alpha"]
    alpha = triad.reps["alpha"]
    assert [e.delta for e in alpha.entries(idx[0], idx[-1])] == [{"n": i} for i in range(5)]
    with pytest.raises(NotServing):
        triad.reps["beta"].propose([{"x": 1}], triad.now)


def test_failback_off_keeps_the_current_primary() -> None:
    triad = Triad(down={"alpha"}, timing=Timing(failback=False))
    triad.run(2.0)
    triad.restart("alpha", Durable())
    triad.run(3.0)
    assert triad.serving() == ["beta"] and triad.reps["alpha"].role is Role.BACKUP


# --- hostile input ----------------------------------------------------------------------

JUNK: list[Any] = [
    None,
    7,
    b"\x00",
    [],
    {},
    {"t": 1},
    {"t": "hb"},
    {
        "t": "hb",
        "term": 1,
        "node": "gamma",
        "role": "primary",
        "last": 0,
        "last_term": 0,
        "commit": 0,
        "primary": "gamma",
    },  # in another node's name
    {
        "t": "hb",
        "term": -1,
        "node": "beta",
        "role": "backup",
        "last": 0,
        "last_term": 0,
        "commit": 0,
        "primary": None,
    },
    {
        "t": "vote_req",
        "term": True,
        "candidate": "beta",
        "last": 0,
        "last_term": 0,
        "transfer": False,
        "pre": False,
    },
    {
        "t": "append",
        "term": 9,
        "prev_index": 0,
        "prev_term": 0,
        "commit": 0,
        "entries": [{"term": 9, "index": 5, "delta": None}],
    },  # not contiguous
    {
        "t": "append",
        "term": 9,
        "prev_index": 0,
        "prev_term": 0,
        "commit": 0,
        "entries": [{"term": 10, "index": 1, "delta": None}],
    },  # entry term beyond message
    {"t": "append", "term": 2**70, "prev_index": 0, "prev_term": 0, "commit": 0, "entries": []},
    {
        "t": "append",
        "term": 9,
        "prev_index": 0,
        "prev_term": 0,
        "commit": 0,
        "entries": [{"term": 9, "index": 1, "delta": [1, 2]}],
    },
    {
        "t": "append",
        "term": 9,
        "prev_index": 0,
        "prev_term": 0,
        "commit": 0,
        "entries": [{"term": 9, "index": 1, "delta": {"k": "open", b"sid": "s1"}}],
    },  # a delta with a key that is not a string
    {
        "t": "append",
        "term": 9,
        "prev_index": 0,
        "prev_term": 0,
        "commit": 0,
        "entries": [{"term": 9, "index": 1, "delta": None, 7: 1}],
    },  # an entry with a key that is not a string
    {
        "t": "snapshot",
        "term": 9,
        "index": 3,
        "term_at": 10,
        "offset": 0,
        "size": 1,
        "crc": 0,
        "data": b"x",
    },  # term_at beyond the message's term
    {
        "t": "fetch_reply",
        "term": 9,
        "prev_index": 0,
        "prev_term": 0,
        "entries": [],
        "last": 0,
        "snapshot": "x",
    },
    {"t": "fetch", "term": 1, "from_index": 0, "offset": 0, "snap_index": 0},
]


@pytest.mark.parametrize("junk", JUNK)
def test_hostile_messages_are_dropped_and_change_nothing(junk: Any) -> None:
    triad = Triad()
    triad.run(1.5)
    beta = triad.reps["beta"]
    before = (beta.role, beta.term, beta.voted_for, beta.primary, beta.last, beta.commit)
    effects = beta.on_message("alpha", junk, triad.now)
    assert effects and all(isinstance(e, Dropped) for e in effects)
    assert (beta.role, beta.term, beta.voted_for, beta.primary, beta.last, beta.commit) == before


# Well-formed messages of the chunked snapshot protocol, then each field made wrong.
GOOD: dict[str, dict[str, Any]] = {
    "snapshot": {
        "t": "snapshot",
        "term": 3,
        "index": 10,
        "term_at": 2,
        "offset": 0,
        "size": 10,
        "crc": 7,
        "data": b"0123456789",
    },
    "snapshot_ack": {"t": "snapshot_ack", "term": 3, "index": 10, "offset": 5},
    "fetch": {"t": "fetch", "term": 3, "from_index": 4, "offset": 5, "snap_index": 10},
    "fetch_reply": {
        "t": "fetch_reply",
        "term": 3,
        "prev_index": 10,
        "prev_term": 2,
        "entries": [{"term": 3, "index": 11, "delta": None}],
        "last": 11,
        "snapshot": {"offset": 5, "size": 10, "crc": 7, "data": b"56789"},
    },
}
BIG = 2**41  # past MAX_IMAGE
MISSING = object()
BAD: list[tuple[str, str, Any]] = [
    ("snapshot", "index", 0),
    ("snapshot", "term_at", 4),
    ("snapshot", "offset", -1),
    ("snapshot", "offset", True),
    ("snapshot", "offset", 1),  # then the data runs past the size
    ("snapshot", "offset", 11),  # past the size
    ("snapshot", "offset", MISSING),
    ("snapshot", "size", 0),
    ("snapshot", "size", 9),
    ("snapshot", "size", BIG),
    ("snapshot", "size", "10"),
    ("snapshot", "size", MISSING),
    ("snapshot", "crc", -1),
    ("snapshot", "crc", 2**32),
    ("snapshot", "crc", 7.0),
    ("snapshot", "crc", MISSING),
    ("snapshot", "data", "0123456789"),
    ("snapshot", "data", bytearray(b"0123456789")),
    ("snapshot", "data", [48, 49]),
    ("snapshot", "data", b""),
    ("snapshot", "data", None),
    ("snapshot", "data", MISSING),
    ("snapshot", "data", b"x" * (MAX_SNAPSHOT_CHUNK + 1)),  # with a size that fits it, below
    ("snapshot_ack", "index", 0),
    ("snapshot_ack", "offset", -1),
    ("snapshot_ack", "offset", BIG),
    ("snapshot_ack", "offset", False),
    ("snapshot_ack", "offset", MISSING),
    ("snapshot_ack", "term", MISSING),
    ("fetch", "offset", MISSING),
    ("fetch", "offset", -5),
    ("fetch", "offset", BIG),
    ("fetch", "offset", "5"),
    ("fetch", "snap_index", MISSING),
    ("fetch", "snap_index", 0),  # an offset into no image
    ("fetch", "snap_index", True),
    ("fetch_reply", "snapshot", "x"),
    ("fetch_reply", "snapshot", {}),
    ("fetch_reply", "snapshot", {"offset": 5, "size": 10, "crc": 7}),
    ("fetch_reply", "snapshot", {"offset": 5, "size": 10, "crc": 7, "data": b"5678", "x": 1}),
    ("fetch_reply", "snapshot", {"offset": 5, "size": 10, "crc": 7, "data": "56789"}),
    ("fetch_reply", "snapshot", {"offset": 6, "size": 10, "crc": 7, "data": b"56789"}),
    ("fetch_reply", "snapshot", {"offset": 5, "size": 10, "crc": -7, "data": b"56789"}),
    ("fetch_reply", "snapshot", {"offset": 5, "size": 0, "crc": 7, "data": b"56789"}),
    ("fetch_reply", "snapshot", {"offset": 0, "size": 10, "crc": 7, "data": b"56789"}),  # not last
    ("fetch_reply", "snapshot", {"offset": 0, "size": 10, "crc": 7, "data": b""}),
    ("fetch_reply", "prev_index", 0),  # a chunk of an image at 0
]


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_the_chunked_snapshot_messages_are_well_formed(kind: str) -> None:
    assert messages.validate(GOOD[kind]) is not None


@pytest.mark.parametrize(("kind", "field", "value"), BAD)
def test_snapshot_messages_malformed_in_any_field_are_refused(
    kind: str, field: str, value: Any
) -> None:
    msg = {k: v for k, v in GOOD[kind].items() if k != field}
    if value is not MISSING:
        msg[field] = value
    if field == "data" and isinstance(value, bytes) and len(value) > MAX_SNAPSHOT_CHUNK:
        msg["size"] = len(value)
    if field == "prev_index":
        msg["entries"] = []
    assert messages.validate(msg) is None
    triad = Triad()
    triad.run(1.5)
    beta = triad.reps["beta"]
    before = (beta.role, beta.term, beta.primary, beta.last, beta.commit)
    effects = beta.on_message("alpha", msg, triad.now)
    assert effects and all(isinstance(e, Dropped) for e in effects)
    assert (beta.role, beta.term, beta.primary, beta.last, beta.commit) == before


def test_unknown_sender_is_dropped() -> None:
    beta = Replica("beta", NAMES, T, Durable(), 0.0)
    hb = messages.Heartbeat(5, "mallory", Role.PRIMARY, 0, 0, 0, "mallory").to_wire()
    assert beta.on_message("mallory", hb, 0.1) == [Dropped("mallory", "unknown sender")]
    assert beta.term == 0


_wire = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=6)
    ),
    max_leaves=20,
)
_fields = st.sampled_from(
    [
        "term",
        "node",
        "role",
        "last",
        "last_term",
        "commit",
        "primary",
        "candidate",
        "transfer",
        "pre",
        "req_term",
        "granted",
        "prev_index",
        "prev_term",
        "entries",
        "ok",
        "match",
        "index",
        "term_at",
        "data",
        "from_index",
        "snapshot",
        "offset",
        "size",
        "crc",
        "snap_index",
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(
        [
            "hb",
            "vote_req",
            "vote",
            "append",
            "append_ack",
            "snapshot",
            "snapshot_ack",
            "timeout_now",
            "fetch",
            "fetch_reply",
            "zzz",
        ]
    ),
    body=st.dictionaries(_fields, _wire, max_size=12),
)
def test_on_message_never_raises(kind: str, body: dict[str, Any]) -> None:
    r = Replica("beta", NAMES, T, Durable(term=1, entries=log_of([(1, 1)]), commit=1), 0.0)
    r.on_message("alpha", {"t": kind, **body}, 1.0)
    r.on_tick(1.1)
    assert r.commit == 1 and r.entries(1, 1) == log_of([(1, 1)])
