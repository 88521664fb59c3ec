"""The report log on a live triad: load, two primary kills and a full restart, then the
three nodes' logs are identical by index, every checkout and checkin the clients were
told of appears exactly once, each term names the primary the clients found, and
``zbroker report`` agrees with the clients' record.

The clients' record bounds the figures exactly, with no tolerance for timing: a seat
is in use on the primary from its grant to its release, which happen after the client
sent the checkout and before it sent the checkin (at least the span from the checkout's
answer to sending the checkin) and within the span from sending the checkout to the
checkin's answer (at most). So the peak and the seat-hours the report gives lie between
what the inner spans and the outer spans give.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from zbroker import LicenseClient, LicenseDenied, LicenseUnavailable, OutcomeUnknown
from zbroker.broker.report_check import compare_nodes, match_clients
from zbroker.broker.reportfile import log_files, read_stream
from zbroker.clients.testing import LocalTriad, wait_for

pytestmark = pytest.mark.integration


Span = tuple[float, float, float, float]  # checkout sent, answered; checkin sent, answered


def _peak(spans: list[tuple[float, float]]) -> int:
    """The most spans that hold at one time (a span holds on [start, end))."""
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    level = best = 0
    for _, step in edges:
        level += step
        best = max(best, level)
    return best


class Load:
    """Workers checking ``viewer`` out and in, keeping what the clients were told."""

    def __init__(self, triad: LocalTriad, workers: int = 3) -> None:
        self.triad = triad
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.checkouts: dict[int, tuple[str, int]] = {}
        self.checkins: list[int] = []
        self.spans: dict[str, list[Span]] = {}  # by worker: each checkout and checkin, timed
        self.unknown = 0  # checkouts or checkins the library settled (outcome unknown)
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._work, args=(f"worker{k}",)) for k in range(workers)
        ]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _work(self, user: str) -> None:
        try:
            spans = self.spans.setdefault(user, [])
            with LicenseClient(self.triad.endpoints, user=user, host="load") as client:
                while not self.stop.is_set():
                    sent = time.time()
                    try:
                        grant = client.checkout("viewer", timeout=5)
                    except LicenseUnavailable:
                        continue
                    except OutcomeUnknown:
                        self.unknown += 1
                        continue  # the library settles an unknown checkout by itself
                    got = time.time()
                    with self.lock:
                        self.checkouts[grant.id] = ("viewer", 1)
                    gid = grant.id
                    returning = time.time()
                    try:
                        client.checkin(grant, timeout=5)
                    except (LicenseUnavailable, OutcomeUnknown):
                        self.unknown += 1  # its seat's end is not known to the client
                        continue
                    spans.append((sent, got, returning, time.time()))
                    with self.lock:
                        self.checkins.append(gid)
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def served(self) -> int:
        with self.lock:
            return len(self.checkins)


def _logs(triad: LocalTriad) -> dict[str, list[Path]]:
    out = {}
    for node in triad.config.nodes:
        assert node.report_log is not None  # zbroker init turns it on
        out[node.name] = log_files(node.report_log) if node.report_log.exists() else []
    return out


def _last_ix(files: list[Path]) -> int:
    return max((line.record["ix"] for line in read_stream(files) if "ix" in line.record), default=0)


def _progress(load: Load, before: int, more: int = 20) -> None:
    wait_for(lambda: load.served() >= before + more, 30, f"{more} more checkins under load")


def test_three_report_logs_agree_and_hold_each_client_event_once(
    triad: LocalTriad, tmp_path: Path
) -> None:
    began = time.time()
    first = triad.wait_for_primary()
    primaries = {first}  # every node the clients found primary
    denials = 0
    with LicenseClient(triad.endpoints, user="holder", host="desk") as holder:
        held_sent = time.time()
        held = holder.checkout("cad", count=3)
        held_from = time.time()
        checkouts: dict[int, tuple[str, int]] = {held.id: ("cad", 3)}
        with Load(triad) as load:
            _progress(load, 0)
            for victim in (first, None):  # two primary kills, each restarted
                victim = victim or triad.wait_for_primary()
                triad.kill(victim)
                primaries.add(triad.wait_for_primary(not_=victim))
                _progress(load, load.served())
                triad.start(victim)
                with LicenseClient(triad.endpoints, user="denied", host="desk") as asker:
                    with pytest.raises(LicenseDenied):
                        asker.checkout("cad", count=100)  # larger than any pool: no_seats
                    denials += 1
            for name in triad.names:  # a full restart
                triad.kill(name)
            triad.start()
            primaries.add(triad.wait_for_primary(timeout=20))
            _progress(load, load.served())
        held_until = time.time()
        holder.checkin(held)
        held_returned = time.time()
    assert load.errors == []
    checkouts |= load.checkouts
    checkins = [held.id, *load.checkins]

    def settled() -> bool:
        logs = _logs(triad)
        lasts = {_last_ix(files) for files in logs.values()}
        return len(lasts) == 1 and compare_nodes(logs) == []

    wait_for(settled, 30, "the three report logs to hold the same records")
    logs = _logs(triad)
    assert compare_nodes(logs) == []
    records = [line.record for line in read_stream(logs[triad.names[0]]) if "ix" in line.record]
    assert match_clients(records, checkouts, checkins) == []
    # Each term names its primary and when it began; a node the clients found primary
    # began a term (a term whose no-op made no record cannot be: the no-op is its first
    # entry). Every record's wall time lies within the test (the fixture started the
    # triad, and its first term, shortly before ``began``).
    terms = [r for r in records if r["ev"] == "term"]
    assert len(terms) >= 3  # the first primary and two more
    assert {t["primary"] for t in terms} >= primaries
    assert {t["primary"] for t in terms} <= set(triad.names)
    ended = time.time()
    assert all(began - 60 <= r["at"] <= ended for r in records), "a record's time is off"

    # The report of all three logs, merged, and of each alone, against the clients' record.
    directories = [str(n.report_log) for n in triad.config.nodes]
    out = tmp_path / "report"
    result = _zbroker("report", *directories, "--csv", str(out), "--png", str(out))
    text = result.stdout
    assert "DISAGREE" not in text and "gap in" not in text
    viewer = _section(text, "viewer")
    # Every checkout a client was told of, and those of unknown outcome the library settled.
    assert _number(viewer, "checkouts ") >= len(load.checkouts)
    spans = [s for worker in load.spans.values() for s in worker]
    inner = _peak([(got, returning) for _, got, returning, _ in spans])
    outer = _peak([(sent, answered) for sent, _, _, answered in spans])
    peak = int(_number(viewer, "peak "))
    assert inner <= peak <= outer + load.unknown, (inner, peak, outer, load.unknown)
    cad = _section(text, "cad")
    assert "peak 3 at" in cad  # the holder's 3 seats, no one else's
    # Each denial's answer delta names the feature asked for: counted under it.
    assert "denials whose feature the log does not record" not in text
    assert f"denials {denials}: no_seats {denials}" in cad
    assert f"denied users: denied {denials}" in cad
    # Seat-hours against the clients' spans: the holder's 3 seats, and each worker's.
    rows = (out / "hours_by_user.csv").read_text().splitlines()[1:]
    hours = {(f, user): float(h) * 3600 for f, user, h in (row.split(",") for row in rows)}
    assert {user for f, user in hours if f == "cad"} == {"holder"}
    slack = 0.002  # the CSV's 6 decimals of an hour (3.6 ms), and float sums
    assert 3 * (held_until - held_from) - slack <= hours[("cad", "holder")]
    assert hours[("cad", "holder")] <= 3 * (held_returned - held_sent) + slack
    for user, worker in load.spans.items():
        low = sum(returning - got for _, got, returning, _ in worker)
        high = sum(answered - sent for sent, _, _, answered in worker)
        assert low - slack <= hours[("viewer", user)], user
        if load.unknown == 0:  # else seats the library settled count too
            assert hours[("viewer", user)] <= high + slack, user
    assert (out / "use_over_time.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "use_by_user.png").read_bytes()[:4] == b"\x89PNG"
    for directory in directories:
        verified = _zbroker("report", directory, "--verify")
        assert "the hash chain holds" in verified.stdout

    # One changed line of a copy of a node's log: --verify names it, and says no more.
    copy = tmp_path / "tampered"
    shutil.copytree(directories[0], copy)
    path, number = next(
        (f, k)
        for f in log_files(copy)
        for k, line in enumerate(f.read_bytes().splitlines(), 1)
        if b'"ev":"out"' in line and b'"count":1,' in line
    )
    lines = path.read_bytes().splitlines(keepends=True)
    lines[number - 1] = lines[number - 1].replace(b'"count":1,', b'"count":2,', 1)
    path.write_bytes(b"".join(lines))
    found = subprocess.run(
        [sys.executable, "-m", "zbroker.broker", "report", str(copy), "--verify"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert found.returncode == 1
    assert found.stdout.splitlines() == [
        f"{path}:{number}: breaks the chain: this line was changed, or the line before it deleted"
    ]  # fmt: skip


def _zbroker(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "zbroker.broker", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _section(text: str, feature: str) -> str:
    start = text.index(f"feature {feature}:")
    end = text.find("\nfeature ", start + 1)
    return text[start : end if end > 0 else len(text)]


def _number(text: str, before: str) -> float:
    tail = text[text.index(before) + len(before) :]
    word = tail.split()[0].rstrip(",")
    return float(word)
