"""Decide, from a chaos run's history, whether SPEC section 5's invariants held.

Theory of operation. The checker believes what clients were *told* (``ok``, ``denied``,
``unavailable``) and nothing else; the triad's own word is used only where the
invariant is about the triad's ledger (a grant the client holds must be on it; the
three ledgers must agree). Outcomes split as Jepsen splits them:

- definite (``ok``, ``denied``, ``unavailable``): the operation did exactly that;
- unknown (``unknown``, or no completion at all): it may or may not have acted. An
  unknown checkout is never counted as holding seats (the client was not told it holds
  any, and the library checks back in whatever it turns out to have got); a seat on the
  ledger that only an unknown operation can explain is reported as a warning, never a
  violation.

A client *holds* a grant from the completion of its ok checkout until it invokes the
checkin, or until ``on_lost`` told it the lease lapsed: the shortest interval it can
be sure of, so that an over-allocation found is certain.

The checks:

- **no over-allocation**: sweeping the hold intervals in time order, the seats held per
  feature never exceed the feature's total (from the meta record); the triad's own
  sampled ``in_use`` never exceeds it either;
- **no lost grant**: a checkin of a grant still held (no ``on_lost`` before it) is never
  denied; every grant held when the final status was taken is on the primary's ledger
  under the same session, feature and count, and its final checkin is accepted;
- **exactly once**: no grant id acknowledged to two operations; no request id
  (``sid``/``req``, when recorded) with two different answers; no seat on the final
  ledger that no operation accounts for (one that an unknown outcome or a lapsed lease
  can explain is a warning);
- **convergence**: in the final status every node answers, exactly one is primary, and
  all report the same commit index and the same features and holders;
- **liveness** (SPEC's invariant 4): after each kill or pause of the primary that left
  two nodes up, an ok checkout (invoked after the fault) completes within
  ``liveness_limit``; every fault ends with the triad healed;
- **a cut-off primary grants nothing** (SPEC section 4: it stops granting after
  ``peer_timeout`` without a quorum): the clients' operations do not say which node
  answered them, so the nemesis asks the cut-off node itself (``probe`` actions: a
  session and one checkout sent to that node alone, from a host the cut spares) and
  records the time the request was first sent and what the node answered; a ``probe``
  sent later than the ``isolate`` of a primary plus ``peer_timeout`` (meta) that was
  answered ``ok`` is a violation. A cut-off primary's grant would also surface in the
  other checks (a grant the final ledger does not have), but only if a client still
  held it then. An isolated primary also owes a failover, timed like a kill's.

Liveness and the availability figures (unavailable windows, failover and recovery
times) are availability.py's; the report's types and its rendering are verdict.py's.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from zbroker.clients.testing.chaos.availability import check_availability
from zbroker.clients.testing.chaos.history import GrantInfo, History, Op
from zbroker.clients.testing.chaos.verdict import MAX_POINTERS, CheckOptions, Finding, Report


@dataclass(frozen=True)
class Hold:
    """Seats a client was sure to hold: from the ok checkout to checkin/on_lost."""

    checkout: Op
    grant: GrantInfo
    start: float
    end: float | None  # None: still held when the history ends
    ended_by: str  # "checkin", "lost" or ""
    lost_at: float | None  # when on_lost named it, if it did


# --------------------------------------------------------------------------- the check


def check(history: History, options: CheckOptions | None = None) -> Report:
    opts = options or CheckOptions()
    report = Report(options=opts)
    report.t0 = _t0(history)
    report.span = (history.last_t or report.t0) - report.t0
    _check_history(history, report)
    cut = history.phase_time("interrupted")
    if cut is not None:
        report.warnings.append(
            Finding(
                "history",
                f"the run was interrupted at +{cut - report.t0:.1f} s: no final status, so "
                "the grants held at the end, convergence and the fault in progress are not "
                "judged",
                t=cut,
            )
        )
    holds = hold_intervals(history)
    _count(history, report)
    _over_allocation(history, holds, report)
    _lost_grants(history, holds, report)
    _exactly_once(history, holds, report)
    _convergence(history, report)
    if cut is None:
        _report_logs(history, report)
    _cut_off_primary(history, report)
    check_availability(history, report, opts)
    return report


def _report_logs(history: History, report: Report) -> None:
    """Issue 13: the nodes' report logs agree by index, and hold each checkout and checkin
    a client was told of exactly once (``zbroker.broker.report_check``). Judged only when the run's
    config (meta) names report logs that exist."""
    from zbroker.broker.config import ConfigError, load_config
    from zbroker.broker.report_check import compare_nodes, match_clients
    from zbroker.broker.reportfile import ReportFileError, log_files, read_stream

    path = ((history.meta or {}).get("options") or {}).get("config")
    try:
        config = load_config(path) if path else None
    except (ConfigError, OSError, ValueError):
        config = None
    if config is None:
        return
    dirs = {n.name: n.report_log for n in config.nodes if n.report_log is not None}
    logs = {name: log_files(d) for name, d in dirs.items() if d.is_dir() and log_files(d)}
    if not logs:
        return
    checkouts: dict[int, tuple[str, int]] = {}
    for op in history.ops.values():
        if op.op == "checkout" and op.status == "ok" and op.grant is not None:
            checkouts[op.grant.id] = (op.grant.feature, op.grant.count)
    checkins: list[int] = []
    for op in history.ops.values():
        if op.op != "checkin" or op.status != "ok":
            continue
        got = history.ops.get(op.of) if op.of is not None else None
        gid = (
            op.grant_ref
            if op.grant_ref is not None
            else (got.grant.id if got and got.grant else None)
        )
        if gid is not None:
            checkins.append(gid)
    try:
        problems = compare_nodes(logs)
        merged: dict[tuple[int, int], dict[str, Any]] = {}
        for files in logs.values():
            for line in read_stream(files):
                if "ix" in line.record:
                    merged.setdefault((line.record["ix"], line.record["n"]), line.record)
        problems += match_clients([merged[k] for k in sorted(merged)], checkouts, checkins)
    except (ReportFileError, KeyError, ValueError) as exc:
        problems = [f"the report logs cannot be read: {exc}"]
    for problem in problems:
        report.violations.append(Finding("report-log", problem))


def _cut_off_primary(history: History, report: Report) -> None:
    """No probe sent to an isolated primary after ``peer_timeout`` was granted a seat."""
    peer_timeout = float((history.meta or {}).get("peer_timeout", 0.5))
    for fault in history.faults:
        cut_at: dict[str, float] = {}
        for a in fault.actions:
            if a.action == "isolate" and a.role == "primary":
                cut_at[a.node] = a.t
            elif a.action == "heal":
                cut_at.pop(a.node, None)  # healed: it may be primary again
            elif a.action == "probe" and a.node in cut_at:
                late = a.t - cut_at[a.node] - peer_timeout
                if late > 0 and a.role == "ok":
                    report.violations.append(
                        Finding(
                            "cut-off-primary",
                            f"fault {fault.id} ({fault.kind}): {a.node}, cut off from both "
                            f"backups at +{cut_at[a.node] - report.t0:.3f} s, granted a seat "
                            f"asked for {late:.3f} s after peer_timeout ({peer_timeout} s)",
                            (f"line {fault.line}",),
                            a.t,
                        )
                    )


def _t0(history: History) -> float:
    if history.meta is not None:
        return float(history.meta["t"])
    return history.first_t or 0.0


def _check_history(history: History, report: Report) -> None:
    for error in history.errors:
        report.violations.append(Finding("history", f"damaged history: {error}"))
    if history.meta is None:
        report.violations.append(
            Finding("history", "no meta record: the features' totals are unknown")
        )
    pending = [op for op in history.ops.values() if op.status is None]
    if pending:
        report.warnings.append(
            Finding(
                "history",
                f"{len(pending)} operation(s) never completed (their recorder stopped first): "
                "treated as unknown outcomes",
                tuple(op.where() for op in pending[:MAX_POINTERS]),
            )
        )


def _count(history: History, report: Report) -> None:
    for op in history.ops.values():
        report.counts.setdefault(op.op, Counter())[op.status or "unknown"] += 1
    for fault in history.faults:
        report.faults[fault.kind] += 1
    report.lost_notices = len(history.lost)


# --------------------------------------------------------------------------- holds


def hold_intervals(history: History) -> list[Hold]:
    """Every ok checkout's interval of certain holding (see the module docstring)."""
    checkins: dict[tuple[int, int, int], list[Op]] = defaultdict(list)  # (p, s, grant) ->
    by_of: dict[str, list[Op]] = defaultdict(list)
    for op in history.ops.values():
        if op.op != "checkin":
            continue
        if op.of is not None:
            by_of[op.of].append(op)
        elif op.grant_ref is not None:
            checkins[(op.process, op.session, op.grant_ref)].append(op)
    lost_at: dict[str, float] = {}
    lost_by_id: dict[tuple[int, int, int], float] = {}
    for notice in history.lost:
        for grant, of in zip(notice.grants, notice.of, strict=True):
            if of is not None:
                lost_at.setdefault(of, notice.t)
            lost_by_id.setdefault((notice.process, notice.session, grant.id), notice.t)
    holds = []
    for op in history.ops.values():
        if op.op != "checkout" or op.status != "ok" or op.grant is None:
            continue
        start = op.complete_t if op.complete_t is not None else op.invoke_t
        key = (op.process, op.session, op.grant.id)
        ends: list[tuple[float, str]] = []
        for c in by_of.get(op.id, []) + checkins.get(key, []):
            if c.invoke_t >= start:
                ends.append((c.invoke_t, "checkin"))
        for t in (lost_at.get(op.id), lost_by_id.get(key)):
            if t is not None and t >= start:
                ends.append((t, "lost"))
        lapsed = [t for t, why in ends if why == "lost"]
        end, why = min(ends) if ends else (None, "")
        holds.append(Hold(op, op.grant, start, end, why, min(lapsed) if lapsed else None))
    return holds


