"""The data directory survives restarts, torn writes and compaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.storage import Storage, StorageError, write_marker


def _storage(tmp_path: Path, node: str = "alpha") -> Storage:
    return Storage(tmp_path / "data", node, fsync=False)


def _loaded(tmp_path: Path) -> Storage:
    store = _storage(tmp_path)
    store.load()
    return store


def test_a_directory_without_marker_is_fresh(tmp_path: Path) -> None:
    assert _storage(tmp_path).load().fresh
    write_marker(tmp_path / "data", "alpha")
    assert not _storage(tmp_path).load().fresh


def test_marker_of_another_node_is_refused(tmp_path: Path) -> None:
    write_marker(tmp_path / "data", "beta")
    with pytest.raises(StorageError, match="belongs to node 'beta'"):
        _storage(tmp_path).load()


def test_log_hard_state_and_truncation_round_trip(tmp_path: Path) -> None:
    write_marker(tmp_path / "data", "alpha")
    store = _loaded(tmp_path)
    store.append([(1, 1, {"k": "a"}), (2, 1, {"k": "b"}), (3, 1, None)])
    store.truncate(3)
    store.append([(3, 2, {"k": "c"})])
    store.save_hard_state(2, "beta")
    store.close()
    loaded = _storage(tmp_path).load()
    assert loaded.entries == [(1, 1, {"k": "a"}), (2, 1, {"k": "b"}), (3, 2, {"k": "c"})]
    assert (loaded.term, loaded.voted_for) == (2, "beta")


def test_torn_tail_is_cut_and_appends_continue(tmp_path: Path) -> None:
    write_marker(tmp_path / "data", "alpha")
    store = _loaded(tmp_path)
    store.append([(1, 1, {"k": "a"})])
    store.append([(2, 1, {"k": "b"}), (3, 1, {"k": "c"})])  # one batch: one record
    store.close()
    log = tmp_path / "data" / "log"
    written = log.read_bytes().rstrip(b"\0")  # the file is grown ahead with zeros
    log.write_bytes(written[:-3])  # a crash in the middle of the last record
    store = _storage(tmp_path)  # not loaded yet: load() is what this test checks
    assert store.load().entries == [(1, 1, {"k": "a"})]  # the torn batch goes whole
    assert store.last == 1
    store.append([(2, 2, {"k": "z"})])
    store.close()
    assert _storage(tmp_path).load().entries == [(1, 1, {"k": "a"}), (2, 2, {"k": "z"})]


def test_snapshot_compacts_the_log(tmp_path: Path) -> None:
    write_marker(tmp_path / "data", "alpha")
    store = _loaded(tmp_path)
    store.append([(i, 1, {"n": i}) for i in range(1, 11)])
    store.save_snapshot(8, 1, {"ledger": "state"}, keep=[(9, 1, {"n": 9}), (10, 1, {"n": 10})])
    store.append([(11, 1, {"n": 11})])
    store.close()
    loaded = _storage(tmp_path).load()
    assert (loaded.snapshot_index, loaded.snapshot_term, loaded.snapshot) == (
        8,
        1,
        {"ledger": "state"},
    )
    assert [e[0] for e in loaded.entries] == [9, 10, 11]


def test_damaged_snapshot_is_an_error_naming_the_file(tmp_path: Path) -> None:
    write_marker(tmp_path / "data", "alpha")
    store = _loaded(tmp_path)
    store.save_snapshot(1, 1, {"x": 1}, keep=[])
    store.close()
    snap = tmp_path / "data" / "snapshot"
    data = bytearray(snap.read_bytes())
    data[-1] ^= 0xFF
    snap.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="snapshot"):
        _storage(tmp_path).load()


def test_the_log_is_grown_with_zeros_and_reopened_at_its_last_record(tmp_path: Path) -> None:
    write_marker(tmp_path / "data", "alpha")
    store = _loaded(tmp_path)
    store.append([(1, 1, {"k": "a"})])
    store.close()
    log = tmp_path / "data" / "log"
    assert log.stat().st_size >= 1 << 20  # records overwrite zeros: syncs need no size change
    for index in (2, 3):  # each reopen must write after the good records, not after the zeros
        store = _loaded(tmp_path)
        store.append([(index, 1, {"k": index})])
        store.close()
    assert [e[0] for e in _storage(tmp_path).load().entries] == [1, 2, 3]


def test_a_write_before_load_is_refused(tmp_path: Path) -> None:
    write_marker(tmp_path / "data", "alpha")
    with pytest.raises(StorageError, match="not loaded"):
        _storage(tmp_path).append([(1, 1, None)])


def test_records_across_and_beyond_the_zeroed_chunks_read_back(tmp_path: Path) -> None:
    write_marker(tmp_path / "data", "alpha")
    store = _loaded(tmp_path)
    big = "x" * 700_000  # two of these cross the first 1 MiB of zeros; the last is 2.5 MiB
    store.append([(1, 1, {"k": big})])
    store.append([(2, 1, {"k": big})])
    store.append([(3, 1, {"k": "y" * (5 << 19)})])
    store.close()
    entries = _storage(tmp_path).load().entries
    assert [(i, len(d["k"])) for i, _, d in entries] == [(1, 700_000), (2, 700_000), (3, 5 << 19)]
