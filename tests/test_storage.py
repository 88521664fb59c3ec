"""The data directory: restarts, torn writes, compaction, the lock, damage and disk errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zbroker.broker import storage as storage_module
from zbroker.broker.image import image_of, load_image
from zbroker.broker.ledger import Ledger
from zbroker.broker.model import Entitlement
from zbroker.broker.storage import (
    LOCK,
    DataDirLocked,
    DiskError,
    Loaded,
    Storage,
    StorageError,
    bootstrap,
    write_marker,
)
from zbroker.clients.testing import wait_for
from zbroker.peers.types import Image

pytestmark = pytest.mark.unit

TRIAD = ("alpha", "beta", "gamma")


@pytest.fixture
def opened() -> Iterator[Callable[[Path], Storage]]:
    """Storages for a data directory, each closed (and unlocked) at the end of the test."""
    made: list[Storage] = []

    def make(data: Path) -> Storage:
        store = Storage(data, "alpha", fsync=False, nodes=TRIAD)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def _reload(data: Path) -> Loaded:
    store = Storage(data, "alpha", fsync=False, nodes=TRIAD)
    try:
        return store.load()
    finally:
        store.close()


def _populated(data: Path) -> Loaded:
    """A directory as a node leaves it: marker, term and vote, a few batches, a truncation."""
    write_marker(data, "alpha")
    store = Storage(data, "alpha", fsync=False, nodes=TRIAD)
    store.load()
    store.save_hard_state(2, "beta")
    store.append([(1, 1, {"k": "a"}), (2, 1, {"k": "b"}), (3, 1, None)])
    store.truncate(3)
    store.append([(3, 2, {"k": "c"})])
    store.append([(4, 2, {"k": "d", "at": 0})])
    store.close()
    return _reload(data)


def record_spans(data: Path) -> list[tuple[int, int]]:
    """(offset, end) of each record of the log: a 12-byte header, the body, an end byte."""
    raw = (data / "log").read_bytes()
    out, pos = [], 0
    while True:
        (length,) = struct.unpack_from("<I", raw, pos)
        if length == 0:
            return out
        out.append((pos, pos + 12 + length + 1))
        pos += 12 + length + 1


def ledger_of(seats: int) -> Ledger:
    """A small ledger that says which it is: a pool of ``seats`` seats."""
    ledger = Ledger((), lease=30.0, heartbeat=10.0)
    line = Entitlement("cad", "1.0", seats, None, None, None, source="t.lic:1")
    ledger.apply(ledger.reload_delta([line]))
    return ledger


def seats_of(image: Image | None) -> int:
    assert image is not None
    (line,) = load_image(image, lease=30.0, heartbeat=10.0).entitlements
    return line.count


def take(store: Storage, index: int, term: int, seats: int | None = None) -> Image:
    """Store a snapshot as a node's own: written by ``write_taken``, then saved."""
    store.write_taken(ledger_of(seats or index), index, term)
    image = store.taken_image(index, term)
    store.save_snapshot(image, "taken")
    return image


def receive(
    store: Storage, index: int, term: int, seats: int | None = None, chunk: int = 7
) -> Image:
    """Store a snapshot as one received from a peer: chunk by chunk, then saved."""
    image = image_of(ledger_of(seats or index), index, term)
    for offset in range(0, image.size, chunk):
        store.save_snapshot_chunk(index, term, offset, image.chunk(offset, chunk))
    store.save_snapshot(image, "received")
    return image


def _state(loaded: Loaded) -> tuple[Any, ...]:
    return (
        loaded.fresh,
        loaded.term,
        loaded.voted_for,
        loaded.snapshot_index,
        loaded.snapshot_term,
        image_values(loaded.snapshot),
        loaded.entries,
    )


def image_values(image: Image | None) -> tuple[int, int, int, bytes] | None:
    """An image as values: images compare by identity, never by their bytes."""
    return None if image is None else (image.index, image.term, image.crc, bytes(image.buf))


def _damaged(data: Path, loaded: Loaded, *names: str) -> None:
    """The load came back as a wiped node's, with the files set aside and named."""
    assert loaded.fresh and loaded.damaged, loaded
    assert (loaded.term, loaded.voted_for, loaded.entries, loaded.snapshot) == (0, None, [], None)
    aside = sorted(data.glob("damaged-*"))
    assert len(aside) == 1, aside
    assert str(aside[0]) in loaded.why
    for name in names:
        assert f"{data / name}" in loaded.why, loaded.why
    assert (aside[0] / "node.json").exists()
    assert not (data / "node.json").exists()  # unmarked now: fresh until it catches up
    again = _reload(data)
    assert again.fresh and not again.damaged  # and the next start is a plain fresh one


def _write_raw_log(data: Path, records: list[Any], zeros: int = 64) -> None:
    """A log of hand-made records, each with a valid checksum."""
    out = b"".join(storage_module._frame(record) for record in records)
    (data / "log").write_bytes(out + bytes(zeros))


# --- the basics


