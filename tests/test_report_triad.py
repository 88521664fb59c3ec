"""The report log on a live triad: load, two primary kills and a full restart, then the
three nodes' logs are identical by index, every checkout and checkin the clients were
told of appears exactly once, and ``zbroker report`` agrees with the clients' record."""

from __future__ import annotations

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


class Load:
    """Workers checking ``viewer`` out and in, keeping what the clients were told."""

    def __init__(self, triad: LocalTriad, workers: int = 3) -> None:
        self.triad = triad
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.checkouts: dict[int, tuple[str, int]] = {}
        self.checkins: list[int] = []
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
            with LicenseClient(self.triad.endpoints, user=user, host="load") as client:
                while not self.stop.is_set():
                    try:
                        grant = client.checkout("viewer", timeout=5)
                    except (LicenseUnavailable, OutcomeUnknown):
                        continue  # the library settles an unknown checkout by itself
                    with self.lock:
                        self.checkouts[grant.id] = ("viewer", 1)
                    gid = grant.id
                    try:
                        client.checkin(grant, timeout=5)
                    except (LicenseUnavailable, OutcomeUnknown):
                        continue
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
    first = triad.wait_for_primary()
    denials = 0
    with LicenseClient(triad.endpoints, user="holder", host="desk") as holder:
        held = holder.checkout("cad", count=3)
        held_from = time.time()
        checkouts: dict[int, tuple[str, int]] = {held.id: ("cad", 3)}
        with Load(triad) as load:
            _progress(load, 0)
            for victim in (first, None):  # two primary kills, each restarted
                victim = victim or triad.wait_for_primary()
                triad.kill(victim)
                triad.wait_for_primary(not_=victim)
                _progress(load, load.served())
                triad.start(victim)
                with LicenseClient(triad.endpoints, user="denied", host="desk") as asker:
                    with pytest.raises(LicenseDenied):
                        asker.checkout("cad", count=100)  # larger than any pool: no_seats
                    denials += 1
            for name in triad.names:  # a full restart
                triad.kill(name)
            triad.start()
            triad.wait_for_primary(timeout=20)
            _progress(load, load.served())
        holder.checkin(held)
        held_until = time.time()
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
    assert sum(r["ev"] == "term" for r in records) >= 3  # the first primary and two more

    # The report of all three logs, merged, and of each alone, against the clients' record.
    directories = [str(n.report_log) for n in triad.config.nodes]
    out = tmp_path / "report"
    result = _zbroker("report", *directories, "--csv", str(out), "--png", str(out))
    text = result.stdout
    assert "DISAGREE" not in text and "gap in" not in text
    viewer = _section(text, "viewer")
    # Every checkout a client was told of, and those of unknown outcome the library settled.
    assert _number(viewer, "checkouts ") >= len(load.checkouts)
    cad = _section(text, "cad")
    assert "peak 3 at" in cad  # the holder's 3 seats, no one else's
    # Each denial's answer delta names the feature asked for: counted under it.
    assert "denials whose feature the log does not record" not in text
    assert f"denied users: denied {denials}" in cad
    hours = 3 * (held_until - held_from) / 3600
    rows = (out / "hours_by_user.csv").read_text().splitlines()
    by_user = {row.split(",")[1]: float(row.split(",")[2]) for row in rows[1:] if "cad," in row}
    assert by_user == {"holder": pytest.approx(hours, rel=0.1)}
    assert (out / "use_over_time.png").stat().st_size > 0
    for directory in directories:
        verified = _zbroker("report", directory, "--verify")
        assert "the hash chain holds" in verified.stdout


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
