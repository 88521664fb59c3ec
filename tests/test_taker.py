"""The snapshot taker (broker/taker.py): its ledger of the committed deltas, kept from one
snapshot to the next and rebuilt from the snapshot file when the log no longer vouches
for it; and the process a node asks, through its data directory."""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_ledger import LEASE, World, ent
from zbroker.broker.apply import LedgerSettings
from zbroker.broker.image import image_of
from zbroker.broker.ledger import Ledger, LedgerError
from zbroker.broker.limits import Limits
from zbroker.broker.storage import Storage, bootstrap, read_log
from zbroker.broker.taker import NotYet, ShadowLedger, Taker, answer_of

SETTINGS = LedgerSettings(LEASE, Limits(), 60.0)


def history(sessions: int = 10) -> tuple[list[tuple[int, int, Any]], list[dict[str, Any]]]:
    """Log entries (term 1, then 2 from the middle on) of a primary's decisions, and the
    ledger's snapshot map after each entry (index 0: the empty ledger's)."""
    entitlements = [ent(count=100)]
    w = World(entitlements, Ledger(entitlements, lease=LEASE, heartbeat=LEASE / 3))
    w.log.insert(0, w.ledger.reload_delta(w.ledger.entitlements))  # as every log starts
    for s in range(sessions):
        w.open(f"s{s}")
        w.checkout(f"s{s}", 2)
    w.send("checkin", "s0", grant=1)
    w.send("close", "s1")
    maps = [SETTINGS.empty().snapshot()]
    replay = SETTINGS.empty()
    entries = []
    for i, delta in enumerate(w.log, 1):
        replay.apply(delta)
        maps.append(replay.snapshot())
        entries.append((i, 1 if i <= len(w.log) // 2 else 2, delta))
    assert maps[-1] == w.ledger.snapshot()
    return entries, maps


@pytest.mark.unit
def test_its_ledger_holds_the_committed_deltas_and_is_kept_between_snapshots() -> None:
    entries, maps = history()
    shadow = ShadowLedger(SETTINGS)
    first = shadow.at(None, entries, 5, 1)
    assert first.snapshot() == maps[5]
    last = len(entries)
    assert shadow.at(None, entries, last, 2) is first  # brought forward, not rebuilt
    assert first.snapshot() == maps[last] and (shadow.index, shadow.term) == (last, 2)
    assert shadow.at(None, entries, last, 2).snapshot() == maps[last]  # asked twice


@pytest.mark.unit
def test_it_starts_from_the_snapshot_file_and_goes_on_through_a_compaction() -> None:
    entries, maps = history()
    replayed = SETTINGS.empty()
    for _, _, delta in entries[:8]:
        replayed.apply(delta)
    at8 = image_of(replayed, 8, 1)
    shadow = ShadowLedger(SETTINGS)
    # A fresh taker: from the snapshot at 8 and the entries the log keeps after it.
    assert shadow.at(at8, entries[8:], 12, 2).snapshot() == maps[12]
    # The log of a compaction half done (the snapshot renamed, the log not yet rewritten):
    # its entries begin before the snapshot's index; the taker's index is held there.
    ledger = shadow.ledger
    assert shadow.at(at8, entries, 14, 2) is ledger and ledger.snapshot() == maps[14]
    # A snapshot past the taker's ledger, whose log holds nothing before it: rebuilt.
    replayed.apply(entries[8][2])
    for _, _, delta in entries[9:16]:
        replayed.apply(delta)
    at16 = image_of(replayed, 16, 2)
    assert shadow.at(at16, entries[16:], 17, 2).snapshot() == maps[17]
    assert shadow.ledger is not ledger


@pytest.mark.unit
def test_a_log_whose_entry_differs_where_its_ledger_ends_rebuilds_it() -> None:
    entries, maps = history()
    shadow = ShadowLedger(SETTINGS)
    shadow.at(None, entries, 10, 1)
    # Another history from 10 on (a node set aside and caught up again): entry 10 is of
    # another term now; the snapshot the node received covers up to 12.
    other = [(i, 3 if i >= 10 else t, d) for i, t, d in entries]
    replayed = SETTINGS.empty()
    for _, _, delta in entries[:12]:
        replayed.apply(delta)
    at12 = image_of(replayed, 12, 3)
    assert shadow.at(at12, other[12:], 15, 3).snapshot() == maps[15]
    assert (shadow.index, shadow.term) == (15, 3)


@pytest.mark.unit
def test_entries_the_log_does_not_hold_are_not_yet_there() -> None:
    entries, _ = history()
    shadow = ShadowLedger(SETTINGS)
    last = len(entries)
    with pytest.raises(NotYet, match=f"entry {last + 1} of term 2"):
        shadow.at(None, entries, last + 1, 2)
    with pytest.raises(NotYet, match="entry 5 of term 2"):
        shadow.at(None, entries, 5, 2)  # entry 5 is of term 1
    with pytest.raises(NotYet, match="does not follow the snapshot at 0"):
        shadow.at(None, entries[3:], 6, 1)  # entries 1-3 missing, and no snapshot
    snap = image_of(SETTINGS.empty(), 9, 1)
    with pytest.raises(NotYet, match="snapshot at 9 is past 5"):
        shadow.at(snap, entries, 5, 1)


@pytest.mark.unit
def test_a_delta_it_cannot_apply_makes_it_start_again_from_the_snapshot() -> None:
    entries, maps = history()
    shadow = ShadowLedger(SETTINGS)
    shadow.at(None, entries, 4, 1)
    bad = [*entries[:5], (6, 1, {"k": "checkin", "sid": "nobody", "grant": 999})]
    with pytest.raises(LedgerError):
        shadow.at(None, bad, 6, 1)
    assert shadow.ledger is None
    assert shadow.at(None, entries, 6, 1).snapshot() == maps[6]


@pytest.mark.unit
def test_the_node_reads_the_takers_answer_and_nothing_else_as_one() -> None:
    assert answer_of(b'{"index": 7, "term": 2, "ok": true}', (7, 2)) == (True, "")
    refused = b'{"index": 7, "term": 2, "ok": false, "why": "the log does not hold it"}'
    assert answer_of(refused, (7, 2)) == (False, "the log does not hold it")
    assert answer_of(b'{"index": 6, "term": 2, "ok": true}', (7, 2)) == (
        False,
        "the taker answered for the snapshot at 6, not 7",
    )
    for junk in (b"DeprecationWarning: something", b"[1, 2]", b'{"index": 7}', b"\xff"):
        taken, why = answer_of(junk, (7, 2))
        assert not taken and why.startswith("the taker answered b")


def stored(tmp_path: Path, entries: list[tuple[int, int, Any]]) -> tuple[Path, Storage]:
    """Node alpha's data directory, its log holding ``entries`` (synced), and its storage."""
    data = tmp_path / "alpha"
    bootstrap(data, "alpha")
    storage = Storage(data, "alpha")
    storage.load()
    storage.append(entries)
    storage.sync()
    return data, storage


def _wait_answer(taker: Taker, timeout: float = 30.0) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    while (answer := taker.answer()) is None:
        assert time.monotonic() < deadline, "the taker did not answer"
        time.sleep(0.01)  # polling the pipe, as the node's loop does each cycle
    return answer


@pytest.mark.integration
def test_the_taker_process_writes_the_snapshot_a_node_asks_for(tmp_path: Path) -> None:
    entries, maps = history()
    data, storage = stored(tmp_path, entries[:10])
    taker = Taker(data, "alpha", SETTINGS, fsync=True)
    try:
        taker.ask(7, 1)
        assert _wait_answer(taker) == (True, "")
        image = storage.taken_image(7, 1)
        assert SETTINGS.loader(image).finish().snapshot() == maps[7]
        storage.save_snapshot(image, "taken")
        storage.append(entries[10:])
        storage.sync()
        snap, kept = read_log(data)
        assert snap is not None and snap.index == 7 and kept[0][0] <= 8
        taker.ask(len(entries), 2)
        assert _wait_answer(taker) == (True, "")
        image = storage.taken_image(len(entries), 2)
        assert SETTINGS.loader(image).finish().snapshot() == maps[-1]
        taker.ask(len(entries) + 5, 2)  # never written: it says so, after looking a while
        taken, why = _wait_answer(taker)
        assert not taken and f"entry {len(entries) + 5} of term 2" in why
    finally:
        taker.stop()
        storage.close()


@pytest.mark.integration
def test_a_taker_that_died_is_said_so_and_started_again_at_the_next_ask(tmp_path: Path) -> None:
    entries, maps = history()
    data, storage = stored(tmp_path, entries)
    taker = Taker(data, "alpha", SETTINGS, fsync=False)
    try:
        taker.ask(3, 1)
        assert _wait_answer(taker) == (True, "")
        first = taker.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)  # the OOM killer's choice, say
        taker.ask(5, 1)
        assert _wait_answer(taker) == (False, "the snapshot taker ended with -9")
        taker.ask(5, 1)
        assert _wait_answer(taker) == (True, "")
        assert taker.pid not in (None, first)
        image = storage.taken_image(5, 1)
        assert SETTINGS.loader(image).finish().snapshot() == maps[5]
    finally:
        taker.stop()
        storage.close()


@pytest.mark.integration
def test_a_taker_that_cannot_start_is_a_snapshot_not_taken_not_a_crash(tmp_path: Path) -> None:
    # A flood of connections can leave the node no descriptor for the taker's pipes.
    entries, maps = history()
    data, storage = stored(tmp_path, entries)
    taker = Taker(data, "alpha", SETTINGS, fsync=False)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
        try:
            taker.ask(3, 1)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        taken, why = _wait_answer(taker)
        assert not taken and why.startswith("cannot start the taker: [Errno 24]"), why
        assert taker.asked is None and taker.pid is None
        taker.ask(3, 1)  # descriptors again: it starts
        assert _wait_answer(taker) == (True, "")
        assert SETTINGS.loader(storage.taken_image(3, 1)).finish().snapshot() == maps[3]
    finally:
        taker.stop()
        storage.close()
