"""A node's data directory against operator mistakes and damaged or full disks, with real
nodes: a second start, corrupted files restarted in a live triad, a disk that fills up."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_storage import corrupt, corruptions, image_values, record_spans

from zbroker import Grant, LicenseClient, LicenseDenied, LicenseUnavailable, OutcomeUnknown
from zbroker.broker.image import load_image
from zbroker.broker.storage import Storage, progress_path
from zbroker.broker.wire import pack
from zbroker.clients.testing import LocalTriad, TriadTimeout, wait_for
from zbroker.peers.types import Image

pytestmark = pytest.mark.integration


def _roles(triad: LocalTriad) -> tuple[dict[str, dict[str, Any]], str | None]:
    report = triad.status(holders=False)
    return {n["name"]: n for n in report["nodes"]}, report["primary"]


def _caught_up(triad: LocalTriad, name: str) -> bool:
    nodes, primary = _roles(triad)
    return (
        primary is not None
        and nodes[primary].get("serving", True)
        and nodes[name]["role"] in ("backup", "primary")
        and nodes[name]["commit"] == nodes[primary]["commit"]
    )


def _grant_ids(triad: LocalTriad, feature: str) -> list[int]:
    def read() -> list[int] | None:
        report = triad.status()
        if report["primary"] is None or report.get("holders_partial"):
            return None
        return sorted(h["grant"] for h in triad.feature(feature, report)["holders"]) or None

    return wait_for(read, 10, f"the holders of {feature}")


def _holds_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """``condition`` stays true, checked all along ``seconds`` (a negative check)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), what
        time.sleep(0.05)  # polling interval of the condition, not a synchronisation


def _run(triad: LocalTriad, name: str) -> list[str]:
    """The command line of ``zbroker run`` for one node of ``triad``."""
    return triad.command(name)


def _log_from(triad: LocalTriad, name: str, offset: int) -> str:
    return (triad.logs / f"{name}.log").read_bytes()[offset:].decode(errors="replace")


def _log_size(triad: LocalTriad, name: str) -> int:
    path = triad.logs / f"{name}.log"
    return path.stat().st_size if path.exists() else 0


def test_a_second_start_is_refused_at_once_and_a_full_restart_keeps_every_grant(
    make_triad: Any,
) -> None:
    triad: LocalTriad = make_triad(lease=30.0)
    primary = triad.wait_for_primary()
    held: list[Grant] = []
    flowing = [0]
    errors: list[BaseException] = []
    stop = threading.Event()

    def load(client: LicenseClient) -> None:
        # Checkouts and checkins all along, holding up to 30 seats at any time.
        while not stop.is_set():
            try:
                if len(held) < 30:
                    held.append(client.checkout("viewer", timeout=5))
                else:
                    client.checkin(held.pop(0), timeout=5)
                flowing[0] += 1
            except (LicenseUnavailable, OutcomeUnknown, LicenseDenied) as exc:
                errors.append(exc)
                return

    with LicenseClient(triad.license, user="loader") as client:
        worker = threading.Thread(target=load, args=(client,))
        worker.start()
        try:
            wait_for(lambda: flowing[0] >= 50, 10, "the load to flow")
            started = time.monotonic()
            second = subprocess.run(
                _run(triad, primary),
                capture_output=True,
                text=True,
                timeout=30,
            )
            took = time.monotonic() - started
            before = flowing[0]
            wait_for(lambda: flowing[0] >= before + 50, 10, "the load to go on")
        finally:
            stop.set()
            worker.join(timeout=20)
        assert not errors, errors
        data = triad.config.node(primary).data
        holder = triad.procs[primary].pid
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 3, second.stderr
        assert len(lines) == 1 and str(data) in lines[0] and f"pid {holder}" in lines[0], lines
        assert took < 10, f"the second process took {took:.1f} s to give up"
        assert triad.alive(primary) and not list(data.glob("damaged-*"))
        told = sorted(g.id for g in held)
        assert _grant_ids(triad, "viewer") == told
        for name in triad.names:  # every node at once, without a clean stop
            triad.kill(name)
        triad.start()
        triad.wait_for_primary(timeout=10)
        assert _grant_ids(triad, "viewer") == told
        for grant in held:
            client.checkin(grant)