def test_a_directory_without_marker_is_fresh(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert _reload(data).fresh
    write_marker(data, "alpha")
    assert not _reload(data).fresh


def test_marker_of_another_node_of_the_triad_is_refused_and_nothing_moves(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_marker(data, "beta")
    with pytest.raises(StorageError, match="belongs to node 'beta'"):
        _reload(data)
    assert (data / "node.json").exists() and not list(data.glob("damaged-*"))


def test_log_hard_state_and_truncation_round_trip(tmp_path: Path) -> None:
    loaded = _populated(tmp_path / "data")
    assert loaded.entries == [
        (1, 1, {"k": "a"}),
        (2, 1, {"k": "b"}),
        (3, 2, {"k": "c"}),
        (4, 2, {"k": "d", "at": 0}),
    ]
    assert (loaded.term, loaded.voted_for, loaded.damaged) == (2, "beta", False)


@pytest.mark.parametrize("source", ["taken", "received"])
def test_snapshot_compacts_the_log(
    tmp_path: Path, opened: Callable[[Path], Storage], source: str
) -> None:
    data = tmp_path / "data"
    write_marker(data, "alpha")
    store = opened(data)
    store.load()
    store.save_hard_state(1, None)
    store.append([(i, 1, {"k": f"d{i}"}) for i in range(1, 6)])
    store.append([(i, 1, {"k": f"d{i}"}) for i in range(6, 11)])
    image = (take if source == "taken" else receive)(store, 8, 1)
    assert image_values(store.image()) == image_values(image)
    assert isinstance(store.image().buf, memoryview)  # type: ignore[union-attr]
    store.append([(11, 1, {"k": "d11"})])
    store.close()
    loaded = _reload(data)
    assert (loaded.snapshot_index, loaded.snapshot_term) == (8, 1)
    assert image_values(loaded.snapshot) == image_values(image)
    assert seats_of(loaded.snapshot) == 8
    assert loaded.entries == [(i, 1, {"k": f"d{i}"}) for i in range(9, 12)]
    assert sorted(p.name for p in data.iterdir()) == [
        "hardstate", "log", "node.json", "node.lock", "snapshot"
    ]  # fmt: skip


def test_the_rewrite_copies_the_records_bytes_from_the_one_holding_the_next_entry(
    tmp_path: Path, opened: Callable[[Path], Storage]
) -> None:
    data = tmp_path / "data"
    write_marker(data, "alpha")
    store = opened(data)
    store.load()
    store.save_hard_state(3, None)
    store.append([(i, 1, {"k": f"a{i}"}) for i in range(1, 5)])  # 1-4
    store.append([(i, 1, {"k": f"b{i}"}) for i in range(5, 9)])  # 5-8: holds 7, 8
    store.append([(9, 1, {"k": "c9"}), (10, 1, {"k": "c10"})])  # cut at 10 below
    store.truncate(10)
    store.append([(10, 3, {"k": "d10"}), (11, 3, {"k": "d11"})])
    store.truncate(11)
    store.sync()
    spans = record_spans(data)
    raw = (data / "log").read_bytes()
    tail = raw[spans[2][0] : spans[-1][1]]  # from the record holding entry 7 to the last
    take(store, 6, 1)
    store._settle()  # the rewrite runs off the loop: wait for it and switch to its log
    spans = record_spans(data)
    raw = (data / "log").read_bytes()
    assert raw[spans[1][0] : spans[-1][1]] == tail  # the same bytes, after the new base
    assert storage_module.unpack(raw[12 : spans[0][1] - 1]) == {"base": [6, 1]}
    store.append([(11, 3, {"k": "e11"})])
    store.close()
    loaded = _reload(data)
    assert loaded.snapshot_index == 6
    assert loaded.entries == [
        (7, 1, {"k": "b7"}), (8, 1, {"k": "b8"}), (9, 1, {"k": "c9"}),
        (10, 3, {"k": "d10"}), (11, 3, {"k": "e11"}),
    ]  # fmt: skip
    store = opened(data)  # a second compaction of a log that begins before its base
    store.load()
    take(store, 9, 1)
    store.append([(12, 3, {"k": "e12"})])
    store.close()
    assert [e[0] for e in _reload(data).entries] == [10, 11, 12]


def test_a_compaction_past_the_log_or_of_another_term_keeps_no_entries(
    tmp_path: Path, opened: Callable[[Path], Storage]
) -> None:
    data = tmp_path / "data"
    _populated(data)  # entries 1-4, entry 4 of term 2
    store = opened(data)
    store.load()
    store.save_hard_state(3, None)
    receive(store, 4, 3)  # the log's entry 4 is of term 2: its entries are not the snapshot's
    assert store.last == 4
    store.truncate(5)  # as the replica's TruncateLog: nothing left to cut, nothing written
    store.append([(5, 3, {"k": "e"})])
    receive(store, 9, 3)  # past the log's end
    store.append([(10, 3, {"k": "j"})])
    store.close()
    loaded = _reload(data)
    assert (loaded.snapshot_index, loaded.snapshot_term, loaded.entries) == (
        9,
        3,
        [(10, 3, {"k": "j"})],
    )


def _compaction_cut(data: Path, snapshot: Callable[[Storage, int, int], Image]) -> None:
    """Entries 1-7 and a snapshot at 6 (``take`` or ``receive``), the log as it was before
    the compaction's rewrite: as if the process died between the two."""
    _populated(data)
    store = Storage(data, "alpha", fsync=False, nodes=TRIAD)
    store.load()
    store.append([(5, 2, {"k": "e"}), (6, 2, {"k": "f"})])
    store.append([(7, 2, {"k": "g"})])
    store.sync()
    old_log = (data / "log").read_bytes()
    snapshot(store, 6, 2)
    store.close()
    (data / "log").write_bytes(old_log)


@pytest.mark.parametrize("source", ["taken", "received"])
def test_a_compaction_cut_between_snapshot_and_log_is_finished_at_load(
    tmp_path: Path, source: str
) -> None:
    data = tmp_path / "data"
    _compaction_cut(data, take if source == "taken" else receive)
    store = Storage(data, "alpha", fsync=False, nodes=TRIAD)
    loaded = store.load()
    assert (loaded.snapshot_index, loaded.entries, loaded.damaged) == (
        6,
        [(7, 2, {"k": "g"})],
        False,
    )
    base_record = record_spans(data)[0]
    raw = (data / "log").read_bytes()
    assert storage_module.unpack(raw[12 : base_record[1] - 1]) == {"base": [6, 2]}
    store.append([(8, 2, {"k": "h"})])
    store.close()
    assert [e[0] for e in _reload(data).entries] == [7, 8]


def test_a_full_disk_at_load_names_the_file_and_the_room_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The probe's node stopped by a full disk could not start again: finishing a
    # compaction at load writes log.tmp, and the message named only the directory.
    data = tmp_path / "data"
    _compaction_cut(data, take)
    real = storage_module._pwrite_all

    def full(fd: int, data: bytes, offset: int) -> int:
        if len(data) == storage_module._ZERO_CHUNK:  # the zeros laid ahead of the records
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(storage_module, "_pwrite_all", full)
    with pytest.raises(DiskError) as failed:
        Storage(data, "alpha", fsync=False, nodes=TRIAD).load()
    assert str(failed.value).startswith(f"{data / 'log.tmp'}: cannot use the data directory")
    assert "free 2 MiB beyond the data on its disk" in str(failed.value)


def test_a_received_snapshot_over_a_log_of_another_term_cut_before_the_rewrite_loads(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    _populated(data)  # entry 4 of term 2
    old_log = (data / "log").read_bytes()
    store = Storage(data, "alpha", fsync=False, nodes=TRIAD)
    store.load()
    store.save_hard_state(3, None)
    receive(store, 4, 3)
    store.close()
    (data / "log").write_bytes(old_log)
    loaded = _reload(data)
    assert (loaded.snapshot_index, loaded.entries, loaded.damaged) == (4, [], False)


def test_a_received_file_cut_short_is_discarded_at_load(
    tmp_path: Path, opened: Callable[[Path], Storage]
) -> None:
    data = tmp_path / "data"
    _populated(data)
    store = opened(data)
    store.load()
    image = image_of(ledger_of(9), 9, 2)
    store.save_snapshot_chunk(9, 2, 0, image.chunk(0, 100))  # the node dies here
    store.close()
    assert (data / "snapshot.received.tmp").exists()
    loaded = _reload(data)
    assert (loaded.snapshot, loaded.damaged, len(loaded.entries)) == (None, False, 4)
    assert not list(data.glob("*.tmp"))


def test_chunks_must_follow_each_other_and_a_new_start_discards_the_old(
    tmp_path: Path, opened: Callable[[Path], Storage]
) -> None:
    data = tmp_path / "data"
    _populated(data)
    store = opened(data)
    store.load()
    image = image_of(ledger_of(9), 9, 2)
    with pytest.raises(StorageError, match="does not follow"):
        store.save_snapshot_chunk(9, 2, 5, image.chunk(5, 5))  # nothing started
    store.save_snapshot_chunk(9, 2, 0, image.chunk(0, 5))
    with pytest.raises(StorageError, match="does not follow"):
        store.save_snapshot_chunk(9, 2, 10, image.chunk(10, 5))  # a gap
    with pytest.raises(StorageError, match="does not follow"):
        store.save_snapshot_chunk(8, 2, 5, image.chunk(5, 5))  # another snapshot's
    with pytest.raises(StorageError, match="not the"):
        store.save_snapshot(image, "received")  # incomplete
    other = image_of(ledger_of(5), 9, 2)
    store.save_snapshot_chunk(9, 2, 0, b"x" * 1000)  # a start over: offset 0 truncates
    for offset in range(0, other.size, 64):
        store.save_snapshot_chunk(9, 2, offset, other.chunk(offset, 64))
    store.save_snapshot(other, "received")
    assert (data / "snapshot").stat().st_size == other.size + 13
    assert seats_of(store.image()) == 5
    store.close()
    assert seats_of(_reload(data).snapshot) == 5


def test_a_snapshot_older_than_the_log_base_is_refused(
    tmp_path: Path, opened: Callable[[Path], Storage]
) -> None:
    data = tmp_path / "data"
    _populated(data)
    store = opened(data)
    store.load()
    take(store, 4, 2)
    store.write_taken(ledger_of(3), 3, 2)
    with pytest.raises(StorageError, match="older than the log's base 4"):
        store.save_snapshot(store.taken_image(3, 2), "taken")


def test_a_taken_file_that_is_not_the_snapshot_asked_for_is_refused(
    tmp_path: Path, opened: Callable[[Path], Storage]
) -> None:
    data = tmp_path / "data"
    _populated(data)
    store = opened(data)
    store.load()
    with pytest.raises(DiskError, match=r"snapshot\.taken\.tmp"):
        store.taken_image(3, 2)  # no child wrote one
    store.write_taken(ledger_of(3), 3, 2)
    with pytest.raises(StorageError, match="not the one at 4 of term 2"):
        store.taken_image(4, 2)
    raw = bytearray((data / "snapshot.taken.tmp").read_bytes())
    (data / "snapshot.taken.tmp").write_bytes(raw[:-9])  # a child killed as it wrote
    with pytest.raises(StorageError, match="the record says"):
        store.taken_image(3, 2)


@pytest.mark.integration
def test_write_taken_writes_in_a_forked_child(
    tmp_path: Path, opened: Callable[[Path], Storage]
) -> None:
    data = tmp_path / "data"
    _populated(data)
    store = opened(data)
    store.load()
    store.append([(5, 2, {"k": "e"})])  # buffered in the parent: the child must not flush it
    ledger = ledger_of(5)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            store.write_taken(ledger, 5, 2)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.save_snapshot(store.taken_image(5, 2), "taken")
    store.append([(6, 2, {"k": "f"})])
    store.close()
    loaded = _reload(data)
    assert seats_of(loaded.snapshot) == 5 and loaded.entries == [(6, 2, {"k": "f"})]


def test_the_log_is_grown_with_zeros_and_reopened_at_its_last_record(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _populated(data)
    assert (data / "log").stat().st_size >= 1 << 20  # records overwrite zeros
    for index in (5, 6):  # each reopen must write after the good records, not after the zeros
        store = Storage(data, "alpha", fsync=False, nodes=TRIAD)
        store.load()
        store.append([(index, 2, {"k": f"d{index}"})])
        store.close()
    assert [e[0] for e in _reload(data).entries] == [1, 2, 3, 4, 5, 6]


def test_a_write_before_load_is_refused(tmp_path: Path) -> None:
    write_marker(tmp_path / "data", "alpha")
    with pytest.raises(StorageError, match="not loaded"):
        Storage(tmp_path / "data", "alpha").append([(1, 1, None)])


def test_records_across_and_beyond_the_zeroed_chunks_read_back(
    tmp_path: Path, opened: Callable[[Path], Storage]
) -> None:
    data = tmp_path / "data"
    write_marker(data, "alpha")
    store = opened(data)
    store.load()
    store.save_hard_state(1, None)
    big = "x" * 700_000  # two of these cross the first 1 MiB of zeros; the last is 2.5 MiB
    store.append([(1, 1, {"k": big})])
    store.append([(2, 1, {"k": big})])
    store.append([(3, 1, {"k": "y" * (5 << 19)})])
    store.close()
    entries = _reload(data).entries
    assert [(i, len(d["k"])) for i, _, d in entries] == [(1, 700_000), (2, 700_000), (3, 5 << 19)]


# --- torn tails: what an interrupted append leaves is cut, and is not damage


@pytest.mark.parametrize(
    ("cut_in", "kept"),
    [
        ("last", [(1, 1), (2, 1), (3, 2)]),  # inside the one record written since the sync
        # several records since the sync (group commit), the crash in the first of them
        ("third_last", [(1, 1), (2, 1), (3, 1)]),
    ],
)
def test_a_torn_tail_is_cut_and_appends_continue(
    tmp_path: Path, cut_in: str, kept: list[tuple[int, int]]
) -> None:
    data = tmp_path / "data"
    _populated(data)
    log = data / "log"
    raw = bytearray(log.read_bytes())
    records = record_spans(data)
    start, end = records[-1] if cut_in == "last" else records[-3]
    for keep_bytes in (3, 14, (end - start) // 2):  # in the header, in the body
        torn = bytearray(raw)
        torn[start + keep_bytes :] = bytes(len(torn) - start - keep_bytes)  # unwritten: zeros
        log.write_bytes(bytes(torn))
        store = Storage(data, "alpha", fsync=False, nodes=TRIAD)
        loaded = store.load()
        assert not loaded.damaged, loaded.why
        assert [e[:2] for e in loaded.entries] == kept
        store.append([(4, 2, {"k": "z"})])
        store.close()
        assert [e[:2] for e in _reload(data).entries] == [*kept, (4, 2)]
        log.write_bytes(bytes(raw))


def test_a_whole_record_that_lost_only_its_end_byte_is_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    before = _populated(data)
    raw = bytearray((data / "log").read_bytes())
    raw[record_spans(data)[-1][1] - 1] = 0
    (data / "log").write_bytes(bytes(raw))
    assert _state(_reload(data)) == _state(before)


# --- damage: everything else


def _flip(data: Path, name: str, offset: int) -> None:
    raw = bytearray((data / name).read_bytes())
    raw[offset] ^= 0x10
    (data / name).write_bytes(bytes(raw))


def _cut(data: Path, name: str, size: int) -> None:
    raw = (data / name).read_bytes()
    (data / name).write_bytes(raw[:size])


DAMAGE: dict[str, Callable[[Path], str]] = {
    # a bad record with good ones after it
    "flip_in_a_middle_record": lambda d: (_flip(d, "log", record_spans(d)[1][0] + 10), "log")[1],
    # the last record, written to its end, reads wrong
    "flip_in_the_last_record": lambda d: (_flip(d, "log", record_spans(d)[-1][1] - 3), "log")[1],
    # a length that grows past the records after it
    "flip_in_a_length": lambda d: (_flip(d, "log", record_spans(d)[2][0] + 1), "log")[1],
    "flip_in_a_header_checksum": lambda d: (_flip(d, "log", record_spans(d)[1][0] + 9), "log")[1],
    "cut_at_a_record_boundary": lambda d: (_cut(d, "log", record_spans(d)[-1][0]), "log")[1],
    "cut_inside_a_record": lambda d: (_cut(d, "log", record_spans(d)[-1][0] + 12), "log")[1],
    "cut_in_the_zero_header": lambda d: (_cut(d, "log", record_spans(d)[-1][1] + 11), "log")[1],
    "data_after_the_end": lambda d: (_flip(d, "log", record_spans(d)[-1][1] + 100), "log")[1],
    "log_deleted": lambda d: ((d / "log").unlink(), "log")[1],
    "hardstate_flipped": lambda d: (_flip(d, "hardstate", 12), "hardstate")[1],
    "hardstate_cut": lambda d: (_cut(d, "hardstate", 5), "hardstate")[1],
    "hardstate_deleted": lambda d: ((d / "hardstate").unlink(), "hardstate")[1],
    "marker_garbled": lambda d: ((d / "node.json").write_bytes(b'{"node": "al'), "node.json")[1],
    "marker_not_a_map": lambda d: ((d / "node.json").write_bytes(b'["alpha"]'), "node.json")[1],
    "marker_of_a_stranger": lambda d: (
        (d / "node.json").write_bytes(b'{"node": "alpHa"}'),
        "node.json",
    )[1],
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damage_sets_the_files_aside_and_starts_fresh(tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"
    _populated(data)
    name = DAMAGE[kind](data)
    _damaged(data, _reload(data), name)


SHAPES: dict[str, list[Any]] = {
    "not_a_map": [{"base": [0, 0]}, [1, 2, 3]],
    "no_base": [{"e": [[1, 1, None]]}],
    "base_not_a_pair": [{"base": [0]}],
    "two_kinds": [{"base": [0, 0]}, {"e": [[1, 1, None]], "x": 1}],
    "unknown_kind": [{"base": [0, 0]}, {"q": 1}],
    "entry_not_a_triple": [{"base": [0, 0]}, {"e": [[1, 1]]}],
    "index_a_string": [{"base": [0, 0]}, {"e": [["1", 1, None]]}],
    "term_a_bool": [{"base": [0, 0]}, {"e": [[1, True, None]]}],
    "empty_batch": [{"base": [0, 0]}, {"e": []}],
    "gap": [{"base": [0, 0]}, {"e": [[1, 1, None]]}, {"e": [[3, 1, None]]}],
    "term_goes_down": [{"base": [0, 0]}, {"e": [[1, 2, None], [2, 1, None]]}],
    "term_zero": [{"base": [0, 0]}, {"e": [[1, 0, None]]}],
    "delta_not_a_map": [{"base": [0, 0]}, {"e": [[1, 1, "grant"]]}],
    "delta_without_kind": [{"base": [0, 0]}, {"e": [[1, 1, {"sid": "x"}]]}],
    "truncation_past_the_end": [{"base": [0, 0]}, {"e": [[1, 1, None]]}, {"x": 5}],
    "truncation_of_the_base": [{"base": [0, 0]}, {"e": [[1, 1, None]]}, {"x": 0}],
    # the first record may begin before the base (a compaction copies it whole), no other
    "covered_entries_with_a_gap": [
        {"base": [3, 1]},
        {"e": [[1, 1, None], [3, 1, None], [4, 1, None]]},
    ],
    "only_covered_entries": [{"base": [3, 1]}, {"e": [[2, 1, None], [3, 1, None]]}],
    "covered_entries_later": [
        {"base": [3, 1]},
        {"e": [[4, 1, None]]},
        {"e": [[3, 1, None], [4, 1, None]]},
    ],
}


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_a_well_framed_log_record_of_the_wrong_shape_is_damage(tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"
    _populated(data)
    _write_raw_log(data, SHAPES[kind])
    _damaged(data, _reload(data), "log")


def test_a_log_of_a_term_beyond_the_hardstate_is_damage(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _populated(data)  # term 2 in the hardstate
    _write_raw_log(data, [{"base": [0, 0]}, {"e": [[1, 3, None]]}])
    _damaged(data, _reload(data), "hardstate")


@pytest.mark.parametrize(
    ("name", "record"),
    [
        ("hardstate", {"term": -1, "voted_for": None}),
        ("hardstate", {"term": 2}),
        ("hardstate", {"term": 2, "voted_for": 7}),
        ("hardstate", [2, "beta"]),
        ("snapshot", {"v": 1, "index": 0, "term": 1}),  # its head, and nothing after it
        ("snapshot", {"v": 1, "index": "4", "term": 2}),
        ("snapshot", {"v": 1, "index": 4, "term": -1}),
        ("snapshot", {"v": 1, "index": 4}),
        ("snapshot", "ledger"),
    ],
)
def test_a_small_file_of_the_wrong_shape_is_damage(tmp_path: Path, name: str, record: Any) -> None:
    data = tmp_path / "data"
    _populated(data)
    (data / name).write_bytes(storage_module._frame(record))
    _damaged(data, _reload(data), name)


def test_a_snapshot_deleted_after_a_compaction_is_damage(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _populated(data)
    store = Storage(data, "alpha", fsync=False, nodes=TRIAD)
    store.load()
    take(store, 4, 2)  # the log is now empty after it
    store.close()
    (data / "snapshot").unlink()
    _damaged(data, _reload(data), "snapshot")


def _snapshot_at_4(data: Path) -> int:
    """A directory whose log follows its snapshot at 4 (of term 2); the snapshot's size."""
    _populated(data)
    store = Storage(data, "alpha", fsync=False, nodes=TRIAD)
    store.load()
    image = take(store, 4, 2)
    store.close()
    return image.size


def _replace_snapshot(data: Path, index: int, term: int) -> None:
    body = image_of(ledger_of(1), index, term).buf
    (data / "snapshot").write_bytes(
        storage_module._header(len(body), zlib.crc32(body)) + body + b"\xa5"
    )


SNAPSHOT_DAMAGE: dict[str, Callable[[Path, int], object]] = {
    "a_flip_in_its_body": lambda d, size: _flip(d, "snapshot", 12 + size // 2),
    "a_flip_in_its_header": lambda d, size: _flip(d, "snapshot", 3),
    "a_flip_in_its_end_byte": lambda d, size: _flip(d, "snapshot", 12 + size),
    "cut_short": lambda d, size: _cut(d, "snapshot", 12 + size),
    "cut_in_its_header": lambda d, size: _cut(d, "snapshot", 8),
    "a_byte_after_it": lambda d, size: (d / "snapshot").write_bytes(
        (d / "snapshot").read_bytes() + b"\0"
    ),
    "undecodable": lambda d, size: (d / "snapshot").write_bytes(
        storage_module._header(1, zlib.crc32(b"\xc1")) + b"\xc1\xa5"
    ),
    "older_than_the_log_base": lambda d, size: _replace_snapshot(d, 3, 2),
    "of_another_term_than_the_log_base": lambda d, size: _replace_snapshot(d, 4, 1),
}


@pytest.mark.parametrize("kind", sorted(SNAPSHOT_DAMAGE))
def test_a_damaged_snapshot_file_is_damage(tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"
    size = _snapshot_at_4(data)
    assert _reload(data).snapshot_index == 4
    SNAPSHOT_DAMAGE[kind](data, size)
    _damaged(data, _reload(data), "snapshot")


def test_a_new_directory_holds_an_empty_state(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_marker(data, "alpha")  # what zbroker init leaves: marker, hardstate, empty log
    assert _state(_reload(data)) == (False, 0, None, 0, 0, None, [])
    assert sorted(p.name for p in data.iterdir()) == ["hardstate", "log", "node.json", "node.lock"]


def test_an_unmarked_directory_discards_what_an_unfinished_recovery_left(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _populated(data)
    (data / "node.json").unlink()
    loaded = _reload(data)
    assert loaded.fresh and not loaded.damaged and "discarded hardstate, log" in loaded.why
    assert not list(data.glob("damaged-*"))
    write_marker(data, "alpha")  # as a recovery does once it has caught up
    assert _state(_reload(data)) == (False, 0, None, 0, 0, None, [])


# --- any corruption: the state loaded is the one written, or the load says damage


@st.composite
def corruptions(draw: st.DrawFn) -> list[tuple[str, str, int, int]]:
    names = ["node.json", "hardstate", "snapshot", "log"]
    ops = st.tuples(
        st.sampled_from(["flip", "cut", "delete"]),
        st.sampled_from(names),
        st.integers(0, 1 << 30),  # where, taken modulo the interesting part of the file
        st.integers(1, 255),  # the bits flipped
    )
    result: list[tuple[str, str, int, int]] = draw(st.lists(ops, min_size=1, max_size=3))
    return result


def corrupt(data: Path, ops: list[tuple[str, str, int, int]]) -> None:
    """Flip bytes, cut or delete files of a stopped node's directory (tests/test_data_dir.py
    uses it too). Offsets fall mostly where the records are, sometimes in the zeros."""
    for op, name, where, bits in ops:
        path = data / name
        if not path.exists():
            continue
        raw = bytearray(path.read_bytes())
        used = len(raw.rstrip(b"\0")) + 16
        offset = where % used if where % 4 else where % max(1, len(raw))
        if op == "delete":
            path.unlink()
        elif op == "cut":
            path.write_bytes(bytes(raw[: min(offset, len(raw))]))
        elif raw:
            raw[min(offset, len(raw) - 1)] ^= bits
            path.write_bytes(bytes(raw))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=corruptions(), snapshot=st.booleans())
def test_any_corruption_loads_the_same_state_or_is_damage(
    tmp_path: Path, ops: list[tuple[str, str, int, int]], snapshot: bool
) -> None:
    data = tmp_path / f"data-{os.urandom(6).hex()}"
    before = _populated(data)
    if snapshot:
        store = Storage(data, "alpha", fsync=False, nodes=TRIAD)
        store.load()
        take(store, 3, 2)
        store.close()
        before = _reload(data)
        assert before.entries == [(4, 2, {"k": "d", "at": 0})]
    corrupt(data, ops)
    after = _reload(data)
    if after.damaged:
        assert after.fresh and after.entries == [] and after.term == 0
    elif after.fresh:
        assert not (data / "node.json").exists()  # only a deleted marker makes it fresh
    else:
        assert _state(after) == _state(before)


# --- the lock


@pytest.mark.parametrize("lock_deleted", [False, True])
def test_a_second_process_for_the_directory_is_refused_and_touches_nothing(
    tmp_path: Path, opened: Callable[[Path], Storage], lock_deleted: bool
) -> None:
    # Administrators delete "stale" lock files: a second process that locked a new
    # node.lock read the live log mid-write as damage and moved the node's files aside.
    data = tmp_path / "data"
    _populated(data)
    first = opened(data)
    first.load()
    first.append([(5, 2, {"k": "e"})])
    first.sync()
    if lock_deleted:
        (data / LOCK).unlink()
    files = {p.name: p.read_bytes() for p in data.iterdir()}
    with pytest.raises(DataDirLocked) as refused:
        opened(data).load()
    holder = "pid unknown" if lock_deleted else f"pid {os.getpid()}"
    assert str(data) in str(refused.value) and holder in str(refused.value)
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.name != LOCK} == {
        name: content for name, content in files.items() if name != LOCK
    }
    first.close()  # released with the process (or at close): the next one may start
    assert [e[0] for e in _reload(data).entries] == [1, 2, 3, 4, 5]


# --- a directory restored from an older copy


def test_a_directory_older_than_its_progress_record_is_set_aside(
    tmp_path: Path, opened: Callable[[Path], Storage]
) -> None:
    # Consistent but old (a restored backup), it would vote with grants it lost.
    data = tmp_path / "alpha"
    _populated(data)  # term 2, entries 1-4
    backup = tmp_path / "backup"
    shutil.copytree(data, backup)
    store = opened(data)
    store.load()
    store.save_hard_state(3, None)
    store.append([(5, 3, {"k": "e"})])
    store.sync()
    assert store.save_progress(commit=9) is None  # held up to 5: 5 is recorded
    assert json.loads(store.progress_path.read_text()) == {"node": "alpha", "term": 3, "index": 5}
    store.close()
    assert not _reload(data).fresh  # the directory itself is as recorded
    shutil.rmtree(data)
    shutil.copytree(backup, data)
    loaded = _reload(data)
    assert loaded.fresh and loaded.damaged, loaded
    assert "older than this node has been: it held term 3 and entry 5" in loaded.why
    assert "holds term 2 and entries to 4" in loaded.why


def test_a_progress_record_that_cannot_vouch_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "alpha"
    _populated(data)
    progress = tmp_path / "alpha.progress"
    for text in ("", "{", '{"node": "beta", "term": 9, "index": 99}', '{"term": "x"}'):
        progress.write_text(text)
        assert not _reload(data).fresh, text
    progress.write_text('{"node": "alpha", "term": 9, "index": 99}')
    alone = Storage(data, "alpha", fsync=False, nodes=("alpha",))  # a single server's only copy
    try:
        assert not alone.load().fresh
    finally:
        alone.close()
    assert _reload(data).damaged  # the same record, in a triad


def test_a_brand_new_node_forgets_an_earlier_triads_progress_record(tmp_path: Path) -> None:
    # A site that starts over (data directories deleted, zbroker bootstrap) would else
    # find all three new directories "older" than the old records, and none could vote.
    data = tmp_path / "alpha"
    _populated(data)
    progress = tmp_path / "alpha.progress"
    progress.write_text('{"node": "alpha", "term": 9, "index": 99}')
    shutil.rmtree(data)
    bootstrap(data, "alpha")
    assert not progress.exists()
    loaded = _reload(data)
    assert not loaded.fresh and not loaded.damaged


def test_a_progress_record_that_cannot_be_written_is_said_not_raised(
    tmp_path: Path, opened: Callable[[Path], Storage]
) -> None:
    data = tmp_path / "alpha"
    _populated(data)
    (tmp_path / "alpha.progress.tmp").mkdir()  # the write's temporary name is taken
    store = opened(data)
    store.load()
    why = store.save_progress(commit=4)
    assert why is not None and why.startswith(f"{tmp_path / 'alpha.progress'}: cannot write")
    store.append([(5, 2, {"k": "e"})])  # the node goes on
    store.sync()


@pytest.mark.integration
def test_the_lock_is_another_process_s_and_dies_with_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_marker(data, "alpha")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from zbroker.broker.storage import Storage;"
            f"s = Storage(Path({str(data)!r}), 'alpha'); s.load(); print('locked', flush=True);"
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(DataDirLocked, match=f"pid {holder.pid}"):
            _reload(data)
    finally:
        holder.kill()
        holder.wait()
    assert not _reload(data).fresh  # a killed holder leaves no stale lock


def test_a_data_directory_that_is_a_file_or_cannot_be_made_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StorageError, match=f"{tmp_path / 'file'}: not a directory"):
        _reload(tmp_path / "file")
    with pytest.raises(StorageError, match="cannot create the data directory"):
        _reload(tmp_path / "file" / "data")


def test_a_data_directory_this_user_cannot_write_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # os.access stands in for permissions, which the root user of CI would pass anyway.
    data = tmp_path / "data"
    write_marker(data, "alpha")
    monkeypatch.setattr(storage_module.os, "access", lambda path, mode: False)
    with pytest.raises(StorageError, match=f"{data}: the data directory is not writable"):
        _reload(data)


# --- disk errors while running


def test_a_failed_sync_is_a_disk_error_naming_the_file(
    tmp_path: Path, opened: Callable[[Path], Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    _populated(data)
    store = Storage(data, "alpha", fsync=True, nodes=TRIAD)
    store.load()
    store.append([(5, 2, {"k": "e"})])

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage_module.os, "fdatasync", full)
    with pytest.raises(DiskError, match=f"{data / 'log'}: cannot write: No space left"):
        store.sync()
    store.close()  # no second sync, no second error: the node already said why it stops


def test_a_failed_write_or_replace_is_a_disk_error(
    tmp_path: Path, opened: Callable[[Path], Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    _populated(data)
    store = opened(data)
    store.load()

    class FullFile:
        """A log file on a full disk."""

        def __init__(self, real: Any) -> None:
            self.real = real

        def tell(self) -> int:
            return int(self.real.tell())

        def fileno(self) -> int:
            return int(self.real.fileno())

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self) -> None:
            self.real.close()

    store._log = FullFile(store._log)  # type: ignore[assignment]
    with pytest.raises(DiskError, match=f"{data / 'log'}: cannot write: No space left"):
        store.append([(5, 2, {"k": "e"})])

    def no_rename(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(storage_module.os, "replace", no_rename)
    with pytest.raises(DiskError, match=f"{data / 'hardstate'}: cannot write: Input/output"):
        store.save_hard_state(3, None)


def test_short_writes_are_finished(
    tmp_path: Path, opened: Callable[[Path], Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    _populated(data)
    real = os.pwrite
    calls = [0]

    def short(fd: int, data: Any, offset: int) -> int:
        calls[0] += 1
        return real(fd, bytes(data[:1000]), offset)

    monkeypatch.setattr(storage_module.os, "pwrite", short)
    store = opened(data)
    store.load()
    store.append([(5, 2, {"k": "x" * (3 << 20)})])  # grows the file by 3 MiB of zeros
    store.close()
    assert calls[0] > 3000
    assert [e[0] for e in _reload(data).entries] == [1, 2, 3, 4, 5]


@pytest.mark.integration
def test_a_file_size_limit_stops_writes_with_a_disk_error(tmp_path: Path) -> None:
    # A real EFBIG from the kernel, and the short write before it, in a process of its own.
    data = tmp_path / "data"
    write_marker(data, "alpha")
    script = f"""
import resource, sys
from pathlib import Path
from zbroker.broker.storage import DiskError, Storage
store = Storage(Path({str(data)!r}), "alpha")
store.load()
store.save_hard_state(1, None)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    for i in range(1, 10_000):
        store.append([(i, 1, {{"k": "x" * 1000}})])
        store.sync()
except DiskError as exc:
    print(exc)
    sys.exit(3)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith(f"{data / 'log'}: cannot write: File too large"), done.stdout
    entries = _reload(data).entries  # everything synced before the error is there, whole
    assert entries and [e[0] for e in entries] == list(range(1, len(entries) + 1))


def test_an_image_mapped_stays_whole_when_its_file_is_written_anew(
    tmp_path: Path, opened: Callable[[Path], Storage]
) -> None:
    # A taken image dropped (or one still being sent) keeps its file: the next child
    # writes a new one instead of truncating the one mapped (a read past its end: SIGBUS).
    data = tmp_path / "data"
    _populated(data)
    store = opened(data)
    store.load()
    store.write_taken(many_sessions(300), 3, 2)
    dropped = store.taken_image(3, 2)
    store.write_taken(ledger_of(4), 4, 2)
    assert load_image(dropped, lease=30.0, heartbeat=10.0).session_count == 300
    sent = take(store, 4, 2)
    receive(store, 4, 2, seats=1, chunk=4096)  # the same index again, from a peer
    assert seats_of(sent) == 4 and seats_of(store.image()) == 1


def many_sessions(count: int) -> Ledger:
    ledger = ledger_of(1)
    for i in range(count):
        ledger.apply({"k": "open", "sid": f"s{i}", "req": 1, "ack": 0, "user": "u",
                      "host": "h", "display": "", "client_version": "1", "at": 1.0})  # fmt: skip
    return ledger


def test_a_snapshot_file_no_image_uses_is_unmapped_off_the_loop(
    opened: Callable[[Path], Storage], tmp_path: Path
) -> None:
    """Compacted past and dropped by everyone, an image's mapping is closed by the
    unmapping thread, not by whoever dropped the last reference (the node's loop)."""
    store = opened(tmp_path)
    store.load()
    first = take(store, 3, 1)
    mapped = first.buf.obj  # the mmap under the image's view
    take(store, 6, 1)  # renamed over the first: the storage holds the second now
    assert not mapped.closed
    del first
    wait_for(lambda: mapped.closed, 5, "the first snapshot file unmapped")
    assert store.image() is not None and store.image().index == 6


# --- the log rewrite off the loop


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hold each compaction's worker before it writes ``log.tmp`` until the event is set
    (the loop's own rewrites, at load or for a log that does not continue, go by)."""
    release = threading.Event()
    real = storage_module._log_tmp

    def held(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "compaction":
            assert release.wait(30), "the test never let the compaction go on"
        return real(*args, **kwargs)

    monkeypatch.setattr(storage_module, "_log_tmp", held)
    yield release
    release.set()  # a test that failed first: its storages close after this


def _pending(store: Storage) -> bool:
    return store._compaction is not None


def _finished(store: Storage) -> bool:
    """The worker is done: the next sync() switches to its log."""
    job = store._compaction
    return job is None or job.done.is_set()


def _copy_of(data: Path, into: Path) -> Path:
    """The data directory's files as they are now: what a crash at this point leaves
    (page cache and disk alike, once the syncs the storage made are done)."""
    into.mkdir()
    for path in data.iterdir():
        if path.is_file() and path.name != "node.lock":
            shutil.copyfile(path, into / path.name)
    return into


def _at_7_of_10(store: Storage) -> Storage:
    """``store`` loaded with entries 1-10 of term 1 in three records, synced."""
    write_marker(store.dir, "alpha")
    store.load()
    store.save_hard_state(1, None)
    store.append([(i, 1, {"k": f"a{i}"}) for i in range(1, 4)])
    store.append([(i, 1, {"k": f"b{i}"}) for i in range(4, 9)])  # holds 7 and 8
    store.append([(9, 1, {"k": "c9"}), (10, 1, {"k": "c10"})])
    store.sync()
    return store


def _loaded_entries(data: Path) -> tuple[int, list[int]]:
    loaded = _reload(data)
    assert not loaded.damaged, loaded.why
    return loaded.snapshot_index, [e[0] for e in loaded.entries]


def test_appends_and_truncations_during_the_rewrite_follow_it_into_the_new_log(
    tmp_path: Path, opened: Callable[[Path], Storage], gate: threading.Event
) -> None:
    store = _at_7_of_10(opened(tmp_path / "data"))
    data = store.dir
    take(store, 7, 1)
    assert _pending(store) and (data / "snapshot").exists()  # renamed at once
    assert seats_of(store.image()) == 7
    store.append([(11, 1, {"k": "d11"}), (12, 1, {"k": "d12"})])
    store.save_hard_state(2, None)
    store.truncate(12)
    store.append([(12, 2, {"k": "e12"})])
    store.sync()  # the worker is held: the loop syncs the old log
    assert _pending(store)
    assert _loaded_entries(_copy_of(data, tmp_path / "before"))[1] == list(range(8, 13))
    gate.set()
    wait_for(lambda: _finished(store), 10, "the rewrite written")
    store.append([(13, 2, {"k": "f13"})])  # in the old log still: copied at the switch
    store.sync()
    assert not _pending(store)
    raw = (data / "log").read_bytes()
    first = record_spans(data)[0]
    assert storage_module.unpack(raw[12 : first[1] - 1]) == {"base": [7, 1]}
    store.append([(14, 2, {"k": "g14"})])  # in the new log
    take(store, 12, 2)  # a second compaction finds its records in the new log
    store.close()
    loaded = _reload(data)
    assert (loaded.snapshot_index, loaded.entries) == (
        12,
        [(13, 2, {"k": "f13"}), (14, 2, {"k": "g14"})],
    )


@pytest.mark.parametrize("fsync", [False, True])
def test_a_crash_anywhere_in_a_compaction_loses_nothing_synced(
    tmp_path: Path, gate: threading.Event, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    store = _at_7_of_10(Storage(tmp_path / "data", "alpha", fsync=fsync, nodes=TRIAD))
    data = store.dir
    old_snapshot = _copy_of(data, tmp_path / "old")  # no snapshot yet: the log alone
    take(store, 7, 1)
    store.append([(11, 1, {"k": "d11"})])
    store.sync()
    crashes: dict[str, Path] = {
        # the snapshot's rename not yet durable either: the old files
        "rename lost": old_snapshot,
        "before the switch": _copy_of(data, tmp_path / "worker"),
    }
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(src).name == "log.tmp" and not crashes.get("log.tmp written"):
            crashes["log.tmp written"] = _copy_of(data, tmp_path / "written")
            real(src, dst)
            crashes["log renamed"] = _copy_of(data, tmp_path / "renamed")
            return
        real(src, dst)

    monkeypatch.setattr(storage_module.os, "replace", replace)
    (tmp_path / "old" / "log").write_bytes((data / "log").read_bytes())  # with entry 11
    gate.set()
    wait_for(lambda: _finished(store), 10, "the rewrite written")
    store.append([(12, 1, {"k": "e12"})])
    store.sync()  # the switch
    assert not _pending(store)
    store.close()
    crashes["after"] = data
    for when, copy in crashes.items():
        expected = (0, list(range(1, 13))) if when == "rename lost" else (7, [8, 9, 10, 11, 12])
        if when in ("rename lost", "before the switch"):
            expected = (expected[0], expected[1][:-1])  # entry 12 came after these points
        assert _loaded_entries(copy) == expected, when
        assert not list(copy.glob("*.tmp")), when


def test_a_second_snapshot_or_a_close_waits_for_the_rewrite_under_way(
    tmp_path: Path, opened: Callable[[Path], Storage], gate: threading.Event
) -> None:
    store = _at_7_of_10(opened(tmp_path / "data"))
    data = store.dir
    take(store, 5, 1)
    store.append([(11, 1, {"k": "d11"})])
    assert _pending(store)
    gate.set()
    take(store, 9, 1)  # waits for the first, switches to its log, then rewrites it again
    store.append([(12, 1, {"k": "e12"})])
    store.close()  # waits for the second
    assert _loaded_entries(data) == (9, [10, 11, 12])
    assert not list(data.glob("*.tmp"))
    assert storage_module.unpack((data / "log").read_bytes()[12:][:20].split(b"\xa5")[0])


def test_a_snapshot_the_log_does_not_lead_to_is_adopted_at_once(
    tmp_path: Path, opened: Callable[[Path], Storage], gate: threading.Event
) -> None:
    store = _at_7_of_10(opened(tmp_path / "data"))
    data = store.dir
    store.save_hard_state(2, None)
    receive(store, 15, 2)  # past the log: entries 16.. could not follow it in the old log
    assert not _pending(store)
    store.append([(16, 2, {"k": "p16"})])
    receive(store, 16, 2)  # the log holds 16 of term 2 now: off the loop
    assert _pending(store)
    store.append([(17, 2, {"k": "p17"})])
    gate.set()
    store.close()
    assert _loaded_entries(data) == (16, [17])


def test_more_appended_during_the_rewrite_than_its_zeros_hold(
    tmp_path: Path, opened: Callable[[Path], Storage], gate: threading.Event
) -> None:
    store = _at_7_of_10(opened(tmp_path / "data"))
    data = store.dir
    take(store, 7, 1)
    store.append([(11, 1, {"k": "big", "pad": "x" * (3 << 20)})])
    store.sync()
    gate.set()
    wait_for(lambda: _finished(store), 10, "the rewrite written")
    store.sync()
    assert not _pending(store)
    store.append([(12, 1, {"k": "e12"})])
    store.close()
    assert _loaded_entries(data) == (7, [8, 9, 10, 11, 12])


@pytest.mark.parametrize("fsync", [False, True])
def test_the_switch_syncs_the_new_log_before_its_rename_and_the_directory_after(
    tmp_path: Path, gate: threading.Event, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    store = _at_7_of_10(Storage(tmp_path / "data", "alpha", fsync=fsync, nodes=TRIAD))
    data = store.dir
    calls: list[tuple[str, str]] = []
    names: dict[int, str] = {}
    real_open, real_fsync, real_fdatasync = os.open, os.fsync, os.fdatasync
    real_replace, real_dir = os.replace, storage_module._fsync_dir

    def record(what: str, fd: int) -> None:
        if names.get(fd) == data.name:
            return  # fsync_dir's own
        calls.append((threading.current_thread().name, f"{what} {names.get(fd, fd)}"))

    def opening(path: Any, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, *args, **kwargs)
        names[fd] = Path(path).name
        return fd

    def replace(src: Any, dst: Any) -> None:
        calls.append((threading.current_thread().name, f"replace {Path(src).name}"))
        real_replace(src, dst)

    def fsync_dir(path: Path) -> None:
        calls.append((threading.current_thread().name, "fsync the directory"))
        real_dir(path)

    def fsync_file(fd: int) -> None:
        record("fsync", fd)
        real_fsync(fd)

    def fdatasync(fd: int) -> None:
        record("fdatasync", fd)
        real_fdatasync(fd)

    monkeypatch.setattr(storage_module.os, "open", opening)
    monkeypatch.setattr(storage_module.os, "fsync", fsync_file)
    monkeypatch.setattr(storage_module.os, "fdatasync", fdatasync)
    monkeypatch.setattr(storage_module.os, "replace", replace)
    monkeypatch.setattr(storage_module, "_fsync_dir", fsync_dir)
    store.write_taken(ledger_of(7), 7, 1)
    image = store.taken_image(7, 1)
    assert store._log is not None
    names[store._log.fileno()] = "log"
    calls.clear()
    store.save_snapshot(image, "taken")
    assert calls == [("MainThread", "replace snapshot.taken.tmp")]  # no sync on the loop
    store.append([(11, 1, {"k": "d11"})])
    store.sync()
    gate.set()
    wait_for(lambda: _finished(store), 10, "the rewrite written")
    store.sync()
    store.sync()  # nothing more to sync
    store.close()
    loop = [what for thread, what in calls if thread == "MainThread"]
    worker = [what for thread, what in calls if thread == "compaction"]
    if not fsync:
        assert loop == ["replace snapshot.taken.tmp", "replace log.tmp"], calls
        assert worker == []
        return
    assert worker[0] == "fsync the directory"  # the snapshot's name, before any log.tmp
    assert set(worker[1:-1]) == {"fdatasync log.tmp"} and worker[-1] == "fsync log.tmp"
    assert loop == [
        "replace snapshot.taken.tmp",
        "fdatasync log",  # the old log, while the worker runs
        "fdatasync log.tmp",  # the switch: entry 11 copied in, synced before the rename
        "replace log.tmp",
        "fsync the directory",  # the rename, before anything in the new log is acked
    ], calls
    assert _loaded_entries(data) == (7, [8, 9, 10, 11])


def test_an_error_in_the_rewrite_is_a_disk_error_at_the_next_sync(
    tmp_path: Path, opened: Callable[[Path], Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _at_7_of_10(opened(tmp_path / "data"))
    data = store.dir

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage_module, "_log_tmp", full)
    take(store, 7, 1)
    store.append([(11, 1, {"k": "d11"})])
    wait_for(lambda: _finished(store), 10, "the rewrite tried")
    with pytest.raises(DiskError, match=f"{data / 'log.tmp'}: cannot write: No space left"):
        store.sync()
    store.close()  # the node already said why it stops: no second error
    monkeypatch.undo()
    assert _loaded_entries(data) == (7, [8, 9, 10, 11])  # the old log, whole


def _big_taken(store: Storage, index: int, term: int, size: int) -> Image:
    """A taken snapshot file of about ``size`` bytes: an image head, then padding (the
    storage reads only the head; its crc is the header's)."""
    body = bytes(image_of(ledger_of(index), index, term).buf) + bytes(size)
    path = store.dir / "snapshot.taken.tmp"
    path.write_bytes(storage_module._header(len(body), zlib.crc32(body)) + body + b"\xa5")
    return store.taken_image(index, term)


@pytest.fixture
def frees(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """The sizes snapshot files are truncated to, and the inode of each file closed by
    the unmapping thread (of earlier tests' images too), as they happen."""
    truncated: list[int] = []
    closed: list[int] = []
    real_truncate, real_free = os.ftruncate, storage_module._free

    def ftruncate(fd: int, size: int) -> None:
        if size:  # not the lock file's
            truncated.append(size)
        real_truncate(fd, size)

    def free(fd: int) -> None:
        inode = os.fstat(fd).st_ino
        real_free(fd)
        closed.append(inode)

    monkeypatch.setattr(storage_module.os, "ftruncate", ftruncate)
    monkeypatch.setattr(storage_module, "_free", free)
    return truncated, closed


def test_a_snapshot_file_renamed_over_is_freed_a_step_at_a_time(
    tmp_path: Path, opened: Callable[[Path], Storage], frees: tuple[list[int], list[int]]
) -> None:
    truncated, closed = frees
    data = tmp_path / "data"
    _populated(data)
    store = opened(data)
    store.load()
    big = _big_taken(store, 3, 2, 5 << 20)
    file = (data / "snapshot.taken.tmp").stat()
    store.save_snapshot(big, "taken")
    del big
    take(store, 4, 2)  # renamed over the big one, whose last image goes
    wait_for(lambda: file.st_ino in closed, 5, "the big file closed by the unmapping thread")
    size = file.st_size
    step = storage_module._FREE_STEP
    assert truncated == list(range(size - step, 0, -step))
    store.close()
    assert seats_of(_reload(data).snapshot) == 4


def test_a_snapshot_file_mapped_elsewhere_is_left_whole(
    tmp_path: Path, opened: Callable[[Path], Storage], frees: tuple[list[int], list[int]]
) -> None:
    """Another mapping of the file (the snapshot taker's, in its own process) holds it:
    truncated under it, the reader would die of a SIGBUS."""
    truncated, closed = frees
    data = tmp_path / "data"
    _populated(data)
    store = opened(data)
    store.load()
    store.save_snapshot(_big_taken(store, 3, 2, 5 << 20), "taken")
    inode = (data / "snapshot").stat().st_ino
    reader = storage_module._map_snapshot(data / "snapshot", check=False)  # as read_log
    take(store, 4, 2)
    wait_for(lambda: inode in closed, 5, "the node's mapping closed")
    assert truncated == []
    assert bytes(reader.buf[-(1 << 20) :]) == bytes(1 << 20)  # the file whole under it
    del reader
    wait_for(lambda: closed.count(inode) >= 2, 5, "the reader's mapping closed")
    assert truncated  # the last holder freed it a step at a time


def test_setting_aside_waits_for_the_rewrite_under_way_and_sets_its_file_aside(
    tmp_path: Path, opened: Callable[[Path], Storage], gate: threading.Event
) -> None:
    store = _at_7_of_10(opened(tmp_path / "data"))
    data = store.dir
    take(store, 7, 1)
    assert _pending(store)
    gate.set()
    loaded = store.set_aside("the test's")  # as for a snapshot whose ledger does not load
    assert loaded.fresh and not _pending(store)
    (aside,) = data.glob("damaged-*")
    assert sorted(p.name for p in aside.iterdir()) == [
        "hardstate", "log", "log.tmp", "node.json", "snapshot"
    ]  # fmt: skip
    store.append([(1, 1, {"k": "new"})])
    store.close()
    assert _reload(data).fresh  # unmarked until it catches up
