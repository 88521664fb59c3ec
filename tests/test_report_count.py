"""The count a report holds use against is the one in force at the time (QA probe D3).

A feature's count changes with a ``reread``: lowered, raised, a feature added, one
removed. Its utilisation, the count printed, the time at 100 % and each time bucket's
count must follow the reread records, not take the log's last count for all time. The
records come from the real ledger (``Desk``: its ``reload`` deltas make the ``reread``
records) or, for a line that expires at midnight, are written by hand.
"""

from __future__ import annotations

import csv
import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.test_report_facts import WALL, Desk
from tests.test_report_log import _write
from zbroker.broker.model import Entitlement
from zbroker.broker.report_cli import report as report_command
from zbroker.broker.report_stats import Report
from zbroker.broker.reportlog import Record

pytestmark = pytest.mark.unit


def _lines(**counts: int) -> list[Entitlement]:
    return [Entitlement(name, "1.0", n, None) for name, n in counts.items()]


def _reread(d: Desk, **counts: int) -> None:
    d.commit([(d.ledger.reload_delta(_lines(**counts), None, d.now), None)])


def _report(records: list[Record], end: float | None = None) -> Report:
    rep = Report(end=end)
    for r in records:
        rep.add(r)
    rep.finish()
    return rep


def _bucket_counts(rep: Report, name: str) -> dict[float, int | None]:
    """The count of each time bucket that saw time pass, by its start less WALL."""
    buckets = [(k, row.get(name)) for k, row in sorted(rep.buckets.items())]
    return {k * rep.bucket - WALL: b.count for k, b in buckets if b and b.count is not None}


def _lowered() -> list[Record]:
    """viewer: 50 seats; ann holds 2 for 12 s; at 20 s the count is lowered to 4; bob
    holds 1 from 30 s to 40 s."""
    d = Desk(_lines(viewer=50))
    d.ask("open", "s1", 1, user="ann")
    ann = d.ask("checkout", "s1", 2, feature="viewer", count=2)["grant"]["id"]
    d.advance(12.0)
    d.ask("checkin", "s1", 3, grant=ann)
    d.advance(8.0)
    _reread(d, viewer=4)
    d.advance(10.0)
    d.ask("open", "s2", 1, user="bob")
    bob = d.ask("checkout", "s2", 2, feature="viewer")["grant"]["id"]
    d.advance(10.0)
    d.ask("checkin", "s2", 3, grant=bob)
    return d.records


def test_a_window_before_a_lowered_count_is_held_against_the_count_then() -> None:
    rep = _report(_lowered(), end=WALL + 15)
    f = rep.features["viewer"]
    assert rep.total("viewer", WALL + 15) == 50
    # 2 seats for 12 s of 15 s, against 50: 24 / 750 (not 24 / 60 against the later 4)
    assert f.utilisation() == pytest.approx(24 / 750)
    assert set(_bucket_counts(rep, "viewer").values()) == {50}


def test_a_count_lowered_mid_window_splits_utilisation_and_the_buckets_at_the_reread() -> None:
    rep = _report(_lowered())
    f = rep.features["viewer"]
    # 24 + 10 seat-seconds over 40 s; the count 50 for 20 s, then 4 for 20 s
    assert f.seat_seconds == pytest.approx(34)
    assert f.count_average() == pytest.approx(27)
    assert f.utilisation() == pytest.approx(34 / (50 * 20 + 4 * 20))
    assert rep.total("viewer", WALL + 19) == 50 and rep.total("viewer", WALL + 20) == 4
    counts = _bucket_counts(rep, "viewer")
    assert {t: c for t, c in counts.items() if t < 20} == {t: 50 for t in range(20)}
    assert {t: c for t, c in counts.items() if t >= 20} == {t: 4 for t in range(20, 40)}


def test_a_raised_count_ends_the_window_at_100_percent_at_the_reread() -> None:
    d = Desk(_lines(viewer=4))
    d.ask("open", "s1", 1, user="ann")
    grant = d.ask("checkout", "s1", 2, feature="viewer", count=4)["grant"]["id"]
    d.advance(10.0)
    _reread(d, viewer=8)
    d.advance(10.0)
    d.ask("checkin", "s1", 3, grant=grant)
    rep = _report(d.records)
    f = rep.features["viewer"]
    assert (f.full_seconds, f.full_windows) == (10, 1)  # full until the reread, not after
    # 4 seats for 20 s against 4 for 10 s, then 8 for 10 s
    assert f.utilisation() == pytest.approx(80 / 120)
    counts = _bucket_counts(rep, "viewer")
    assert (counts[5], counts[15]) == (4, 8)


def test_a_count_lowered_to_the_seats_in_use_is_full_from_the_reread() -> None:
    d = Desk(_lines(viewer=50))
    d.ask("open", "s1", 1, user="ann")
    grant = d.ask("checkout", "s1", 2, feature="viewer", count=4)["grant"]["id"]
    d.advance(10.0)
    _reread(d, viewer=4)
    d.advance(5.0)
    d.ask("checkin", "s1", 3, grant=grant)
    f = _report(d.records).features["viewer"]
    assert (f.full_seconds, f.full_windows) == (5, 1)