def test_a_triad_restarts_from_its_snapshot_files_taken_and_received(make_triad: Any) -> None:
    # Compactions every 40 deltas, no log kept before a snapshot: a wiped backup can only
    # catch up from the primary's snapshot file (taken by a child), which it stores as
    # its own (received in chunks); a full stop and start then reads both kinds back.
    triad: LocalTriad = make_triad(lease=60.0, settings={"snapshot_every": 40, "snapshot_keep": 0})
    primary = triad.wait_for_primary()
    backup = next(n for n in triad.names if n != primary)
    with LicenseClient(triad.license, user="keeper") as client:
        held = [client.checkout("viewer", timeout=5) for _ in range(5)]
        triad.kill(backup)
        triad.wipe(backup)
        for _ in range(60):
            client.checkin(client.checkout("viewer", timeout=5), timeout=5)
        snapshot = triad.config.node(primary).data / "snapshot"
        wait_for(snapshot.exists, 10, "the primary's snapshot")
        offset = _log_size(triad, backup)
        triad.start(backup)
        wait_for(lambda: _caught_up(triad, backup), 20, f"{backup} to catch up")
        wait_for((triad.config.node(backup).data / "snapshot").exists, 10, "its snapshot")
        assert " installed" in _log_from(triad, backup, offset)  # the primary's, received
        told = sorted(g.id for g in held)
        assert _grant_ids(triad, "viewer") == told
        for name in triad.names:  # every node at once, without a clean stop
            triad.kill(name)
        for name in triad.names:
            loaded = _load(triad.config.node(name).data, name, triad.names)
            assert not loaded.fresh and loaded.snapshot_index > 0, (name, loaded)
            assert not list(triad.config.node(name).data.glob("*.tmp"))
            load_image(loaded.snapshot, lease=60.0, heartbeat=20.0)  # a ledger, not damage
        triad.start()
        triad.wait_for_primary(timeout=10)
        assert _grant_ids(triad, "viewer") == told
        for grant in held:
            client.checkin(grant)