def _checkins_of(history: History) -> dict[str, list[Op]]:
    """Checkout op id -> its checkins in invocation order."""
    grants: dict[tuple[int, int, int], str] = {}
    for op in history.ops.values():
        if op.op == "checkout" and op.status == "ok" and op.grant is not None:
            grants[(op.process, op.session, op.grant.id)] = op.id
    out: dict[str, list[Op]] = defaultdict(list)
    for op in history.ops.values():
        if op.op != "checkin":
            continue
        of = op.of
        if of is None and op.grant_ref is not None:
            of = grants.get((op.process, op.session, op.grant_ref))
        if of is not None:
            out[of].append(op)
    return out


# --------------------------------------------------------------------------- invariants


def _over_allocation(history: History, holds: list[Hold], report: Report) -> None:
    totals = history.features
    events: dict[str, list[tuple[float, int, Hold]]] = defaultdict(list)
    for hold in holds:
        feature = hold.grant.feature
        if feature not in totals:
            report.violations.append(
                Finding(
                    "history",
                    f"grant of feature {feature!r}, which the meta record does not list",
                    (hold.checkout.where(),),
                )
            )
            continue
        # Ends sort before starts at the same instant: a seat handed over exactly when it
        # was returned is not counted twice.
        events[feature].append((hold.start, 1, hold))
        if hold.end is not None:
            events[feature].append((hold.end, 0, hold))
    for feature, total in totals.items():
        active: dict[str, Hold] = {}
        held = peak = 0
        breached = False
        for t, is_start, hold in sorted(events.get(feature, []), key=lambda e: (e[0], e[1])):
            if is_start:
                active[hold.checkout.id] = hold
                held += hold.grant.count
            else:
                active.pop(hold.checkout.id, None)
                held -= hold.grant.count
            peak = max(peak, held)
            if held > total and not breached:
                breached = True
                culprits = sorted(active.values(), key=lambda h: h.start)
                report.violations.append(
                    Finding(
                        "no-over-allocation",
                        f"{feature}: clients held {held} seats at +{t - report.t0:.3f} s, "
                        f"more than the {total} the license grants; the grants held then:",
                        tuple(
                            f"{h.checkout.where()} grant {h.grant.id} x{h.grant.count} "
                            f"since +{h.start - report.t0:.3f} s"
                            for h in culprits[:MAX_POINTERS]
                        ),
                        t,
                    )
                )
            elif held <= total:
                breached = False
        report.peaks[feature] = (peak, total)
    over: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for sample in history.samples:
        for feature, in_use in (sample.get("in_use") or {}).items():
            limit = totals.get(feature)
            if limit is not None and int(in_use) > limit:
                over[feature].append((float(sample["t"]), int(in_use)))
    for feature, seen in over.items():
        t, in_use = seen[0]
        report.violations.append(
            Finding(
                "no-over-allocation",
                f"{feature}: the triad itself reported {in_use} seats in use of "
                f"{totals[feature]} at +{t - report.t0:.3f} s ({len(seen)} sample(s) over)",
                t=t,
            )
        )


