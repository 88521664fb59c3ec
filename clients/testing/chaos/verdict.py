"""What a check found: the findings, the figures, and how they are shown to a person.

``checker.check`` fills a ``Report``; ``render`` turns it into the text the chaos command
prints, ``figures`` into numbers a test or a summary file can use. A finding names the
invariant it breaks (or warns about) and points at the operations concerned, as
``<op id> (<op>, line <invocation>/<completion>)`` in the history file.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from zbroker.clients.testing.chaos.history import History

INVARIANTS = (
    "history",
    "no-over-allocation",
    "no-lost-grant",
    "exactly-once",
    "convergence",
    "liveness",
    "report-log",  # issue 13: the nodes' report logs against each other and the clients
    "cut-off-primary",  # issue 16: a primary cut off from both backups grants nothing
)
MAX_POINTERS = 12  # operations listed per finding: enough to start looking, not a dump


@dataclass(frozen=True)
class CheckOptions:
    liveness_limit: float = 1.0  # SPEC 5.4; 0 turns the liveness check off
    min_window: float = 0.25  # gaps between definite answers shorter than this are load


@dataclass(frozen=True)
class Finding:
    invariant: str
    message: str
    where: tuple[str, ...] = ()  # the operations (and history lines) concerned
    t: float | None = None


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    causes: tuple[str, ...]

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Timed:
    """A failover or a recovery: from an action to the next ok checkout invoked after it."""

    fault: int
    kind: str
    node: str
    action: str
    t: float
    seconds: float | None  # None: no ok checkout followed
    op: str | None


@dataclass
class Report:
    violations: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    counts: dict[str, Counter[str]] = field(default_factory=dict)  # op -> status -> n
    faults: Counter[str] = field(default_factory=Counter)
    peaks: dict[str, tuple[int, int]] = field(default_factory=dict)  # feature -> (peak, total)
    windows: list[Window] = field(default_factory=list)
    failovers: list[Timed] = field(default_factory=list)
    recoveries: list[Timed] = field(default_factory=list)
    lost_notices: int = 0
    options: CheckOptions = field(default_factory=CheckOptions)
    t0: float = 0.0
    span: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    def broken(self) -> list[str]:
        return [inv for inv in INVARIANTS if any(v.invariant == inv for v in self.violations)]


def render(report: Report, history: History, name: str = "history") -> str:
    t0 = report.t0
    meta = history.meta or {}
    lines = [f"zbroker chaos check of {name}"]
    ops = sum(sum(c.values()) for c in report.counts.values())
    lines.append(
        f"  run: {report.span:.1f} s, seed {meta.get('seed', '?')}, "
        f"{len(history.sessions)} session(s), {ops} operation(s)"
    )
    for op, counts in sorted(report.counts.items()):
        lines.append(f"    {op}: " + ", ".join(f"{s} {n}" for s, n in sorted(counts.items())))
    lines.append(
        "  faults: " + (", ".join(f"{k} {n}" for k, n in sorted(report.faults.items())) or "none")
    )
    lines.append(
        "  seats (peak held by clients / total): "
        + ", ".join(f"{f} {p}/{t}" for f, (p, t) in sorted(report.peaks.items()))
    )
    lines.append(f"  lease-lost notices: {report.lost_notices}")
    kills = [f for f in report.failovers if f.action == "kill"]
    pauses = [f for f in report.failovers if f.action == "pause"]
    lines += [
        "  " + _distribution("failover, primary killed -> next ok checkout", kills, t0),
        "  " + _distribution("failover, primary paused -> next ok checkout", pauses, t0),
        "  " + _distribution("recovery, quorum back -> next ok checkout", report.recoveries, t0),
    ]
    total = sum(w.seconds for w in report.windows)
    lines.append(
        f"  unavailable windows (no definite answer for > {report.options.min_window:.2f} s): "
        f"{len(report.windows)}, {total:.1f} s in all"
    )
    for w in sorted(report.windows, key=lambda w: -w.seconds)[:10]:
        lines.append(
            f"    +{w.start - t0:8.3f} .. +{w.end - t0:8.3f} s  {w.seconds:6.3f} s  "
            + ", ".join(w.causes)
        )
    if report.warnings:
        lines.append(f"  warnings ({len(report.warnings)}):")
        for warning in report.warnings[:20]:
            lines.extend(_finding(warning, t0))
    if report.ok:
        lines.append("VERDICT: CLEAN - no invariant broke")
    else:
        lines.append(
            f"VERDICT: VIOLATED - {len(report.violations)} violation(s) of "
            + ", ".join(report.broken())
        )
        for v in report.violations[:50]:
            lines.extend(_finding(v, t0))
    return "\n".join(lines)


def _finding(f: Finding, t0: float) -> list[str]:
    at = f" (+{f.t - t0:.3f} s)" if f.t is not None else ""
    out = [f"  [{f.invariant}]{at} {f.message}"]
    out.extend(f"      {w}" for w in f.where)
    return out


def _distribution(title: str, timed: list[Timed], t0: float) -> str:
    values = [t.seconds for t in timed if t.seconds is not None]
    missing = len(timed) - len(values)
    if not values:
        return f"{title}: none measured" + (f" ({missing} never served)" if missing else "")
    worst = max((t for t in timed if t.seconds is not None), key=lambda t: t.seconds or 0.0)
    text = (
        f"{title}: n={len(values)}, median {statistics.median(values):.3f} s, "
        f"p90 {_quantile(values, 0.9):.3f} s, worst {max(values):.3f} s "
        f"(fault {worst.fault} {worst.kind}, {worst.node}, +{worst.t - t0:.1f} s)"
    )
    return text + (f", {missing} never served" if missing else "")


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figures(report: Report) -> dict[str, Any]:
    """The headline numbers, for a test or a JSON summary."""
    return {
        "ok": report.ok,
        "violations": len(report.violations),
        "warnings": len(report.warnings),
        "faults": dict(report.faults),
        "failover": _summary(report.failovers),
        "failover_after_kill": _summary([f for f in report.failovers if f.action == "kill"]),
        "failover_after_pause": _summary([f for f in report.failovers if f.action == "pause"]),
        "recovery": _summary(report.recoveries),
        "windows": len(report.windows),
        "peaks": {f: list(p) for f, p in report.peaks.items()},
        "operations": {op: dict(c) for op, c in report.counts.items()},
    }


def _summary(timed: list[Timed]) -> dict[str, Any]:
    values = [t.seconds for t in timed if t.seconds is not None]
    return {
        "n": len(timed),
        "never_served": len(timed) - len(values),
        "median": statistics.median(values) if values else None,
        "p90": _quantile(values, 0.9) if values else None,
        "worst": max(values) if values else None,
    }