def test_corrupted_data_directories_restart_in_a_live_triad_as_wiped_nodes(
    make_triad: Any, tmp_path: Path
) -> None:
    triad: LocalTriad = make_triad(lease=60.0)
    triad.wait_for_primary()
    held: list[Grant] = []
    seen = {"damaged": 0, "same": 0, "fresh": 0}

    @settings(
        max_examples=15,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # a failure is shown as found: shrinking restarts nodes
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(victim=st.sampled_from(triad.names), ops=corruptions())
    def example(victim: str, ops: list[tuple[str, str, int, int]]) -> None:
        held.append(client.checkout("viewer", timeout=5))  # acknowledged before the damage
        if len(held) > 10:
            client.checkin(held.pop(0))
        told = sorted(g.id for g in held)
        was_primary = triad.primary() == victim
        triad.kill(victim, signal.SIGTERM)
        if was_primary:
            triad.wait_for_primary(not_=victim, timeout=10)
        data = triad.config.node(victim).data
        for old in data.glob("damaged-*"):
            shutil.rmtree(old)
        pre, post = tmp_path / "pre", tmp_path / "post"
        for copy in (pre, post):
            shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(data, pre)
        corrupt(data, ops)
        shutil.copytree(data, post)
        # The node's record of what its directory held (Storage.save_progress), beside
        # the copy too: a cut that reads as a torn tail but lost synced entries is damage.
        progress_path(post).unlink(missing_ok=True)
        if progress_path(data).exists():
            shutil.copy(progress_path(data), progress_path(post))
        expected = _load(post, victim, triad.names)
        if not expected.fresh:  # the node comes back with exactly the state it had
            original = _load(pre, victim, triad.names)
            assert (expected.term, expected.voted_for, expected.entries) == (
                original.term,
                original.voted_for,
                original.entries,
            )
            assert image_values(expected.snapshot) == image_values(original.snapshot)
        seen["damaged" if expected.damaged else "fresh" if expected.fresh else "same"] += 1
        offset = _log_size(triad, victim)
        triad.start(victim)
        try:
            wait_for(lambda: _caught_up(triad, victim), 15, f"{victim} to catch up")
        except TriadTimeout:
            raise AssertionError(_log_from(triad, victim, offset)) from None
        text = _log_from(triad, victim, offset)
        assert triad.alive(victim) and "Traceback" not in text, text
        assert ("starts as a wiped node" in text) == expected.fresh, text
        assert ("data directory damaged" in text) == expected.damaged, text
        assert bool(list(data.glob("damaged-*"))) == expected.damaged
        roles = [r for r in re.findall(r" INFO now (\w+) in term ", text) if r != "recovering"]
        # A wiped node follows until it has caught up: it never stands with state it lost.
        assert not expected.fresh or roles[:1] == ["backup"], text
        assert _grant_ids(triad, "viewer") == told  # nothing acknowledged was lost

    with LicenseClient(triad.license, user="keeper") as client:
        example()
        for grant in held:
            client.checkin(grant)
    print(f"corruptions tried: {seen}")


def test_a_damaged_node_without_a_quorum_waits_and_says_why(make_triad: Any) -> None:
    triad: LocalTriad = make_triad(lease=60.0)
    triad.wait_for_primary()
    with LicenseClient(triad.license, user="keeper") as client:
        kept = client.checkout("cad", count=2)
        for name in triad.names:
            triad.kill(name, signal.SIGTERM)
        victim, other, last = triad.names[2], triad.names[1], triad.names[0]
        data = triad.config.node(victim).data
        raw = bytearray((data / "log").read_bytes())
        start, _ = record_spans(data)[1]
        raw[start + 12] ^= 0x01  # in an early record, with good ones after it: damage
        (data / "log").write_bytes(bytes(raw))
        triad.start(victim, other)

        def waiting() -> bool:
            nodes, primary = _roles(triad)
            why = nodes[victim].get("recovering", "")
            return (
                primary is None
                and nodes[victim]["role"] == "recovering"
                and "data directory damaged" in why
                and "waiting for a primary" in why
            )

        wait_for(waiting, 10, f"{victim} to wait, saying why")
        # The healthy node cannot be elected by a node that lost its vote: no primary.
        _holds_for(waiting, 3 * triad.config.peer_timeout, "no primary while a vote is lost")
        shown = subprocess.run(
            [sys.executable, "-m", "zbroker.broker", "status", "--config", str(triad.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "recovering: data directory damaged" in shown.stdout, shown.stdout
        triad.start(last)
        wait_for(lambda: _caught_up(triad, victim), 15, f"{victim} to catch up")
        assert sorted(h["grant"] for h in triad.feature("cad")["holders"]) == [kept.id]
        client.checkin(kept)


def test_a_full_disk_stops_the_node_with_one_line_and_loses_nothing_acknowledged(
    tmp_path: Path, raw: Any
) -> None:
    # A file size limit (RLIMIT_FSIZE: a short write, then EFBIG) stands for a full disk
    # without root: no write may reach past 64 KiB into any file.
    triad = LocalTriad(tmp_path / "single", servers=1, lease=60.0, secure=False)
    name = triad.names[0]
    limit = 64 << 10
    logfile = triad.logs / f"{name}.log"
    with open(logfile, "wb") as out:
        node = subprocess.Popen(
            _run(triad, name),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        )
    granted: list[int] = []
    try:
        client = raw(triad.endpoints[0])
        wait_for(lambda: _answers(client), 10, "the node to serve")
        for i in range(2000):  # each session ~1 KB of log: the limit comes within ~70
            client.sid = uuid.uuid4().hex
            try:
                opened = client.call(
                    timeout=2,
                    op="open",
                    user="u" * 250 + f"{i:06d}",
                    host="h" * 256,
                    display="d" * 256,
                    client_version="v" * 256,
                )
                if opened["status"] == "ok" and len(granted) < 50:
                    got = client.call(timeout=2, op="checkout", feature="viewer", count=1)
                    if got["status"] == "ok":
                        granted.append(got["grant"]["id"])
            except TimeoutError:
                break
        code = node.wait(timeout=10)
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    text = logfile.read_text(errors="replace")
    assert code == 3, text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot write: File too large" in errors[0], text
    assert str(triad.config.node(name).data / "log") in errors[0]
    assert text.splitlines()[-1].endswith(f"zbroker: {errors[0].split('stopping: ')[1]}")
    assert f"node {name} stopped" in text
    assert granted, "the node stopped before it granted anything"
    triad.start()  # without the limit: every acknowledged grant is there
    try:
        triad.wait_for_primary(timeout=10)
        found = _grant_ids(triad, "viewer")
        # ... and at most the one checkout left unanswered, if all of it reached the disk
        assert set(granted) <= set(found) and len(found) <= len(granted) + 1, (granted, found)
    finally:
        triad.stop()


def _load(data: Path, name: str, names: list[str]) -> Any:
    store = Storage(data, name, fsync=False, nodes=names)
    try:
        return store.load()
    finally:
        store.close()


def _answers(client: Any) -> bool:
    try:
        return client.call(timeout=0.5, op="status")["status"] == "ok"
    except TimeoutError:
        return False


def test_a_data_directory_that_is_a_file_exits_3_with_one_line(tmp_path: Path) -> None:
    triad = LocalTriad(tmp_path / "triad", servers=1, secure=False)
    data = triad.config.node(triad.names[0]).data
    shutil.rmtree(data)
    data.write_text("not a directory")
    done = subprocess.run(
        _run(triad, triad.names[0]),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"zbroker: {data}: not a directory; give the node its own"
    ]


def test_a_snapshot_whose_ledger_does_not_load_is_damage_and_status_says_why(
    tmp_path: Path,
) -> None:
    # Checksums and shape fine, content refused by the ledger: the node's own check.
    from zbroker.broker.model import Now
    from zbroker.broker.node import Node

    triad = LocalTriad(tmp_path / "triad", secure=False)
    name = triad.names[2]
    data = triad.config.node(name).data
    store = Storage(data, name, fsync=False, nodes=triad.names)
    store.load()
    store.save_hard_state(1, None)
    store.append([(1, 1, None)])
    image = Image.of(1, 1, pack({"v": 99, "index": 1, "term": 1}))  # a version no node writes
    store.save_snapshot_chunk(1, 1, 0, image.chunk(0, image.size))
    store.save_snapshot(image, "received")
    store.close()
    node = Node(triad.config, name)
    try:
        node._start()
        why = node.core.report(Now(time.monotonic(), time.time()))["nodes"][0]["recovering"]
    finally:
        node.storage.close()
    assert why.startswith(
        f"data directory damaged: {data / 'snapshot'}: snapshot image: version 99"
    )
    assert "waiting for a primary to catch up from" in why
    assert (data / "hardstate").exists() and not (data / "node.json").exists()
    assert len(list(data.glob("damaged-*/snapshot"))) == 1


def test_a_data_directory_restored_from_an_older_copy_recovers_and_loses_no_grant(
    make_triad: Any, tmp_path: Path
) -> None:
    # The probe's case: a backup of alpha's directory, a grant that alpha and beta
    # committed while gamma was down, then alpha restored and started with gamma alone.
    # As it was, the copy voted with what it lost: the grant vanished, its seats were
    # granted again, and the logs diverged.
    triad: LocalTriad = make_triad(lease=60.0)
    data = triad.config.node("alpha").data
    with contextlib.ExitStack() as clients:
        first = clients.enter_context(LicenseClient(triad.license, user="ann"))
        first.checkout("viewer", timeout=10)
        for name in triad.names:
            triad.kill(name, signal.SIGTERM)
        shutil.copytree(data, tmp_path / "backup")
        triad.start("alpha", "beta")
        second = clients.enter_context(LicenseClient(triad.license, user="bob"))
        second.checkout("viewer", timeout=10)  # acknowledged: alpha and beta hold it
        told = _grant_ids(triad, "viewer")
        assert len(told) == 2
        progress = progress_path(data)

        def recorded() -> bool:  # alpha records each second what its directory holds
            alpha = next(n for n in triad.status()["nodes"] if n["name"] == "alpha")
            seen = json.loads(progress.read_bytes()) if progress.exists() else {}
            return bool(seen) and seen["index"] >= alpha["commit"] > 0

        wait_for(recorded, 10, "alpha's progress record")
        for name in ("alpha", "beta"):
            triad.kill(name, signal.SIGTERM)
        shutil.rmtree(data)
        shutil.copytree(tmp_path / "backup", data)
        offset = _log_size(triad, "alpha")
        triad.start("alpha", "gamma")
        wait_for(
            lambda: "older than this node has been" in _log_from(triad, "alpha", offset),
            15,
            "alpha to find its directory older than it was",
        )
        assert triad.status()["primary"] is None  # gamma never elects a wiped alpha
        triad.start("beta")
        triad.wait_for_primary(timeout=15)
        assert _grant_ids(triad, "viewer") == told
        wait_for(lambda: _caught_up(triad, "alpha"), 20, "alpha to catch up")