def _lost_grants(history: History, holds: list[Hold], report: Report) -> None:
    checkins = _checkins_of(history)
    # A checkin denied while the client still held the grant: the triad forgot it.
    for hold in holds:
        for c in checkins.get(hold.checkout.id, []):
            if c.status != "denied" or c.after_lost or c.phase == "final":
                continue  # final check-ins are judged below, with the final status
            if hold.lost_at is not None and hold.lost_at <= c.invoke_t:
                continue  # the lease had lapsed: the triad may rightly have expired it
            report.violations.append(
                Finding(
                    "no-lost-grant",
                    f"grant {hold.grant.id} ({hold.grant.feature} x{hold.grant.count}) was "
                    f"acknowledged, then its checkin was denied ({c.reason}): the triad "
                    "forgot a grant the client held",
                    (hold.checkout.where(), c.where()),
                    c.complete_t,
                )
            )
    final = history.final
    held = held_at_final(history, holds)
    if final is None:
        if held and history.phase_time("interrupted") is None:
            report.violations.append(
                Finding(
                    "no-lost-grant",
                    f"no final status recorded: cannot confirm the {len(held)} grant(s) "
                    "clients still held",
                    tuple(h.checkout.where() for h in held[:MAX_POINTERS]),
                )
            )
        return
    view = _primary_view(final)
    users = {key: user for user, key in history.sessions.items()}
    if view is None:
        if held:
            report.violations.append(
                Finding(
                    "no-lost-grant",
                    f"no primary answered the final status: cannot confirm the {len(held)} "
                    "grant(s) clients still held",
                    tuple(h.checkout.where() for h in held[:MAX_POINTERS]),
                    float(final["t"]),
                )
            )
        return
    ledger = _holders(view)
    for hold in held:
        g = hold.grant
        on = ledger.get(g.id)
        user = users.get(hold.checkout.session_key)
        if on is None:
            report.violations.append(
                Finding(
                    "no-lost-grant",
                    f"grant {g.id} ({g.feature} x{g.count}) is held by a client but is not on "
                    "the primary's ledger in the final status",
                    (hold.checkout.where(),),
                    float(final["t"]),
                )
            )
        elif on != (g.feature, user if user is not None else on[1], g.count):
            report.violations.append(
                Finding(
                    "no-lost-grant",
                    f"grant {g.id} is on the ledger as {on[0]} x{on[2]} of {on[1]!r}, but was "
                    f"acknowledged as {g.feature} x{g.count} to {user!r}",
                    (hold.checkout.where(),),
                    float(final["t"]),
                )
            )
        finals = [c for c in checkins.get(hold.checkout.id, []) if c.phase == "final"]
        if not finals:
            report.warnings.append(
                Finding(
                    "no-lost-grant",
                    f"grant {g.id} was not checked in after the final status",
                    (hold.checkout.where(),),
                )
            )
            continue
        # "unavailable" changed nothing and was tried again: judge the first real answer.
        first = next((c for c in finals if c.status != "unavailable"), finals[-1])
        if first.status == "denied":
            report.violations.append(
                Finding(
                    "no-lost-grant",
                    f"the final checkin of grant {g.id} was denied ({first.reason}): the "
                    "triad no longer held a grant the client held",
                    (hold.checkout.where(), first.where()),
                    first.complete_t,
                )
            )
        elif first.status != "ok":
            report.warnings.append(
                Finding(
                    "no-lost-grant",
                    f"the final checkin of grant {g.id} was not confirmed ({first.status})",
                    (first.where(),),
                )
            )


