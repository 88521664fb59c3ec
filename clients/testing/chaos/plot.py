"""A chaos run's timeline as a PNG: what an administrator reads faster than a table.

Three panels over the run's time (seconds from its start):

1. seats held per feature, as clients were sure to hold them (the checker's hold
   intervals), with each feature's total dashed and the triad's own sampled ``in_use``
   as dots;
2. the nodes: which one was primary (from the status samples), which were down, the
   faults as labelled bands and the unavailable windows in red;
3. operation outcomes per second: ok, denied, unavailable, unknown.

matplotlib is optional (the ``testing`` extra): it is imported only here, when a picture
is asked for, and its absence is a ``PlotUnavailable`` the command reports and skips.
"""

from __future__ import annotations

import importlib
import itertools
from collections import defaultdict
from pathlib import Path
from typing import Any

from zbroker.clients.testing.chaos.checker import hold_intervals
from zbroker.clients.testing.chaos.history import History
from zbroker.clients.testing.chaos.verdict import Report

OUTCOME_COLOURS = {
    "ok": "tab:green",
    "denied": "tab:orange",
    "unavailable": "tab:red",
    "unknown": "tab:purple",
    "error": "black",
}
ROLE_COLOURS = {"primary": "tab:blue", "backup": "lightsteelblue", "down": "lightgrey"}
FAULT_COLOURS = ["gold", "orchid", "lightgreen", "sandybrown", "paleturquoise", "pink", "khaki"]
LABELLED_FAULTS = 20  # beyond this many, names would overlap: a legend by colour instead


class PlotUnavailable(Exception):
    """matplotlib is not installed; the message says how to get it."""


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise PlotUnavailable(
            "matplotlib is not installed: pip install 'zbroker[testing]' (or matplotlib) "
            "for the timeline picture"
        ) from None
    matplotlib.use("Agg")  # no display needed: the picture goes to a file
    return importlib.import_module("matplotlib.pyplot")


def plot_timeline(history: History, report: Report, path: Path) -> Path:
    plt = _pyplot()
    t0 = report.t0
    end = (history.last_t or t0) - t0
    fig, (seats, nodes, ops) = plt.subplots(
        3, 1, figsize=(14, 9), sharex=True, gridspec_kw={"height_ratios": [3, 2, 2]}
    )
    _seats(seats, history, t0)
    _nodes(nodes, history, report, t0)
    _outcomes(ops, history, t0)
    ops.set_xlabel("seconds since the start of the run")
    ops.set_xlim(0, max(end, 1.0))
    verdict = "CLEAN" if report.ok else "VIOLATED: " + ", ".join(report.broken())
    seed = (history.meta or {}).get("seed", "?")
    fig.suptitle(f"zbroker chaos run (seed {seed}): {verdict}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _seats(ax: Any, history: History, t0: float) -> None:
    deltas: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for hold in hold_intervals(history):
        deltas[hold.grant.feature].append((hold.start - t0, hold.grant.count))
        if hold.end is not None:
            deltas[hold.grant.feature].append((hold.end - t0, -hold.grant.count))
    colours = {}
    top = 1
    for i, (feature, total) in enumerate(sorted(history.features.items())):
        events = sorted(deltas.get(feature, []))
        if not events:
            continue
        xs, ys, level = [0.0], [0], 0
        for t, d in events:
            level += d
            xs.append(t)
            ys.append(level)
        colour = f"C{i}"
        colours[feature] = colour
        ax.step(xs, ys, where="post", color=colour, label=f"{feature} held by clients")
        top = max(top, *ys)
        if max(ys) * 2 >= total:  # a total far above the use would flatten the others
            ax.axhline(total, color=colour, linestyle="--", linewidth=0.8)
            top = max(top, total)
    for feature, colour in colours.items():
        points = [
            (float(s["t"]) - t0, int(s["in_use"][feature]))
            for s in history.samples
            if feature in (s.get("in_use") or {})
        ]
        if points:
            ax.scatter(*zip(*points, strict=True), s=4, color=colour, alpha=0.5)
    ax.set_ylim(0, top * 1.1)
    ax.set_ylabel("seats (dashed: total)")
    ax.legend(loc="upper right", fontsize="small")


def _nodes(ax: Any, history: History, report: Report, t0: float) -> None:
    names: list[str] = list((history.meta or {}).get("nodes") or [])
    for lane, name in enumerate(names):
        spans = _role_spans(history, name, t0)
        for role, colour in ROLE_COLOURS.items():
            bars = [(a, b - a) for r, a, b in spans if r == role]
            if bars:
                ax.broken_barh(bars, (lane - 0.3, 0.6), color=colour, zorder=2)
    labelled = len(history.faults) <= LABELLED_FAULTS
    kinds: dict[str, str] = {}
    for fault in history.faults:
        a = fault.start - t0
        b = (fault.end if fault.end is not None else history.last_t or fault.start) - t0
        colour = kinds.setdefault(fault.kind, FAULT_COLOURS[len(kinds) % len(FAULT_COLOURS)])
        ax.axvspan(a, b, color=colour, alpha=0.35, zorder=0, linewidth=0)
        if labelled:
            ax.text(a, len(names) - 0.6, fault.kind, fontsize=6, rotation=90, va="bottom")
        for action in fault.actions:
            if action.node in names:
                lane = names.index(action.node)
                ax.plot(action.t - t0, lane, marker="x", color="black", zorder=3)
    for w in report.windows:
        ax.axvspan(w.start - t0, w.end - t0, ymin=0, ymax=0.06, color="red", zorder=3)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(-0.6, len(names) + 0.6)
    if not labelled:  # too many faults to name each: a colour per kind instead
        patches = importlib.import_module("matplotlib.patches")
        handles = [patches.Patch(color=c, alpha=0.35, label=k) for k, c in kinds.items()]
        ax.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize="x-small")
    ax.set_ylabel("nodes: primary (blue),\nbackup, down (grey);\nfaults (bands), no service (red)")


def _role_spans(history: History, name: str, t0: float) -> list[tuple[str, float, float]]:
    spans: list[tuple[str, float, float]] = []
    for a, b in itertools.pairwise(history.samples):
        if "roles" not in a or not a["roles"]:
            continue
        role = "primary" if a.get("primary") == name else a["roles"].get(name, "down")
        role = role if role in ROLE_COLOURS else "down"
        start, stop = float(a["t"]) - t0, float(b["t"]) - t0
        if spans and spans[-1][0] == role and abs(spans[-1][2] - start) < 1e-9:
            spans[-1] = (role, spans[-1][1], stop)
        else:
            spans.append((role, start, stop))
    return spans


def _outcomes(ax: Any, history: History, t0: float) -> None:
    per_second: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for op in history.ops.values():
        if op.complete_t is None or op.status is None:
            continue
        per_second[op.status][int(op.complete_t - t0)] += 1
    last = int((history.last_t or t0) - t0)
    for status, colour in OUTCOME_COLOURS.items():
        counts = per_second.get(status)
        if not counts:
            continue
        xs = list(range(last + 1))
        ys = [counts.get(x, 0) for x in xs]
        ax.step(xs, ys, where="post", color=colour, label=status, linewidth=0.9)
    ax.set_yscale("symlog")
    ax.set_ylabel("operations / s")
    ax.legend(loc="upper right", fontsize="small", ncol=5)
