"""Focused tests of the replica state machine, with a fake clock and a lock-step network."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zbroker.peers import messages
from zbroker.peers.replica import Replica
from zbroker.peers.types import (
    Committed,
    Dropped,
    Durable,
    Effect,
    Entry,
    InstallSnapshot,
    NotServing,
    PersistEntries,
    PersistHardState,
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


class Triad:
    """Replicas wired by an instant, lossless network; ``down`` and ``blocked`` cut links."""

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
                self.queue.append((name, e.to, e.msg))
            elif isinstance(e, Publish):
                for peer in NAMES:
                    if peer != name:
                        self.queue.append((name, peer, e.msg))

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
            self.do(dst, self.reps[dst].on_message(src, msg, self.now))

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


def test_lagging_backup_catches_up_from_a_snapshot() -> None:
    triad = Triad(timing=Timing(keep_tail=2, max_batch=4))
    triad.run(1.5)
    triad.down.add("gamma")
    for _ in range(30):
        triad.propose("alpha", 2)
        triad.step()
    alpha = triad.reps["alpha"]
    term = alpha.log.term_at(alpha.commit)
    assert term is not None
    alpha.compacted(alpha.commit, term, {"state": alpha.commit})
    triad.restart("gamma", Durable())
    triad.run(1.0)
    installs = [e for e in triad.seen["gamma"] if isinstance(e, InstallSnapshot)]
    assert installs and installs[0].snapshot == {"state": installs[0].index}
    assert triad.reps["gamma"].commit == alpha.commit == alpha.last


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
    {"t": "snapshot", "term": 9, "index": 3, "term_at": 10, "data": {}},
    {
        "t": "fetch_reply",
        "term": 9,
        "prev_index": 0,
        "prev_term": 0,
        "entries": [],
        "last": 0,
        "snapshot": "x",
    },
    {"t": "fetch", "term": 1, "from_index": 0},
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


def test_unknown_sender_is_dropped() -> None:
    beta = Replica("beta", NAMES, T, Durable(), 0.0)
    hb = messages.Heartbeat(5, "mallory", Role.PRIMARY, 0, 0, 0, "mallory").to_wire()
    assert beta.on_message("mallory", hb, 0.1) == [Dropped("mallory", "unknown sender")]
    assert beta.term == 0


_wire = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=8),
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