def held_at_final(history: History, holds: list[Hold]) -> list[Hold]:
    """Grants a client still held when the final status was taken (or the history ended)."""
    final_t = float(history.final["t"]) if history.final is not None else history.last_t
    if final_t is None:
        return []
    checkins = _checkins_of(history)
    out = []
    for hold in holds:
        if hold.start > final_t or (hold.lost_at is not None and hold.lost_at <= final_t):
            continue
        released = any(
            c.invoke_t <= final_t and c.status in ("ok", "denied", "unknown", None)
            for c in checkins.get(hold.checkout.id, [])
        )
        if not released:
            out.append(hold)
    return out


def _exactly_once(history: History, holds: list[Hold], report: Report) -> None:
    by_grant: dict[int, list[Op]] = defaultdict(list)
    for hold in holds:
        by_grant[hold.grant.id].append(hold.checkout)
    for gid, ops in sorted(by_grant.items()):
        if len(ops) > 1:
            report.violations.append(
                Finding(
                    "exactly-once",
                    f"grant id {gid} was acknowledged to {len(ops)} different operations",
                    tuple(op.where() for op in ops[:MAX_POINTERS]),
                    ops[1].complete_t,
                )
            )
    by_req: dict[tuple[str, int], list[Op]] = defaultdict(list)
    for op in history.ops.values():
        if op.sid is not None and op.req is not None and op.status in ("ok", "denied"):
            by_req[(op.sid, op.req)].append(op)
    for (sid, req), ops in by_req.items():
        answers = {_answer(op) for op in ops}
        if len(answers) > 1:
            report.violations.append(
                Finding(
                    "exactly-once",
                    f"request {req} of session {sid} had {len(answers)} different effects: "
                    + "; ".join(sorted(answers)),
                    tuple(op.where() for op in ops[:MAX_POINTERS]),
                    ops[-1].complete_t,
                )
            )
    _orphans(history, holds, report)


