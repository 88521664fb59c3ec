"""Availability from a history: unavailable windows, failover and recovery times, liveness.

A *definite answer* (``ok`` or ``denied``) comes only from a serving primary, so the
gaps between consecutive definite answers longer than ``min_window`` are the windows in
which no checkout could be granted; the faults in progress during a gap are its cause.

A *failover* is measured from each kill or pause of the node that was primary, when it
left two nodes up, to the completion of the first ok checkout *invoked after it* (a
reply the old primary sent just before dying does not count). A *recovery* is measured
the same way from the action that brought a second node back (two or three nodes had
been down). SPEC 5.4 (liveness) asks failovers to stay within ``liveness_limit``; every
fault must also end with the triad healed, as the nemesis recorded. When the run was
interrupted, the fault in progress then is left out: its end is the interruption's.
"""

from __future__ import annotations

import itertools

from zbroker.clients.testing.chaos.history import Fault, History
from zbroker.clients.testing.chaos.verdict import CheckOptions, Finding, Report, Timed, Window


def check_availability(history: History, report: Report, opts: CheckOptions) -> None:
    served = sorted(
        op.complete_t
        for op in history.ops.values()
        if op.status in ("ok", "denied") and op.complete_t is not None
    )
    end = history.phase_time("hold") or history.last_t or report.t0
    points = [t for t in served if t <= end]
    for a, b in itertools.pairwise(points):
        if b - a > opts.min_window:
            report.windows.append(Window(a, b, _causes(history.faults, a, b)))
    if points and end - points[-1] > opts.min_window:
        report.windows.append(Window(points[-1], end, _causes(history.faults, points[-1], end)))
    oks = sorted(
        (op.invoke_t, op.complete_t, op.id)
        for op in history.ops.values()
        if op.op == "checkout" and op.status == "ok" and op.complete_t is not None
    )
    cut = history.phase_time("interrupted")
    # The fault in progress when a run was interrupted is not judged: its end is ours.
    faults = [f for f in history.faults if cut is None or (f.end is not None and f.end < cut)]
    for fault in faults:
        _timings(fault, oks, report)
    for fault in faults:
        if fault.end is None:
            report.violations.append(
                Finding(
                    "liveness",
                    f"fault {fault.id} ({fault.kind}) never ended: the run stopped inside it",
                    (f"line {fault.line}",),
                    fault.start,
                )
            )
        elif fault.healed and fault.detail:
            report.warnings.append(
                Finding(
                    "liveness",
                    f"fault {fault.id} ({fault.kind}) healed, but: {fault.detail}",
                    (f"line {fault.line}",),
                    fault.end,
                )
            )
        elif fault.healed is False:
            report.violations.append(
                Finding(
                    "liveness",
                    f"fault {fault.id} ({fault.kind}): the triad did not heal: {fault.detail}",
                    (f"line {fault.line}",),
                    fault.end,
                )
            )
    if opts.liveness_limit <= 0:
        return
    for f in report.failovers:
        if f.seconds is None or f.seconds > opts.liveness_limit:
            if f.seconds is None:
                took = "no checkout was served afterwards"
            else:
                took = f"the next checkout was served {f.seconds:.3f} s later"
            report.violations.append(
                Finding(
                    "liveness",
                    f"fault {f.fault} ({f.kind}): {f.action} of primary {f.node} at "
                    f"+{f.t - report.t0:.3f} s left two nodes up, and {took} "
                    f"(limit {opts.liveness_limit:.2f} s)",
                    (f.op,) if f.op else (),
                    f.t,
                )
            )


def _causes(faults: list[Fault], a: float, b: float) -> tuple[str, ...]:
    out = []
    for f in faults:
        end = f.end if f.end is not None else float("inf")
        if f.start <= b and end >= a:
            out.append(f"{f.kind} #{f.id}" + (f" ({', '.join(f.nodes)})" if f.nodes else ""))
    return tuple(out) or ("no fault",)


def _timings(
    fault: Fault,
    oks: list[tuple[float, float, str]],
    report: Report,
) -> None:
    """Failovers (primary killed or paused, two nodes left) and recoveries (quorum back)."""
    up = 3  # every fault starts from a whole triad (the nemesis waits for it)
    actions = fault.actions
    for i, a in enumerate(actions):
        before = up
        if a.action in ("kill", "pause"):
            up -= 1
        elif a.action in ("start", "resume"):
            up += 1
        if a.action in ("kill", "pause") and a.role == "primary" and up >= 2:
            timed = _next_ok(fault, a.node, a.action, a.t, oks)
            served = a.t + timed.seconds if timed.seconds is not None else float("inf")
            # Another node going down before a checkout was served (kill-two, kill-all)
            # took the quorum away: no failover was due.
            if not any(b.action in ("kill", "pause") and b.t <= served for b in actions[i + 1 :]):
                report.failovers.append(timed)
        elif a.action in ("start", "resume") and before < 2 <= up:
            report.recoveries.append(_next_ok(fault, a.node, a.action, a.t, oks))
        elif a.action == "isolate" and a.role == "primary" and up == 3:
            # Cut off from both backups: they are a connected majority, a failover is due.
            report.failovers.append(_next_ok(fault, a.node, a.action, a.t, oks))


def _next_ok(
    fault: Fault, node: str, action: str, t: float, oks: list[tuple[float, float, str]]
) -> Timed:
    best: tuple[float, str] | None = None
    for invoked, completed, op_id in oks:
        if invoked >= t and (best is None or completed < best[0]):
            best = (completed, op_id)
        if best is not None and invoked > best[0]:
            break  # sorted by invocation, and none completes before it was invoked
    if best is None:
        return Timed(fault.id, fault.kind, node, action, t, None, None)
    return Timed(fault.id, fault.kind, node, action, t, best[0] - t, best[1])
