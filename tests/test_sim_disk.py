"""The simulation's disk (tests/sim_disk.py) keeps what it must and loses what it may."""

from __future__ import annotations

import random

import pytest
from sim_disk import DiskViolation, SimDisk

from zbroker.broker.core import Append, SaveHardState, SaveSnapshot, SaveSnapshotChunk, Truncate
from zbroker.peers.types import Image

pytestmark = pytest.mark.sim


def _entries(first: int, last: int, term: int) -> list[tuple[int, int, dict[str, str]]]:
    return [(i, term, {"k": "open", "sid": f"s{i}"}) for i in range(first, last + 1)]


def test_what_a_sync_covered_survives_a_crash_and_loads() -> None:
    disk = SimDisk.initialised()
    disk.write(SaveHardState(2, "alpha"))
    disk.write(Append(_entries(1, 3, 2)))
    disk.sync()
    assert disk.crash(random.Random(1)) == 0
    loaded = disk.load()
    assert not loaded.fresh and (loaded.term, loaded.voted_for) == (2, "alpha")
    assert [i for i, _, _ in loaded.entries] == [1, 2, 3]


def test_a_crash_before_the_sync_keeps_a_prefix_of_the_writes() -> None:
    kept = set()
    for seed in range(40):
        disk = SimDisk.initialised()
        disk.write(Append(_entries(1, 1, 1)))
        disk.sync()
        disk.write(SaveHardState(2, "beta"))
        disk.write(Append(_entries(2, 2, 2)))
        disk.write(Append(_entries(3, 3, 2)))
        lost = disk.crash(random.Random(seed))
        loaded = disk.load()
        indexes = [i for i, _, _ in loaded.entries]
        # a prefix: never entry 3 without entry 2, never entry 2 without the term
        assert indexes in ([1], [1, 2], [1, 2, 3])
        assert len(indexes) == 1 or loaded.term == 2
        assert lost == 3 - (len(indexes) - 1) - (loaded.term == 2)
        kept.add(len(indexes) + (loaded.term == 2))
    assert kept == {1, 2, 3, 4}  # every prefix happens, from none to all three writes


def test_a_snapshot_replaces_the_log_it_covers() -> None:
    disk = SimDisk.initialised()
    disk.write(Append(_entries(1, 5, 1)))
    image = Image.of(3, 1, b"the ledger at 3")
    disk.write(SaveSnapshot(image, "taken"))
    disk.write(Truncate(5))
    disk.sync()
    loaded = disk.load()
    assert loaded.snapshot is image
    assert [i for i, _, _ in loaded.entries] == [4]
    assert disk.entry(4) is not None and disk.entry(3) is None


def test_wiped_damaged_and_unmarked_directories_load_fresh() -> None:
    disk = SimDisk.initialised()
    disk.write(Append(_entries(1, 2, 1)))
    disk.sync()
    disk.corrupt("a bit flipped")
    damaged = disk.load()
    assert damaged.fresh and damaged.damaged and "a bit flipped" in damaged.why
    assert not disk.marked  # set aside: it starts as a wiped node, without the marker
    disk.write(Append(_entries(1, 1, 3)))
    disk.sync()
    again = disk.load()  # caught up? no marker yet: what it holds vouches for nothing
    assert again.fresh and not again.damaged and again.entries == []
    disk.mark_recovered()
    disk.write(Append(_entries(1, 1, 3)))
    disk.sync()
    assert not disk.load().fresh
    disk.wipe()
    assert disk.load().fresh


def test_writes_the_data_directory_would_hold_as_damage_are_refused() -> None:
    disk = SimDisk.initialised()
    disk.write(Append(_entries(2, 2, 1)))  # does not follow entry 0
    with pytest.raises(DiskViolation, match="after the log's 0"):
        disk.sync()
    disk = SimDisk.initialised()
    disk.write(SaveHardState(3, None))
    disk.write(SaveHardState(2, None))
    with pytest.raises(DiskViolation, match="went back"):
        disk.sync()


def test_a_received_snapshot_is_saved_only_after_all_its_chunks() -> None:
    disk = SimDisk.initialised()
    image = Image.of(7, 2, b"0123456789")
    disk.write(SaveSnapshotChunk(7, 2, 0, b"01234"))
    disk.write(SaveSnapshotChunk(7, 2, 5, b"56789"))
    disk.write(SaveSnapshot(image, "received"))
    disk.sync()
    assert disk.load().snapshot is image
    with pytest.raises(DiskViolation, match="chunk"):
        disk.write(SaveSnapshotChunk(9, 2, 0, b"01"))
        disk.write(SaveSnapshotChunk(9, 2, 3, b"34"))  # a gap
        disk.sync()