def _answer(op: Op) -> str:
    if op.status == "ok":
        return f"ok grant {op.grant.id}" if op.grant is not None else "ok"
    return f"denied {op.reason}"


def _orphans(history: History, holds: list[Hold], report: Report) -> None:
    """Seats on the final ledger that no operation leaves a client holding."""
    if history.final is None:
        return
    view = _primary_view(history.final)
    if view is None:
        return
    held_ids = {h.grant.id for h in held_at_final(history, holds)}
    acked = {h.grant.id: h for h in holds}
    checkins = _checkins_of(history)
    # Per session and feature, how many seats unknown outcomes and lapsed leases can explain.
    explain: Counter[tuple[tuple[int, int], str]] = Counter()
    lost_ids: set[int] = set()
    for op in history.ops.values():
        if op.op == "checkout" and op.status in ("unknown", None) and op.feature is not None:
            explain[(op.session_key, op.feature)] += 1
    for notice in history.lost:
        for g in notice.grants:
            lost_ids.add(g.id)
            # The library checks the seats out again under a new id after an expiry.
            explain[((notice.process, notice.session), g.feature)] += 1
    for gid, (feature, user, count) in sorted(_holders(view).items()):
        if gid in held_ids:
            continue
        session = history.sessions.get(user)
        if session is None:
            report.warnings.append(
                Finding(
                    "exactly-once",
                    f"grant {gid} ({feature} x{count}) on the final ledger belongs to {user!r}, "
                    "not a session of this run",
                )
            )
            continue
        hold = acked.get(gid)
        if hold is not None:
            cins = checkins.get(hold.checkout.id, [])
            if gid in lost_ids or any(c.status in ("unknown", None) for c in cins):
                report.warnings.append(
                    Finding(
                        "exactly-once",
                        f"grant {gid} ({feature}) is still on the ledger after a checkin with "
                        "an unknown outcome or a lapsed lease: the library had not settled it",
                        tuple(op.where() for op in [hold.checkout, *cins][:MAX_POINTERS]),
                    )
                )
                continue
            report.violations.append(
                Finding(
                    "exactly-once",
                    f"grant {gid} ({feature} x{count}) is still on the ledger although its "
                    "checkin was answered: the checkin did not take effect",
                    tuple(op.where() for op in [hold.checkout, *cins][:MAX_POINTERS]),
                    float(history.final["t"]),
                )
            )
            continue
        key = (session, feature)
        if explain[key] > 0:
            explain[key] -= 1
            report.warnings.append(
                Finding(
                    "exactly-once",
                    f"grant {gid} ({feature} x{count}) of {user!r} on the final ledger was never "
                    "acknowledged: a checkout with an unknown outcome (or a re-checkout after "
                    "an expiry) got it and the library had not given it back yet",
                )
            )
            continue
        suspects = [
            op
            for op in history.ops.values()
            if op.session_key == session
            and op.op == "checkout"
            and op.feature == feature
            and op.status in ("denied", "unavailable", "error")
        ]
        report.violations.append(
            Finding(
                "exactly-once",
                f"grant {gid} ({feature} x{count}) of {user!r} is on the final ledger but no "
                "operation of that session accounts for it: a request took effect twice, "
                "or one answered 'nothing changed' did change something. Checkouts of that "
                "session answered without a grant:",
                tuple(op.where() for op in suspects[-MAX_POINTERS:]),
                float(history.final["t"]),
            )
        )