def _removed() -> list[Record]:
    """viewer 50 and cad 2; ann holds 2 viewer seats for 10 s; at 20 s viewer's line is
    removed; at 30 s bob checks out a cad seat (the log goes on)."""
    d = Desk(_lines(viewer=50, cad=2))
    d.ask("open", "s1", 1, user="ann")
    grant = d.ask("checkout", "s1", 2, feature="viewer", count=2)["grant"]["id"]
    d.advance(10.0)
    d.ask("checkin", "s1", 3, grant=grant)
    d.advance(10.0)
    _reread(d, cad=2)
    d.advance(10.0)
    d.ask("open", "s2", 1, user="bob")
    d.ask("checkout", "s2", 2, feature="cad")
    return d.records


def test_a_removed_feature_has_its_count_until_the_removal_and_0_after() -> None:
    records = _removed()
    rep = _report(records)
    f = rep.features["viewer"]
    assert rep.total("viewer", WALL + 19) == 50 and rep.total("viewer", WALL + 20) == 0
    assert f.utilisation() == pytest.approx(20 / (50 * 20))  # no count after the removal
    counts = _bucket_counts(rep, "viewer")
    assert {t: c for t, c in counts.items() if t < 20} == {t: 50 for t in range(20)}
    assert {t: c for t, c in counts.items() if t >= 20} == {t: 0 for t in range(20, 30)}
    before = _report(records, end=WALL + 15)
    assert before.total("viewer", WALL + 15) == 50
    assert before.features["viewer"].utilisation() == pytest.approx(20 / (50 * 15))


def test_a_feature_added_later_has_no_count_before_it_was_added() -> None:
    d = Desk(_lines(cad=2))
    d.advance(10.0)
    _reread(d, cad=2, viewer=50)
    d.ask("open", "s1", 1, user="ann")
    grant = d.ask("checkout", "s1", 2, feature="viewer", count=5)["grant"]["id"]
    d.advance(10.0)
    d.ask("checkin", "s1", 3, grant=grant)
    rep = _report(d.records)
    assert rep.total("viewer", WALL + 5) == 0 and rep.total("viewer", WALL + 10) == 50
    assert rep.features["viewer"].utilisation() == pytest.approx(50 / (50 * 10))
    assert set(_bucket_counts(rep, "viewer").values()) == {50}  # its buckets begin at 10 s
    assert _report(d.records, end=WALL + 5).total("viewer", WALL + 5) == 0


def test_a_line_that_expires_lowers_the_count_at_the_next_midnight() -> None:
    midnight = (WALL // 86400 + 1) * 86400
    day = datetime.datetime.fromtimestamp(midnight - 1, tz=datetime.UTC).date().isoformat()
    lines = [
        {"feature": "viewer", "version": "1.0", "count": 50, "expires": day},
        {"feature": "viewer", "version": "1.0", "count": 10, "expires": None},
    ]
    seat = {"feature": "viewer", "version": "1.0", "count": 1, "grant": 1, "user": "ann"}
    rep = _report([
        {"ix": 1, "n": 0, "ev": "reread", "at": midnight - 100, "lines": lines},
        {"ix": 2, "n": 0, "ev": "out", "at": midnight - 100, "in_use": 1, **seat},
        {"ix": 3, "n": 0, "ev": "in", "at": midnight + 100, "in_use": 0, "reason": "checkin",
         "since": midnight - 100, **seat},
    ])  # fmt: skip
    f = rep.features["viewer"]
    assert f.utilisation() == pytest.approx(200 / (60 * 100 + 10 * 100))


def test_the_command_shows_the_count_in_force_in_its_window_and_each_csv_row(
    tmp_path: Path,
) -> None:
    """The probe's repro: ``--to`` before the reread that lowered the count."""
    log = tmp_path / "log"
    _write(log, _lowered()).close()
    to = datetime.datetime.fromtimestamp(WALL + 15, tz=datetime.UTC).isoformat()
    out = tmp_path / "out"
    result = CliRunner().invoke(
        report_command, [str(log), "--feature", "viewer", "--to", to, "--csv", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "feature viewer: count 50\n" in result.output
    assert "utilisation 3.2 %" in result.output  # 2 seats for 12 s of 15 s, of 50
    with (out / "use_over_time.csv").open() as fh:
        assert {row["count"] for row in csv.DictReader(fh)} == {"50"}
    with (out / "features.csv").open() as fh:
        (row,) = csv.DictReader(fh)
    assert (row["count"], row["utilisation"]) == ("50", "0.0320")

    whole = CliRunner().invoke(report_command, [str(log), "--feature", "viewer", "--csv", str(out)])
    assert whole.exit_code == 0, whole.output
    assert "count 4 at the window's end, 27.00 on average over it" in whole.output
    assert f"utilisation {34 / 1080 * 100:.1f} %" in whole.output
    reread = datetime.datetime.fromtimestamp(WALL + 20, tz=datetime.UTC)
    with (out / "use_over_time.csv").open() as fh:
        rows = [(row["start"], row["count"]) for row in csv.DictReader(fh)]
    assert {c for s, c in rows if s < reread.strftime("%Y-%m-%d %H:%M:%SZ")} == {"50"}
    assert {c for s, c in rows if s >= reread.strftime("%Y-%m-%d %H:%M:%SZ")} == {"4"}
