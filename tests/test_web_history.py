"""The status page's last 24 hours of use (broker/web/history.py), read from report logs
written by the node's own writer: only the files of the window's days, merged over
nodes, averaged and peaked per time bucket."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from zbroker.broker.reportfile import ReportFileError, ReportWriter
from zbroker.broker.web.history import day_files, read_history

pytestmark = pytest.mark.unit

UTC = datetime.UTC
NOW = datetime.datetime(2026, 11, 30, 12, tzinfo=UTC).timestamp()
HOUR = 3600.0
LINES = [{"feature": "cad", "version": "2.0", "count": 4, "expires": None},
         {"feature": "solver", "version": "1.5", "count": 2, "expires": None}]  # fmt: skip


def _seat(ix: int, ev: str, at: float, in_use: int, feature: str = "cad") -> dict[str, Any]:
    record = {"ix": ix, "n": 0, "term": 1, "ev": ev, "at": at, "feature": feature,
              "version": "2.0", "count": 1, "grant": ix, "user": "ann", "host": "h1",
              "in_use": in_use}  # fmt: skip
    if ev == "in":
        record |= {"reason": "checkin", "since": at - HOUR}
    return record


def write_days(directory: Path, node: str = "alpha") -> None:
    """Three days of one node: cad 1 seat from 11-28, 2 from 11-29 06:00, 1 from 18:00,
    3 from 11-30 06:00; nothing of solver."""
    w = ReportWriter(directory, node)
    w.open()
    d28 = NOW - 2 * 24 * HOUR
    reread = {"ix": 1, "n": 0, "term": 1, "ev": "reread", "at": d28, "lines": LINES}
    w.write([reread, _seat(2, "out", d28 + HOUR, 1)], d28)
    d29 = NOW - 24 * HOUR - 6 * HOUR  # 11-29 06:00
    w.write([_seat(3, "out", d29, 2)], d29)
    w.write([_seat(4, "in", d29 + 12 * HOUR, 1)], d29 + 12 * HOUR)
    w.write([_seat(5, "out", NOW - 6 * HOUR, 2), _seat(6, "out", NOW - 6 * HOUR, 3)],
            NOW - 6 * HOUR)  # fmt: skip
    w.flush()
    w.close()


def test_the_last_day_is_read_from_its_days_files_only(tmp_path: Path) -> None:
    write_days(tmp_path)
    assert [p.name[-16:-6] for p in day_files(tmp_path, NOW - 24 * HOUR)] == [
        "2026-11-29",
        "2026-11-30",
    ]
    history = read_history([tmp_path], NOW)
    assert history.files == 2 and not history.quiet
    assert history.bucket == 300 and history.end - history.start == 24 * HOUR
    cad = history.features["cad"]
    assert len(cad.average) == len(cad.peak) == 24 * 12 and cad.total == 4
    # 12:00 to 18:00 two seats, to 06:00 one (its header said 1 at 00:00, the checkin
    # made it 1 at 18:00), then three: the buckets are aligned with those hours.
    assert cad.average == (2.0,) * 72 + (1.0,) * 144 + (3.0,) * 72
    assert cad.peak[71:73] == (2, 1) and cad.peak[-1] == 3
    assert history.features["solver"].average == (0.0,) * 288


def test_a_quiet_day_has_no_file_and_says_so(tmp_path: Path) -> None:
    write_days(tmp_path)
    history = read_history([tmp_path], NOW + 3 * 24 * HOUR)
    assert history.quiet and history.files == 0 and history.features == {}


def test_several_nodes_logs_are_merged_and_one_unreadable_is_left_out(tmp_path: Path) -> None:
    write_days(tmp_path / "alpha")
    write_days(tmp_path / "beta", node="beta")
    history = read_history([tmp_path / "alpha", tmp_path / "beta", tmp_path / "none"], NOW)
    assert history.files == 4
    assert history.features["cad"].average[-1] == 3.0  # each record once, not twice
    with pytest.raises(ReportFileError, match="none"):
        read_history([tmp_path / "none"], NOW)
