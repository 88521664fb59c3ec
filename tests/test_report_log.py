"""The report log: records from committed deltas, the files, the chain, and the report.

Every record here comes from a real ``Ledger`` fed the deltas its ``handle`` would make
(or from records written by hand where the report's arithmetic is checked), so the
report log and the ledger cannot drift apart unseen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from zbroker.broker.ledger import Ledger
from zbroker.broker.model import Entitlement
from zbroker.broker.report_cli import report as report_command
from zbroker.broker.report_stats import Report
from zbroker.broker.reportfile import Merged, ReportWriter, log_files, merge, read_stream, verify
from zbroker.broker.reportlog import GENESIS, ReportLogError, derive, seal, settle, unseal
from zbroker.broker.seats import Grant, entitlement_to_map

pytestmark = pytest.mark.unit

T0 = 1_795_000_000.0  # 2026-11-18, a wall time well inside every check


class ViewedLedger(Ledger):
    """The ledger with the grant lookup the report log reads (a one-line accessor the
    ledger does not have yet: docs/reportlog.md)."""

    def grant(self, gid: int) -> Grant | None:
        return next((g for g in self.grants() if g.id == gid), None)


def _ledger() -> ViewedLedger:
    return ViewedLedger((), lease=30.0, heartbeat=10.0)


LINES = [Entitlement("cad", "2.0", 2, None), Entitlement("solver", "1.5", 1, None)]


def _run(deltas: list[dict[str, Any] | None], ledger: ViewedLedger | None = None) -> list[dict]:
    """Derive and apply each delta as a node does with its committed entries."""
    led = ledger or _ledger()
    out: list[dict[str, Any]] = []
    for index, delta in enumerate(deltas, 1):
        records = derive(index, 1, delta, led)
        if delta is not None:
            led.apply(delta)
        settle(records, led)
        out += records
    return out


def _open(sid: str, user: str, at: float) -> dict[str, Any]:
    return {"k": "open", "sid": sid, "req": 1, "ack": 0, "user": user, "host": f"{user}-pc",
            "display": ":0", "client_version": "1.0", "at": at}  # fmt: skip


def _grant(sid: str, req: int, gid: int, feature: str, at: float, count: int = 1) -> dict:
    return {"k": "grant", "sid": sid, "req": req, "ack": 0, "grant": gid, "feature": feature,
            "version": "2.0" if feature == "cad" else "1.5", "count": count, "at": at}  # fmt: skip


RELOAD = {"k": "reload", "entitlements": [entitlement_to_map(e) for e in LINES]}


def _history() -> list[dict[str, Any] | None]:
    return [
        None,  # the first primary's no-op
        RELOAD,
        _open("s1", "ann", T0),
        _open("s2", "bob", T0 + 1),
        _grant("s1", 2, 1, "cad", T0 + 2),
        _grant("s2", 2, 2, "cad", T0 + 3),
        _grant("s2", 3, 3, "solver", T0 + 4),
        {"k": "answer", "sid": "s1", "req": 3, "ack": 0,
         "reply": {"status": "denied", "reason": "no_seats", "detail": "cad 2.0: 2 of 2"}},
        {"k": "release", "sid": "s1", "req": 4, "ack": 0, "grant": 1},
        {"k": "answer", "sid": "s1", "req": 5, "ack": 0,
         "reply": {"status": "denied", "reason": "not_held", "detail": "grant 1"}},
        {"k": "close", "sid": "s2", "req": 4, "ack": 0},
        _open("s3", "cyd", T0 + 9),
        _grant("s3", 2, 4, "cad", T0 + 10),
        {"k": "expire", "sid": "s3"},
    ]  # fmt: skip


def test_each_committed_delta_yields_its_records_with_the_seats_in_use_after_it() -> None:
    records = _run(_history())
    events = [(r["ix"], r["n"], r["ev"], r.get("reason")) for r in records]
    assert events == [
        (1, 0, "term", None),
        (2, 0, "reread", None),
        (5, 0, "out", None),
        (6, 0, "out", None),
        (7, 0, "out", None),
        (8, 0, "deny", "no_seats"),
        (9, 0, "in", "checkin"),
        (10, 0, "deny", "not_held"),
        (11, 0, "in", "closed"),  # bob's two grants, ascending id
        (11, 1, "in", "closed"),
        (13, 0, "out", None),
        (14, 0, "in", "expired"),
    ]
    by = {(r["ix"], r["n"]): r for r in records}
    assert [by[(5, 0)]["in_use"], by[(6, 0)]["in_use"], by[(7, 0)]["in_use"]] == [1, 2, 1]
    assert by[(9, 0)]["in_use"] == 1 and by[(9, 0)]["since"] == T0 + 2
    assert (by[(11, 0)]["feature"], by[(11, 0)]["in_use"]) == ("cad", 0)
    assert (by[(11, 1)]["feature"], by[(11, 1)]["in_use"]) == ("solver", 0)
    out = by[(5, 0)]
    assert {k: out[k] for k in ("user", "host", "display", "client_version", "sid")} == {
        "user": "ann", "host": "ann-pc", "display": ":0", "client_version": "1.0", "sid": "s1"
    }  # fmt: skip
    assert (out["feature"], out["version"], out["count"], out["grant"]) == ("cad", "2.0", 1, 1)
    assert out["at"] == T0 + 2 and by[(9, 0)]["at"] is None  # release deltas carry no time
    assert by[(8, 0)]["op"] == "checkout" and by[(10, 0)]["op"] == "checkin"
    assert by[(8, 0)]["user"] == "ann" and "feature" not in by[(8, 0)]
    assert [line["feature"] for line in by[(2, 0)]["lines"]] == ["cad", "solver"]


def test_fields_the_deltas_will_carry_appear_when_they_do() -> None:
    led = _ledger()
    _run([RELOAD, _open("s1", "ann", T0)], led)
    waited = {**_grant("s1", 2, 1, "cad", T0 + 5), "waited": 4.5}
    denied = {"k": "answer", "sid": "s1", "req": 3, "ack": 0, "feature": "cad", "count": 2,
              "version": "2.0", "waited": 1.0, "at": T0 + 6,
              "reply": {"status": "denied", "reason": "no_seats", "detail": "gave up"}}  # fmt: skip
    records = derive(3, 2, waited, led)
    led.apply(waited)
    records += derive(4, 2, denied, led)
    assert [(r["ev"], r["n"]) for r in records] == [
        ("queued", 0), ("dequeued", 1), ("out", 2), ("queued", 0), ("dequeued", 1), ("deny", 2)
    ]  # fmt: skip
    assert records[1]["waited"] == 4.5 and records[1]["feature"] == "cad"
    assert records[0]["at"] == T0 + 0.5 and records[1]["at"] == T0 + 5  # joined, decided
    assert records[5]["feature"] == "cad" and records[5]["at"] == T0 + 6
    assert derive(10, 3, {"k": "lend"}, led)[0] == {
        "ix": 10, "n": 0, "term": 3, "ev": "unknown", "at": None, "k": "lend"
    }  # fmt: skip


def test_a_new_primarys_no_op_names_it_and_an_older_one_reads_as_before() -> None:
    led = _ledger()
    named = derive(9, 3, {"k": "term", "primary": "alpha", "at": T0}, led)
    assert named == [{"ix": 9, "n": 0, "term": 3, "ev": "term", "at": T0, "primary": "alpha"}]
    led.apply({"k": "term", "primary": "alpha", "at": T0})  # a no-op for the ledger
    assert derive(1, 1, None, led) == [
        {"ix": 1, "n": 0, "term": 1, "ev": "term", "at": None, "primary": None}
    ]  # fmt: skip
    rep = Report()
    for r in [*derive(1, 1, None, led), *named, {**named[0], "ix": 12, "primary": "beta"}]:
        rep.add(r)
    assert rep.terms == 3 and dict(rep.primaries) == {"alpha": 1, "beta": 1}


def test_a_delta_that_does_not_fit_the_ledger_is_refused() -> None:
    with pytest.raises(ReportLogError, match="session 'nobody' is not open"):
        derive(1, 1, {"k": "release", "sid": "nobody", "req": 1, "ack": 0, "grant": 1}, _ledger())


def test_a_sealed_line_is_its_canonical_json_with_the_hash_last() -> None:
    record = {"ix": 1, "ev": "out", "b": "é", "at": 1795000000.25, "w": 5e-05, "l": [1, "x"]}
    line, h = seal(record, GENESIS)
    assert line.endswith(f',"h":"{h}"}}\n'.encode()) and len(h) == 32
    assert json.loads(line)["b"] == "é"
    body, unsealed_h = unseal(line[:-1]) or (b"", "")
    assert unsealed_h == h and json.loads(body) == record
    # Sorted keys, no blanks, UTF-8 as is: the json module's text, but for the notation of
    # numbers it would write with an exponent (5e-05 here), which reads the same.
    del record["w"]
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert seal(record, GENESIS)[0].startswith(text[:-1].encode() + b',"h":')
    assert unseal(b'{"ix":1}') is None


# --- files -------------------------------------------------------------------------------


def _write(directory: Path, records: list[dict], wall: float = T0, **kw: Any) -> ReportWriter:
    w = ReportWriter(directory, "alpha", **kw)
    w.open()
    w.write(records, wall)
    w.flush()
    return w


def _indexes(directory: Path) -> list[tuple[int, int]]:
    return [
        (line.record["ix"], line.record["n"])
        for line in read_stream(log_files(directory))
        if "ix" in line.record
    ]


def test_a_restarted_node_resumes_without_gap_or_duplicate(tmp_path: Path) -> None:
    records = _run(_history())
    first = [r for r in records if r["ix"] <= 9]
    w = _write(tmp_path, first)
    w.close()
    again = ReportWriter(tmp_path, "alpha")
    again.open()
    assert again.last_index == 9
    again.applied_from(4, [], {}, T0, "snapshot")  # its snapshot is older: nothing to say
    again.write(records, T0)  # the restarted node applies its whole log again
    again.close()
    assert _indexes(tmp_path) == [(r["ix"], r["n"]) for r in records]
    assert verify(log_files(tmp_path)) == []


def test_a_torn_last_line_is_cut_and_written_again(tmp_path: Path) -> None:
    records = _run(_history())
    _write(tmp_path, records[:5]).close()
    path = log_files(tmp_path)[-1]
    text = path.read_text()
    path.write_text(text[: len(text) - 20])  # a crash in the middle of the last line
    w = ReportWriter(tmp_path, "alpha")
    w.open()
    assert w.last_index == records[3]["ix"]
    w.write(records, T0)
    w.close()
    assert _indexes(tmp_path) == [(r["ix"], r["n"]) for r in records]
    assert verify(log_files(tmp_path)) == []


def test_a_wiped_node_says_which_indexes_it_cannot_rebuild(tmp_path: Path) -> None:
    records = _run(_history())
    w = _write(tmp_path, [r for r in records if r["ix"] <= 5])
    w.applied_from(10, [{"feature": "cad", "count": 2}], {"cad": 1}, T0 + 20, "snapshot at 10")
    w.write(records, T0 + 20)
    w.close()
    lines = list(read_stream(log_files(tmp_path)))
    gaps = [line.record for line in lines if line.record["ev"] == "gap"]
    assert [(g["from"], g["to"], g["why"]) for g in gaps] == [(6, 10, "snapshot at 10")]
    assert [ix for ix, _ in _indexes(tmp_path)] == [1, 2, 5, 11, 11, 13, 14]
    assert verify(log_files(tmp_path)) == []


def test_files_rotate_by_size_and_day_and_the_chain_runs_across_them(tmp_path: Path) -> None:
    records = _run(_history())
    w = ReportWriter(tmp_path, "alpha", max_bytes=600, retention_days=0)
    w.open()
    for r in records:
        w.write([r], T0)
    w.write([{**records[-1], "ix": 99}], T0 + 86_400)  # the next UTC day
    w.close()
    files = log_files(tmp_path)
    assert len(files) >= 3 and files[-1].name.endswith("2026-11-19.jsonl")
    assert verify(files) == []
    first = json.loads(files[1].read_text().splitlines()[0])
    assert first["ev"] == "file" and first["lines"] and first["in_use"]


def test_retention_deletes_files_of_days_past_it(tmp_path: Path) -> None:
    w = ReportWriter(tmp_path, "alpha", retention_days=2)
    w.open()
    for day in range(5):
        w.write([{"ix": day + 1, "n": 0, "term": 1, "ev": "term", "at": None}], T0 + day * 86_400)
    w.close()
    days = [p.name[-15:-6] for p in log_files(tmp_path)]
    assert days == ["026-11-20", "026-11-21", "026-11-22"]


def _sealed_files(tmp_path: Path) -> list[Path]:
    w = ReportWriter(tmp_path, "alpha", max_bytes=900)
    w.open()
    for r in _run(_history()):
        w.write([r], T0)
    w.close()
    return log_files(tmp_path)


def test_verify_names_a_changed_line(tmp_path: Path) -> None:
    files = _sealed_files(tmp_path)
    lines = files[0].read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"count":1', '"count":3')
    assert lines[2] != files[0].read_text().splitlines(keepends=True)[2]
    files[0].write_text("".join(lines))
    found = verify(files)
    assert [(f.path, f.number) for f in found] == [(files[0], 3)]
    assert "changed" in found[0].what


def test_verify_names_the_line_after_a_deleted_one(tmp_path: Path) -> None:
    files = _sealed_files(tmp_path)
    lines = files[0].read_text().splitlines(keepends=True)
    del lines[2]
    files[0].write_text("".join(lines))
    assert [(f.path, f.number) for f in verify(files)] == [(files[0], 3)]


def test_verify_finds_lines_cut_from_the_end_of_a_file(tmp_path: Path) -> None:
    files = _sealed_files(tmp_path)
    assert len(files) >= 2
    lines = files[0].read_text().splitlines(keepends=True)
    files[0].write_text("".join(lines[:-1]))
    found = verify(files)
    assert [(f.path, f.number) for f in found] == [(files[1], 1)]
    assert "does not follow the file before it" in found[0].what


# --- the report ----------------------------------------------------------------------------


def _rec(ix: int, ev: str, at: float | None, **kw: Any) -> dict[str, Any]:
    return {"ix": ix, "n": 0, "term": 1, "ev": ev, "at": at, **kw}


def _small_history() -> list[dict[str, Any]]:
    """Two seats of cad, over 40 seconds (hand-computed figures in the test below)."""
    ann = {"user": "ann", "host": "h1", "sid": "s1"}
    bob = {"user": "bob", "host": "h2", "sid": "s2"}
    cad = {"feature": "cad", "version": "2.0", "count": 1}
    return [
        _rec(
            1,
            "reread",
            T0,
            lines=[{"feature": "cad", "version": "2.0", "count": 2, "expires": None}],
        ),
        _rec(2, "out", T0, grant=1, in_use=1, **cad, **ann),
        _rec(3, "out", T0 + 10, grant=2, in_use=2, **cad, **bob),
        _rec(4, "deny", T0 + 15, reason="no_seats", user="cyd", feature="cad"),
        _rec(5, "deny", None, reason="no_seats", user="cyd", feature="cad"),
        _rec(6, "in", T0 + 20, reason="checkin", grant=1, since=T0, in_use=1, **cad, **ann),
        _rec(7, "dequeued", T0 + 30, waited=2.0, feature="cad"),
        _rec(8, "in", T0 + 40, reason="expired", grant=2, since=T0 + 10, in_use=0, **cad, **bob),
    ]


def test_the_report_figures_match_a_hand_computed_history() -> None:
    rep = Report()
    for r in _small_history():
        rep.add(r)
    rep.finish()
    f = rep.features["cad"]
    assert (f.peak, f.peak_at) == (2, T0 + 10)
    # 1 seat for 10 s, 2 for 10 s, 1 for 20 s: 50 seat-seconds over 40 s
    assert f.seconds == 40 and f.average() == pytest.approx(1.25)
    assert f.p95() == 2 and rep.total("cad", T0) == 2
    assert (f.full_seconds, f.full_windows) == (10, 1)
    assert f.hours == {"ann": 20.0, "bob": 30.0}
    assert f.denials == {"no_seats": 2} and f.denied_users == {"cyd": 2}
    assert rep.estimated == 1  # the second denial took the time before it
    assert f.checkouts == 2 and f.checkins == {"checkin": 1, "expired": 1}
    assert f.wait_quantile(0.5) == pytest.approx(2.0, rel=0.05)
    seat_seconds = sum(row["cad"].seat_seconds for row in rep.buckets.values())
    assert seat_seconds == pytest.approx(50)


def test_the_window_cuts_use_and_hours_at_its_edges() -> None:
    rep = Report(start=T0 + 5, end=T0 + 25, by="host")
    for r in _small_history():
        rep.add(r)
    rep.finish()
    f = rep.features["cad"]
    # 1 seat 5..10, 2 seats 10..20, 1 seat 20..25: 30 seat-seconds over 20 s
    assert f.seconds == 20 and f.average() == pytest.approx(1.5)
    assert f.hours == {"h1": 15.0, "h2": 15.0}  # ann 5..20, bob 10..25 (still out at 25)
    assert f.checkouts == 1  # bob's; ann's was before the window


def test_hours_by_group_count_a_user_in_each_of_its_groups() -> None:
    rep = Report(by="group", groups={"ann": ["design", "all"]})
    for r in _small_history():
        rep.add(r)
    rep.finish()
    assert rep.features["cad"].hours == {"design": 20.0, "all": 20.0, "(no group)": 30.0}


def test_buckets_widen_and_keep_their_sums_over_a_long_history() -> None:
    rep = Report()
    lines = [{"feature": "cad", "version": "1", "count": 1, "expires": None}]
    rep.add(_rec(1, "reread", T0, lines=lines))
    cad = {"feature": "cad", "version": "1", "count": 1, "user": "ann"}
    for k in range(100):  # one seat half of each hour, for 100 hours
        t = T0 + k * 3600
        rep.add(_rec(2 * k + 2, "out", t, grant=k + 1, in_use=1, **cad))
        rep.add(_rec(2 * k + 3, "in", t + 1800, grant=k + 1, since=t, in_use=0, **cad))
    rep.finish()
    assert len(rep.buckets) <= 500 and rep.bucket >= 600
    f = rep.features["cad"]
    assert sum(r["cad"].seat_seconds for r in rep.buckets.values()) == pytest.approx(100 * 1800)
    assert f.average() == pytest.approx(100 * 1800 / (99 * 3600 + 1800))
    assert f.full_windows == 100 and f.full_seconds == pytest.approx(100 * 1800)
    assert f.hours["ann"] == pytest.approx(100 * 1800)


# --- several nodes, and the command ------------------------------------------------------------


def _node_logs(tmp_path: Path) -> tuple[Path, Path]:
    records = _run(_history())
    a, b = tmp_path / "alpha", tmp_path / "beta"
    _write(a, records).close()
    wb = _write(b, [r for r in records if r["ix"] <= 5])
    wb.applied_from(10, [], {}, T0, "wiped: caught up from a snapshot at 10")
    wb.write(records, T0)
    wb.close()
    return a, b


def test_two_nodes_logs_merge_by_index_and_one_fills_the_others_gap(tmp_path: Path) -> None:
    a, b = _node_logs(tmp_path)
    merged = Merged()
    got = [
        (line.record["ix"], line.record["n"])
        for line in merge([log_files(b), log_files(a)], merged)
    ]
    assert got == [(r["ix"], r["n"]) for r in _run(_history())]
    assert merged.conflicts == [] and len(merged.gaps) == 1 and len(merged.headers) == 2


def test_records_of_one_index_that_differ_between_nodes_are_named(tmp_path: Path) -> None:
    a, b = _node_logs(tmp_path)
    path = log_files(b)[0]
    text = path.read_text().replace('"user":"ann"', '"user":"eve"', 1)
    path.write_text(text)
    merged = Merged()
    list(merge([log_files(a), log_files(b)], merged))
    assert len(merged.conflicts) == 1 and merged.conflicts[0][1].path == path


def test_the_command_prints_the_tables_and_writes_csv_and_png(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    _write(directory, _small_history()).close()
    out = tmp_path / "out"
    result = CliRunner().invoke(
        report_command, [str(directory), "--csv", str(out), "--png", str(out), "--by", "host"]
    )
    assert result.exit_code == 0, result.output
    assert "feature cad: count 2" in result.output
    assert "peak 2 at 2026-11-18" in result.output
    assert "average 1.25, p95 2" in result.output
    assert "at 100 %: 0:00:10 in 1 windows" in result.output
    assert "denials 2: no_seats 2" in result.output
    assert "seat-hours by host: h2 0.01, h1 0.01" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "denials.csv", "features.csv", "hours_by_host.csv", "idle_hours.csv", "use_by_host.png",
        "use_over_time.csv", "use_over_time.png",
    ]  # fmt: skip
    assert (out / "use_over_time.png").read_bytes()[:4] == b"\x89PNG"
    row = (out / "features.csv").read_text().splitlines()[1].split(",")
    assert row[:3] == ["cad", "2", "2"]


def test_the_command_verifies_and_names_the_tampered_line(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    _write(directory, _small_history()).close()
    ok = CliRunner().invoke(report_command, [str(directory), "--verify"])
    assert ok.exit_code == 0 and "the hash chain holds" in ok.output
    path = log_files(directory)[0]
    lines = path.read_text().splitlines(keepends=True)
    lines[4] = lines[4].replace('"user":"cyd"', '"user":"dan"')
    path.write_text("".join(lines))
    bad = CliRunner().invoke(report_command, [str(directory), "--verify"])
    assert bad.exit_code == 1
    assert f"{path}:5: breaks the chain" in bad.output


def test_the_command_refuses_a_bad_window_with_one_line(tmp_path: Path) -> None:
    _write(tmp_path, _small_history()).close()
    result = CliRunner().invoke(report_command, [str(tmp_path), "--from", "yesterday"])
    assert result.exit_code == 2
    assert result.output == (
        "zbroker: --from 'yesterday' is no date or time: give 2026-11-30 or 2026-11-30T08:00Z\n"
    )


def test_every_grant_the_ledger_decided_appears_once_out_and_once_in() -> None:
    """Decisions from ``Ledger.handle`` and ``tick`` (a fake clock), committed in order:
    each grant a client was told of is one ``out`` and, once returned, one ``in``."""
    from zbroker.broker.model import Now, Request

    led = _ledger()
    led.apply(RELOAD)
    log: list[dict[str, Any]] = []
    told: list[int] = []
    clock = [0.0]

    def commit(decided: list[tuple[dict[str, Any], Any]]) -> None:
        for delta, reply in decided:
            records = derive(len(log) + 100, 1, delta, led)
            led.apply(delta)
            settle(records, led)
            log.extend(records)
            grant = reply.get("grant") if isinstance(reply, dict) else None
            if isinstance(grant, dict):
                told.append(int(grant["id"]))

    def now() -> Now:
        return Now(mono=clock[0], wall=T0 + clock[0])

    def ask(op: str, sid: str, req: int, **kw: Any) -> None:
        commit(led.handle(Request(op, sid, req, **kw), now()).decided)

    for k, user in enumerate(("ann", "bob", "cyd")):
        ask("open", f"s{k}", 1, user=user, host="h")
    for round_ in range(6):
        clock[0] += 1.0
        for k in range(3):
            ask("checkout", f"s{k}", 2 + 2 * round_, feature="cad", ack=1 + 2 * round_)
            ask("heartbeat", f"s{k}", 3 + 2 * round_, ack=1 + 2 * round_)
        commit(led.tick(now()).decided)
        for g in sorted(led.grants(), key=lambda g: g.id)[:1]:  # one checkin a round
            session = led.session(g.sid)
            assert session is not None
            ask("checkin", g.sid, 100 + round_, grant=g.id, ack=session.ack)
    ask("checkout", "s2", 300, feature="solver")  # held until its lease lapses
    ask("close", "s0", 200, ack=199)
    clock[0] += 100.0  # every other lease lapses
    commit(led.tick(now()).decided)
    outs = [r["grant"] for r in log if r["ev"] == "out"]
    ins = [r["grant"] for r in log if r["ev"] == "in"]
    assert outs == told and sorted(ins) == sorted(told)
    reasons = {r["reason"] for r in log if r["ev"] == "in"}
    assert {"checkin", "expired"} <= reasons <= {"checkin", "closed", "expired"}
    assert [r["in_use"] for r in log if r["ev"] in ("out", "in")][-1] == 0
    assert any(r["ev"] == "deny" and r["reason"] == "no_seats" for r in log)
    assert led.in_use("cad") == 0


def test_a_restart_from_a_snapshot_past_entries_without_records_is_no_gap(tmp_path: Path) -> None:
    records = [r for r in _run(_history()) if r["ix"] <= 7]
    w = _write(tmp_path, records)
    w.covered(9, T0)  # the node compacted at 9; entries 8 and 9 made no records here
    w.close()
    again = ReportWriter(tmp_path, "alpha")
    again.open()
    again.applied_from(9, [], {}, T0, "snapshot at 9")
    again.close()
    kinds = [line.record["ev"] for line in read_stream(log_files(tmp_path))]
    assert "gap" not in kinds and kinds[-1] == "upto"
    assert verify(log_files(tmp_path)) == []


def test_the_chaos_checks_find_a_missing_record_and_a_grant_the_log_lost(tmp_path: Path) -> None:
    from zbroker.broker.report_check import compare_nodes, match_clients

    a, b = _node_logs(tmp_path)
    assert compare_nodes({"alpha": log_files(a), "beta": log_files(b)}) == []
    records = [line.record for line in read_stream(log_files(a))]
    told = {1: ("cad", 1), 2: ("cad", 1), 3: ("solver", 1), 4: ("cad", 1)}
    assert match_clients(records, told, [1]) == []
    assert match_clients(records, {**told, 9: ("cad", 1)}, [2]) == [
        "grant 9 (cad x1) a client got has no out record",
        "grant 2, checked in by its client, is in as closed",
    ]
    path = log_files(b)[0]
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if '"ix":2,' not in line))
    assert compare_nodes({"alpha": log_files(a), "beta": log_files(b)}) == [
        "node beta lacks record 2/0 that others hold"
    ]
