"""``zbroker report``: the usage tables and charts from one or more nodes' report logs.

The command parses, reads the logs once (``zbroker.broker.reportfile.merge``: several nodes'
logs merged by index, each record once), feeds ``zbroker.broker.report_stats.Report`` and
renders what it found: text on stdout, CSV tables with ``--csv DIR``, PNG charts with
``--png DIR`` (matplotlib, the ``report`` extra, imported only then). ``--verify``
checks each node's hash chain instead and names every line that breaks it.

Exit codes: 0 success (``--verify``: every chain holds); 1 ``--verify`` found a broken
chain, or the logs of several nodes disagree on a record; 2 bad usage or an unreadable
log.
"""

from __future__ import annotations

import csv
import datetime
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from zbroker.broker.lmstat import clean
from zbroker.broker.report_stats import (
    BY,
    NO_GROUP,
    OTHERS,
    UNKNOWN,
    Feature,
    Report,
    ReportSpanError,
)
from zbroker.broker.reportfile import Merged, ReportFileError, merge, stream_files, verify

TOP = 10  # rows of the "by user" tables printed; the CSV has them all


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"zbroker: {message}", err=True)
    sys.exit(code)


def _when(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        _fail(f"{name} {text!r} is no date or time: give 2026-11-30 or 2026-11-30T08:00Z")
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return t.timestamp()


def _groups(options: str | None) -> dict[str, list[str]]:
    """user -> the GROUPs of the options file that list it."""
    if options is None:
        return {}
    from zbroker.broker.license import LicenseError
    from zbroker.broker.options import load_options

    try:
        opts = load_options(options)
    except LicenseError as exc:
        _fail(str(exc))
    out: dict[str, list[str]] = {}
    for name, members in opts.groups:
        for user in members:
            out.setdefault(user, []).append(name)
    return out


@click.command()
@click.argument("logs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--from", "start", metavar="TIME", help="window start, UTC (2026-11-01 or ...T08:00)")
@click.option("--to", "end", metavar="TIME", help="window end, UTC")
@click.option("--feature", "features", multiple=True, help="only this feature (repeatable)")
@click.option("--by", type=click.Choice(BY), default="user", show_default=True,
              help="what seat-hours are counted by")  # fmt: skip
@click.option("--options", "options_path", type=click.Path(dir_okay=False, exists=True),
              help="the options file whose GROUP lines --by group uses")  # fmt: skip
@click.option("--csv", "csv_dir", type=click.Path(file_okay=False, path_type=Path),
              help="write the tables as CSV files into this directory")  # fmt: skip
@click.option("--png", "png_dir", type=click.Path(file_okay=False, path_type=Path),
              help="draw the charts as PNG files into this directory (matplotlib)")  # fmt: skip
@click.option("--verify", is_flag=True, help="check each log's hash chain and name broken lines")
def report(
    logs: tuple[Path, ...],
    start: str | None,
    end: str | None,
    features: tuple[str, ...],
    by: str,
    options_path: str | None,
    csv_dir: Path | None,
    png_dir: Path | None,
    verify: bool,
) -> None:
    """Usage from report logs: LOG is a node's report_log directory or one of its files;
    give several nodes' to merge them by log index (docs/reportlog.md)."""
    try:
        streams = [stream_files(p) for p in logs]
    except ReportFileError as exc:
        _fail(str(exc))
    if verify:
        sys.exit(_verify(streams))
    if by == "group" and options_path is None:
        _fail("--by group needs --options FILE: the options file's GROUP lines")
    lo, hi = _when(start, "--from"), _when(end, "--to")
    if lo is not None and hi is not None and hi <= lo:
        _fail(f"--to {end} is not after --from {start}: the window would be empty")
    rep = Report(
        start=lo,
        end=hi,
        features=frozenset(features) or None,
        by=by,
        groups=_groups(options_path),
    )
    merged = Merged()
    line = None
    try:
        for k, line in enumerate(merge(streams, merged)):
            if k == 0:
                for header in merged.headers:  # what was so when the logs begin
                    rep.header(header.record)
            rep.add(line.record)
        rep.finish()
    except ReportFileError as exc:
        _fail(str(exc))
    except ReportSpanError as exc:  # the record that stretched the span too far, if any
        _fail(f"{line.path}:{line.number}: {exc}" if line is not None else str(exc))
    if rep.outside_log():
        _fail(f"the log has no records in the window {_t(rep.start)} to {_t(rep.end)}: "
              f"its records run from {_t(rep.first_at)} to {_t(rep.clock)}")  # fmt: skip
    click.echo(render(rep, merged, logs))
    for flag, directory, write in (("--csv", csv_dir, write_csv), ("--png", png_dir, draw)):
        if directory is not None:
            try:
                write(rep, directory)
            except OSError as exc:
                where = exc.filename or directory
                _fail(f"{flag} {directory}: cannot write {where}: {exc.strerror or exc}")
    if merged.conflicts or merged.missing_count:
        sys.exit(1)


def _where(files: Sequence[Path]) -> Path:
    """How a node's log is named: its directory, or its one file as given."""
    return files[0].parent if len(files) > 1 else files[0]


def _verify(streams: Sequence[Sequence[Path]]) -> int:
    bad = 0
    for files in streams:
        findings = verify(files)
        where = _where(files)
        if not findings:
            click.echo(f"{where}: {len(files)} file(s), the hash chain holds")
        for finding in findings:
            click.echo(str(finding))
        bad += len(findings)
    return 1 if bad else 0


# --- text --------------------------------------------------------------------------------


def _t(t: float | None) -> str:
    if t is None or not math.isfinite(t):
        return "-"
    return datetime.datetime.fromtimestamp(t, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _span(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _hours(seat_seconds: float) -> str:
    return f"{seat_seconds / 3600:.2f}"


def _name(text: Any) -> str:
    """Text from the log as printed: a client chose it (a user, host, feature...), and a
    control character in it must not reach the terminal (``\\x1b]0;...`` sets its title)."""
    return text if text in (UNKNOWN, NO_GROUP, OTHERS) else clean(text)


def _words(text: Any) -> str:
    """Text from the log that is a phrase (a gap's why): each word through ``clean``."""
    return " ".join(clean(word) for word in str(text).split())


def render(rep: Report, merged: Merged, names: Sequence[Path] = ()) -> str:
    """The text report; ``names``: each merged log's, as ``merged.spans`` orders them."""
    lo, hi = rep.window()
    primaries = f" ({_counts(rep.primaries)})" if rep.primaries else ""
    out = [
        f"report log: {rep.records} records, {_t(lo)} to {_t(hi)}; {rep.terms} terms"
        f"{primaries}, {rep.rereads} rereads"
    ]
    if rep.estimated:
        out.append(
            f"  {rep.estimated} records carry no wall time of their own (checkins, denials, "
            "expiries: docs/reportlog.md) and count at the time of the record before them"
        )
    for line in merged.gaps:
        r = line.record
        out.append(
            f"  gap in {line.path}: indexes {r.get('from')}-{r.get('to')} ({_words(r.get('why'))})"
        )
    for a, b in merged.conflicts:
        out.append(f"  DISAGREE: {a.path}:{a.number} and {b.path}:{b.number} (same index)")
    out += _coverage(merged, names)
    if rep.unknown:
        out.append(f"  deltas of kinds this schema does not know: {_counts(rep.unknown)}")
    for name in sorted(rep.features):
        if name == UNKNOWN:
            continue
        out += _feature_text(rep, rep.features[name])
    unknown = rep.features.get(UNKNOWN)
    if unknown is not None and unknown.denials:
        out.append("")
        out.append(
            f"denials whose feature the log does not record: {sum(unknown.denials.values())}"
        )
        out.append("  by reason: " + _counts(unknown.denials))
        out.append("  by user:   " + _counts(unknown.denied_users))
    idle = sum(sum(f.idle.values()) for f in rep.features.values())
    out.append("")
    out.append(
        f"seats held by sessions that were idle: {_hours(idle)} seat-hours"
        + ("" if idle else " (no session held seats while marked idle)")
    )
    return "\n".join(out)


def _coverage(merged: Merged, names: Sequence[Path]) -> list[str]:
    """Several nodes' logs: how many records each holds and over which indexes, when they
    differ, and each record one lacks inside its own span (a deleted line: exit 1). A log
    that starts later or ends sooner lacks nothing: retention, or its node was down or
    behind when it was read; but a deleted last line looks the same, so it is said."""
    if len(merged.spans) < 2 or len(names) != len(merged.spans):
        return []
    out = []
    if len(set(merged.counts)) > 1 or len(set(merged.spans)) > 1:
        holed = {k for k, _, _ in merged.missing}
        start = min(first for first, _ in merged.spans)
        end = max(merged.ends)
        for k, name in enumerate(names):
            (first, last), count = merged.spans[k], merged.counts[k]
            notes = []
            if first > start:
                notes.append("starts after the others (retention, or its node began later)")
            if merged.ends[k] < end:
                notes.append("ends before the others: its node down or behind when read, "
                             "or its last lines deleted")  # fmt: skip
            if k in holed:
                notes.append("lacks records that another log holds (below)")
            note = f": {'; '.join(notes)}" if notes else ""
            out.append(f"  {name}: {count} records, indexes {first}-{last}{note}")
    for k, ix, n in merged.missing:
        out.append(
            f"  MISSING: {names[k]} lacks record {ix}/{n} that another log holds, inside its "
            "own span and no gap of its own: a deleted line"
        )
    if merged.missing_count > len(merged.missing):
        out.append(f"  MISSING: ... {merged.missing_count - len(merged.missing)} more")
    return out


def _counts(c: Any, top: int = TOP) -> str:
    items = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{_name(k)} {v}" for k, v in items[:top])
    return text + (f", ... ({len(items) - top} more)" if len(items) > top else "") or "none"


def _end_count(rep: Report, name: str) -> int:
    """The count in force at the window's end (the end of the log when it has none)."""
    return rep.total(name, rep.window()[1])


def _percent(share: float | None) -> float:
    return math.nan if share is None else share * 100


def _feature_text(rep: Report, f: Feature) -> list[str]:
    total = _end_count(rep, f.name)
    util = _percent(f.utilisation())
    head = f"feature {_name(f.name)}: count {total}"
    weighted = f.count_average()
    if weighted is not None and not math.isclose(weighted, total):
        head += f" at the window's end, {weighted:.2f} on average over it (the count changed)"
    out = ["", head]
    out.append(
        f"  peak {f.peak} at {_t(f.peak_at)}; average {f.average():.2f}, p95 {f.p95()} "
        f"(time-weighted); utilisation {util:.1f} %"
    )
    longest = max(f.longest, default=None)
    full = f"  at 100 %: {_span(f.full_seconds)} in {f.full_windows} windows"
    if longest is not None:
        full += f" (longest {_span(longest[0])} from {_t(longest[1])})"
    out.append(full)
    ins = sum(f.checkins.values())
    out.append(f"  checkouts {f.checkouts}, checkins {ins} ({_counts(f.checkins)})")
    if f.linger_ends or f.linger_seconds:
        out.append(
            f"  lingering seats: {sum(f.linger_ends.values())} ended "
            f"({_counts(f.linger_ends)}), {_hours(f.linger_seconds)} seat-hours lingering"
        )
    if f.borrows or f.returns:
        out.append(f"  borrows {f.borrows}, back {sum(f.returns.values())} ({_counts(f.returns)})")
    out.append(f"  denials {sum(f.denials.values())}: {_counts(f.denials)}")
    if f.denied_users:
        out.append(f"  denied users: {_counts(f.denied_users)}")
    p50, p95 = f.wait_quantile(0.5), f.wait_quantile(0.95)
    if p50 is not None and p95 is not None:
        out.append(f"  queue waits: {f.waits_n}, p50 {p50:.2f} s, p95 {p95:.2f} s")
    else:
        out.append("  queue waits: none (no checkout waited, or the log predates `waited`)")
    hours = sorted(f.hours.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{_name(k)} {_hours(v)}" for k, v in hours[:TOP])
    out.append(f"  seat-hours by {rep.by}: {shown or 'none'}")
    if f.idle:
        idle = sorted(f.idle.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{_name(k)} {_hours(v)}" for k, v in idle[:TOP])
        out.append(f"  seat-hours held while idle: {_hours(sum(f.idle.values()))} ({shown})")
    out += _over_time(rep, f)
    return out


def _over_time(rep: Report, f: Feature, rows: int = 12) -> list[str]:
    """Use over time in at most ``rows`` rows: the buckets added up, each row held against
    the count in force during it."""
    keys = sorted(k for k, row in rep.buckets.items() if f.name in row)
    if not keys:
        return []
    per = max(1, math.ceil((keys[-1] - keys[0] + 1) / rows))
    out = [
        f"  use over time ({_span(rep.bucket * per)} a row): start, average (utilisation), "
        "peak, count at its end, denials"
    ]
    for first in range(keys[0], keys[-1] + 1, per):
        bs = [
            rep.buckets[k][f.name]
            for k in range(first, first + per)
            if f.name in rep.buckets.get(k, {})
        ]
        seat_s = sum(b.seat_seconds for b in bs)
        avg = seat_s / max(1e-9, _covered(rep, first * rep.bucket, rep.bucket * per))
        peak = max((b.peak for b in bs), default=0)
        count_s = sum(b.count_seconds for b in bs)
        pct = f" ({seat_s / count_s * 100:.0f} %)" if count_s > 0 else ""
        count = next((b.count for b in reversed(bs) if b.count is not None), 0)
        denials = sum(b.denials for b in bs)
        out.append(
            f"    {_t(first * rep.bucket)}  {avg:8.2f}{pct}  {peak:6d}  {count:6d}  {denials:6d}"
        )
    return out


def _covered(rep: Report, start: float, width: float) -> float:
    """Seconds of [start, start + width) inside the report's window: the first and last
    buckets are partly outside, and their average is over the part inside."""
    lo, hi = rep.window()
    a = start if lo is None else max(start, lo)
    b = start + width if hi is None else min(start + width, hi)
    return b - a


# --- CSV ---------------------------------------------------------------------------------


FORMULA = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may run as a formula


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a client-chosen name (a user, a feature)
    starting like a formula gets a single quote before it (OWASP, "CSV injection"). Our
    own figures never start so: no number the report writes is negative."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA) else value


class _SafeWriter:
    """``csv.writer`` whose every cell goes through ``_cell``."""

    def __init__(self, fh: Any) -> None:
        self._w = csv.writer(fh)

    def writerow(self, row: Sequence[Any]) -> None:
        self._w.writerow([_cell(v) for v in row])


def write_csv(rep: Report, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(rep.features)
    with (directory / "features.csv").open("w", newline="") as fh:
        w = _SafeWriter(fh)
        w.writerow(["feature", "count", "peak", "peak_at", "average", "p95", "utilisation",
                    "seconds_at_100", "windows_at_100", "checkouts", "checkins", "denials",
                    "wait_p50", "wait_p95", "queued", "borrows", "linger_seat_hours",
                    "idle_seat_hours"])  # fmt: skip
        for name in names:
            f = rep.features[name]
            util = f.utilisation()
            w.writerow([name, _end_count(rep, name), f.peak, _t(f.peak_at), f"{f.average():.4f}",
                        f.p95(), "" if util is None else f"{util:.4f}", f"{f.full_seconds:.1f}",
                        f.full_windows, f.checkouts, sum(f.checkins.values()),
                        sum(f.denials.values()), f.wait_quantile(0.5) or "",
                        f.wait_quantile(0.95) or "", f.queued, f.borrows,
                        f"{f.linger_seconds / 3600:.6f}",
                        f"{sum(f.idle.values()) / 3600:.6f}"])  # fmt: skip
    with (directory / "use_over_time.csv").open("w", newline="") as fh:
        w = _SafeWriter(fh)
        w.writerow(["start", "seconds", "feature", "average", "peak", "count", "denials",
                    "utilisation"])  # fmt: skip
        for k in sorted(rep.buckets):
            for name, b in sorted(rep.buckets[k].items()):
                t = k * rep.bucket
                covered = max(1e-9, _covered(rep, t, rep.bucket))
                util = b.utilisation()
                w.writerow([_t(t), rep.bucket, name, f"{b.seat_seconds / covered:.4f}", b.peak,
                            rep.total(name, t) if b.count is None else b.count, b.denials,
                            "" if util is None else f"{util:.4f}"])  # fmt: skip
    with (directory / "denials.csv").open("w", newline="") as fh:
        w = _SafeWriter(fh)
        w.writerow(["feature", "kind", "name", "denials"])
        for name in names:
            f = rep.features[name]
            for reason, n in sorted(f.denials.items()):
                w.writerow([name, "reason", reason, n])
            for user, n in sorted(f.denied_users.items()):
                w.writerow([name, "user", user, n])
    with (directory / f"hours_by_{rep.by}.csv").open("w", newline="") as fh:
        w = _SafeWriter(fh)
        w.writerow(["feature", rep.by, "seat_hours"])
        for name in names:
            for key, v in sorted(rep.features[name].hours.items()):
                w.writerow([name, key, f"{v / 3600:.6f}"])
    with (directory / "idle_hours.csv").open("w", newline="") as fh:
        w = _SafeWriter(fh)
        w.writerow(["feature", "user", "seat_hours_idle"])
        for name in names:
            for key, v in sorted(rep.features[name].idle.items()):
                w.writerow([name, key, f"{v / 3600:.6f}"])


# --- charts ------------------------------------------------------------------------------


def draw(rep: Report, directory: Path) -> list[Path]:
    """use_over_time.png (per feature, against its count, denials marked) and
    use_by_<by>.png (seat-hours per bucket, stacked by user/host/project/group)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError:
        _fail("--png needs matplotlib: pip install 'zbroker[report]'")
    directory.mkdir(parents=True, exist_ok=True)
    names = [n for n in sorted(rep.features) if n != UNKNOWN]
    keys = sorted(rep.buckets)
    width = rep.bucket
    when = [datetime.datetime.fromtimestamp(k * width, tz=datetime.UTC) for k in keys]
    fig, axes = plt.subplots(max(1, len(names)), 1, figsize=(10, 2.6 * max(1, len(names))),
                             sharex=True, squeeze=False)  # fmt: skip
    for ax, name in zip(axes[:, 0], names, strict=False):
        rows = [rep.buckets[k].get(name) for k in keys]
        avg = [
            b.seat_seconds / max(1e-9, _covered(rep, k * width, width)) if b else 0.0
            for k, b in zip(keys, rows, strict=True)
        ]
        peak = [b.peak if b else 0 for b in rows]
        count = [rep.total(name, k * width) if b is None or b.count is None else b.count
                 for k, b in zip(keys, rows, strict=True)]  # fmt: skip
        ax.step(when, peak, where="post", color="tab:orange", lw=0.8, label="peak")
        ax.step(when, avg, where="post", color="tab:blue", label="average in use")
        ax.step(when, count, where="post", color="black", ls="--", lw=1, label="count")
        denied = [(t, c) for t, b, c in zip(when, rows, count, strict=True) if b and b.denials]
        if denied:
            ax.scatter([t for t, _ in denied], [c for _, c in denied], marker="v", color="red",
                       zorder=3, label="denials")  # fmt: skip
        ax.set_title(f"{name}: seats in use against the count")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left", fontsize=7)
    fig.autofmt_xdate()
    fig.tight_layout()
    paths = [directory / "use_over_time.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    totals: dict[str, float] = {}
    for shares in rep.stack.values():
        for who, v in shares.items():
            totals[who] = totals.get(who, 0.0) + v
    top = [w for w, _ in sorted(totals.items(), key=lambda kv: -kv[1]) if w != OTHERS][:8]
    fig, ax = plt.subplots(figsize=(10, 4))
    keys = sorted(rep.stack)
    when = [datetime.datetime.fromtimestamp(k * width, tz=datetime.UTC) for k in keys]
    stacked = [rep.stack[k] for k in keys]
    series = [[row.get(who, 0.0) / 3600 for row in stacked] for who in top]
    rest = [sum(v for w, v in row.items() if w not in top) / 3600 for row in stacked]
    if any(rest):
        series.append(rest)
        top = [*top, OTHERS]
    if series:
        ax.stackplot(mdates.date2num(when), series, labels=top, step="post")
        ax.xaxis_date()
        ax.legend(loc="upper left", fontsize=7)
    ax.set_title(f"seat-hours per {_span(width)} by {rep.by}")
    fig.autofmt_xdate()
    fig.tight_layout()
    paths.append(directory / f"use_by_{rep.by}.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths
