"""The last 24 hours of use per feature, read from the nodes' report logs for the page.

A node that keeps a report log (``report_log`` in its config, docs/reportlog.md) writes
one file per UTC day at least: a file holds records of the day in its name only (a
record of a later day starts a new file). So the last 24 hours are in the files of
the day 24 hours ago and after, whatever the log's size over the years, and the first
of them starts with a header that says the seats in use then. ``read_history`` reads
those files of every node whose directory this host can read (``zbroker web --config``
on a node's host, or one that mounts them), merges them by log index as ``zbroker
report`` does (``zbroker.broker.reportfile.merge``) and lets ``zbroker.broker.report_stats``
integrate the seats in use over time buckets: per bucket the average and the peak.

No file since the window began means nothing changed in it: ``History.quiet`` says
so, and the page draws the seats in use now across the whole day.

Reading a busy day's files takes a while, so the web shell reads them in a thread of
its own (a ``StatusPoller`` of its own, every ``READ_EVERY`` seconds at most), never in
a page request and never in a node.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zbroker.broker.report_stats import Report
from zbroker.broker.reportfile import Merged, ReportFileError, log_files, merge

WINDOW = 24 * 3600.0  # seconds of use drawn
READ_EVERY = 60.0  # seconds between two readings of the logs, at the least


@dataclass(frozen=True)
class Use:
    """One feature's use over the window: per bucket from ``start``, each ``bucket``
    seconds wide, the average seats in use and the peak (None: no record covers it)."""

    average: tuple[float | None, ...]
    peak: tuple[int | None, ...]
    total: int  # the feature's count at the end of the window


@dataclass(frozen=True)
class History:
    start: float  # Unix time the window starts
    end: float
    bucket: float  # seconds per bucket
    features: dict[str, Use]
    quiet: bool  # no record in the window: nothing changed in it
    files: int  # report files read

    def to_map(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "bucket": self.bucket,
            "quiet": self.quiet,
            "files": self.files,
            "features": {
                name: {"average": list(u.average), "peak": list(u.peak), "total": u.total}
                for name, u in self.features.items()
            },
        }


def day_files(directory: Path, since: float) -> list[Path]:
    """The report files of ``directory`` that may hold records at or after ``since``."""
    first_day = datetime.datetime.fromtimestamp(since, datetime.UTC).date().isoformat()
    return [p for p in log_files(directory) if p.stem[-len(first_day) :] >= first_day]


def read_history(directories: Sequence[Path], now: float, window: float = WINDOW) -> History:
    """The use of the ``window`` seconds before ``now`` from the logs of ``directories``.

    ReportFileError when none of them can be read (the page says why).
    """
    start = now - window
    streams: list[list[Path]] = []
    problems: list[str] = []
    for directory in directories:
        try:
            files = day_files(directory, start)
        except ReportFileError as exc:
            problems.append(str(exc))
            continue
        if files:
            streams.append(files)
    if problems and len(problems) == len(directories):
        raise ReportFileError("; ".join(problems))
    report = Report(start=start, end=now)
    merged = Merged()
    headed = False
    for line in merge(streams, merged):
        if not headed:
            _headers(report, merged)
            headed = True
        report.add(line.record)
    if not headed:  # files of headers alone: nothing changed since they began
        _headers(report, merged)
    quiet = report.first_at is None  # no file since the window began: nothing changed
    report.finish()
    return History(
        start=start,
        end=now,
        bucket=float(report.bucket),
        features={} if quiet else _uses(report, start, now),
        quiet=quiet,
        files=sum(len(s) for s in streams),
    )


def _headers(report: Report, merged: Merged) -> None:
    """What was so when each node's files begin, from then on (``add`` takes a header
    at its own time, where ``zbroker report`` counts from its first record)."""
    for header in sorted(merged.headers, key=lambda h: float(h.record.get("at") or 0.0)):
        report.add(header.record)


def _uses(report: Report, start: float, end: float) -> dict[str, Use]:
    width = float(report.bucket)
    first, last = int(start // width), math.ceil(end / width)
    out = {}
    for name in sorted(report.features):
        average: list[float | None] = []
        peak: list[int | None] = []
        for k in range(first, last):
            b = report.buckets.get(k, {}).get(name)
            inside = min(end, (k + 1) * width) - max(start, k * width)
            if b is None or inside <= 0:
                average.append(None)
                peak.append(None)
                continue
            average.append(min(b.seat_seconds / inside, float(b.peak)))
            peak.append(b.peak)
        out[name] = Use(tuple(average), tuple(peak), report.total(name, end))
    return out