def _convergence(history: History, report: Report) -> None:
    final = history.final
    if final is None:
        if history.phase_time("interrupted") is None:
            report.violations.append(
                Finding("convergence", "no final status recorded: the run did not reach its end")
            )
        return
    nodes: dict[str, Any] = final.get("nodes") or {}
    t = float(final["t"])
    silent = sorted(name for name, view in nodes.items() if view is None)
    if silent:
        report.violations.append(
            Finding("convergence", f"after the faults healed, {', '.join(silent)} did not answer")
        )
    views = {name: view for name, view in nodes.items() if view is not None}
    primaries = sorted(name for name, v in views.items() if v.get("role") == "primary")
    if len(primaries) != 1:
        report.violations.append(
            Finding(
                "convergence",
                f"after the faults healed, {len(primaries)} nodes say they are primary "
                f"({', '.join(primaries) or 'none'}); roles: "
                + ", ".join(f"{n} {v.get('role')}" for n, v in sorted(views.items())),
                t=t,
            )
        )
    commits = {name: v.get("commit") for name, v in views.items()}
    if len(set(commits.values())) > 1:
        report.violations.append(
            Finding(
                "convergence",
                "the nodes report different commit indexes: "
                + ", ".join(f"{n} {c}" for n, c in sorted(commits.items())),
                t=t,
            )
        )
    ledgers = {name: _ledger_summary(v) for name, v in views.items()}
    reference = ledgers.get(primaries[0]) if len(primaries) == 1 else None
    if reference is None and ledgers:
        reference = next(iter(ledgers.values()))
    for name, ledger in sorted(ledgers.items()):
        if ledger != reference:
            report.violations.append(
                Finding(
                    "convergence",
                    f"{name}'s ledger differs from the primary's: {_diff(reference or {}, ledger)}",
                    t=t,
                )
            )


def _ledger_summary(view: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, f in (view.get("features") or {}).items():
        holders = sorted(
            (int(h["grant"]), str(h["user"]), int(h["count"])) for h in f.get("holders", [])
        )
        out[name] = (int(f["total"]), int(f["in_use"]), tuple(holders))
    return out


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    parts = []
    for name in sorted(set(a) | set(b)):
        if a.get(name) == b.get(name):
            continue
        if name not in a or name not in b:
            parts.append(f"{name} only on {'this node' if name in b else 'the primary'}")
            continue
        (ta, ua, ha), (tb, ub, hb) = a[name], b[name]
        missing = sorted(set(ha) - set(hb))
        extra = sorted(set(hb) - set(ha))
        parts.append(
            f"{name}: total {tb} vs {ta}, in use {ub} vs {ua}, grants missing "
            f"{[g for g, _, _ in missing]}, extra {[g for g, _, _ in extra]}"
        )
    return "; ".join(parts) or "?"


def _primary_view(final: dict[str, Any]) -> dict[str, Any] | None:
    name = final.get("primary")
    if name is None:
        return None
    view: dict[str, Any] | None = (final.get("nodes") or {}).get(name)
    return view


def _holders(view: dict[str, Any]) -> dict[int, tuple[str, str, int]]:
    """Grant id -> (feature, user, count) on one node's ledger."""
    out = {}
    for name, f in (view.get("features") or {}).items():
        for h in f.get("holders", []):
            out[int(h["grant"])] = (name, str(h["user"]), int(h["count"]))
    return out
