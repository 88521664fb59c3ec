"""The chaos checker on hand-written histories: it passes clean ones and catches each break.

Also the pieces around it that need no triad: the history's reading and merging, the
seeded schedule, and the timeline picture (when matplotlib is there).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from zbroker.clients.testing.chaos.checker import check, hold_intervals
from zbroker.clients.testing.chaos.history import History, Recorder, merge_files, read_history
from zbroker.clients.testing.chaos.nemesis import ALL_KINDS, FaultKind, parse_kinds, schedule
from zbroker.clients.testing.chaos.verdict import CheckOptions, Report, figures, render

pytestmark = pytest.mark.unit

FEATURES = {"solver": 2, "cad": 15}
NODES = ["alpha", "beta", "gamma"]


class H:
    """Builds a history record by record; times are seconds from the run's start."""

    def __init__(self, features: dict[str, int] | None = None) -> None:
        self.records: list[dict[str, Any]] = [
            {
                "type": "meta",
                "t": 0.0,
                "seed": 1,
                "features": features or FEATURES,
                "nodes": NODES,
                "peer_timeout": 0.5,
                "lease": 10.0,
                "failback": True,
            }
        ]
        self.users: dict[tuple[int, int], str] = {}

    def add(self, type_: str, t: float, **fields: Any) -> H:
        self.records.append({"type": type_, "t": t, **fields})
        return self

    def session(self, p: int, s: int) -> H:
        self.users[(p, s)] = f"chaos-p{p}s{s}"
        return self.add("session", 0.0, process=p, session=s, user=self.users[(p, s)])

    def checkout(
        self,
        op: str,
        t: float,
        done: float | None,
        status: str = "ok",
        *,
        feature: str = "solver",
        count: int = 1,
        grant: int | None = None,
        reason: str | None = None,
        sid: str | None = None,
        req: int | None = None,
    ) -> H:
        p, s = _ps(op)
        self.add(
            "invoke",
            t,
            id=op,
            process=p,
            session=s,
            op="checkout",
            phase="load",
            feature=feature,
            count=count,
            wait=None,
            sid=sid,
            req=req,
        )
        if done is not None:
            body: dict[str, Any] = {"id": op, "status": status, "reason": reason}
            if status == "ok":
                body["grant"] = {"id": grant, "feature": feature, "version": "1.5", "count": count}
            self.add("complete", done, **body)
        return self

    def checkin(
        self,
        op: str,
        t: float,
        done: float | None,
        status: str = "ok",
        *,
        grant: int,
        of: str,
        phase: str = "load",
        after_lost: bool = False,
        reason: str | None = None,
    ) -> H:
        p, s = _ps(op)
        self.add(
            "invoke",
            t,
            id=op,
            process=p,
            session=s,
            op="checkin",
            phase=phase,
            grant=grant,
            of=of,
            after_lost=after_lost,
        )
        if done is not None:
            self.add("complete", done, id=op, status=status, reason=reason)
        return self

    def lost(self, t: float, p: int, s: int, *grants: tuple[int, str, int, str]) -> H:
        return self.add(
            "lost",
            t,
            process=p,
            session=s,
            grants=[
                {"id": g, "feature": f, "count": c, "of": of, "state": "unsafe"}
                for g, f, c, of in grants
            ],
        )

    def final(
        self,
        t: float,
        holders: dict[str, list[tuple[int, str, int]]],
        *,
        commits: dict[str, int] | None = None,
        overrides: dict[str, Any] | None = None,
        primary: str = "alpha",
    ) -> H:
        def view(name: str) -> dict[str, Any]:
            return {
                "role": "primary" if name == primary else "backup",
                "term": 3,
                "commit": (commits or {}).get(name, 100),
                "last": 100,
                "features": {
                    f: {
                        "total": total,
                        "in_use": sum(c for _, _, c in holders.get(f, [])),
                        "holders": [
                            {"grant": g, "user": u, "count": c} for g, u, c in holders.get(f, [])
                        ],
                    }
                    for f, total in FEATURES.items()
                },
            }

        nodes: dict[str, Any] = {n: view(n) for n in NODES}
        nodes.update(overrides or {})
        self.add("phase", t - 0.5, phase="hold")
        return self.add("final", t, primary=primary, nodes=nodes).add("phase", t, phase="final")

    def lines(self) -> list[str]:
        return [json.dumps(r) for r in self.records]

    def history(self) -> History:
        return read_history(self.lines())

    def check(self, **options: Any) -> Report:
        return check(self.history(), CheckOptions(**options))


def _ps(op: str) -> tuple[int, int]:
    head = op.split("#")[0]  # "p0s1"
    p, s = head[1:].split("s")
    return int(p), int(s)


def _broken(report: Report) -> list[str]:
    return [v.invariant for v in report.violations]


def _two_sessions() -> H:
    return H().session(0, 0).session(0, 1)


# --------------------------------------------------------------------------- clean


def test_clean_history_passes_and_renders() -> None:
    h = (
        _two_sessions()
        .checkout("p0s0#1", 1.0, 1.01, grant=1, count=2)
        .checkin("p0s0#2", 2.0, 2.01, grant=1, of="p0s0#1")
        .checkout("p0s1#1", 1.5, 2.02, grant=2, count=2)  # queued until the seats came back
        .checkout("p0s0#3", 2.1, 2.11, "denied", reason="no_seats")
        .checkout("p0s0#4", 2.2, 2.21, feature="cad", count=3, grant=3)
        .final(5.0, {"solver": [(2, "chaos-p0s1", 2)], "cad": [(3, "chaos-p0s0", 3)]})
        .checkin("p0s1#2", 5.1, 5.11, grant=2, of="p0s1#1", phase="final")
        .checkin("p0s0#5", 5.1, 5.12, grant=3, of="p0s0#4", phase="final")
    )
    report = h.check()
    assert report.ok, render(report, h.history())
    assert not report.warnings, report.warnings
    assert report.peaks == {"solver": (2, 2), "cad": (3, 15)}
    text = render(report, h.history())
    assert "VERDICT: CLEAN" in text
    assert figures(report)["ok"] is True


def test_a_seat_handed_over_at_the_same_instant_is_not_counted_twice() -> None:
    h = (
        _two_sessions()
        .checkout("p0s0#1", 1.0, 1.1, grant=1, count=2)
        .checkin("p0s0#2", 2.0, 2.01, grant=1, of="p0s0#1")
        .checkout("p0s1#1", 1.5, 2.0, grant=2, count=2)
    )
    report = h.check()
    assert "no-over-allocation" not in _broken(report)


# --------------------------------------------------------------------------- over-allocation


def test_over_allocation_is_caught_and_points_at_the_grants() -> None:
    h = (
        _two_sessions()
        .checkout("p0s0#1", 1.0, 1.01, grant=1)
        .checkout("p0s0#2", 1.1, 1.11, grant=2)
        .checkout("p0s1#1", 1.2, 1.21, grant=3)  # a third seat of two
        .checkin("p0s0#3", 3.0, 3.01, grant=1, of="p0s0#1")
    )
    report = h.check()
    assert _broken(report).count("no-over-allocation") == 1
    finding = next(v for v in report.violations if v.invariant == "no-over-allocation")
    assert "3 seats" in finding.message and "solver" in finding.message
    assert any("p0s1#1" in w and "grant 3" in w for w in finding.where)
    assert finding.t == pytest.approx(1.21)
    text = render(report, h.history())
    assert "VERDICT: VIOLATED" in text and "[no-over-allocation]" in text


def test_the_triads_own_in_use_above_the_total_is_caught() -> None:
    h = _two_sessions().add("sample", 1.0, primary="alpha", roles={}, in_use={"solver": 3})
    assert "no-over-allocation" in _broken(h.check())


def test_an_unknown_checkout_is_not_counted_as_held() -> None:
    # Session 0 holds both seats; session 1's checkout timed out meanwhile. Had it been
    # counted, that would be three seats of two. The library settles it in the
    # background, so a seat it took may still be on the final ledger: a warning only.
    h = (
        _two_sessions()
        .checkout("p0s0#1", 1.0, 1.01, grant=1, count=2)
        .checkout("p0s1#1", 1.5, 3.5, "unknown")
        .final(
            6.0,
            {"solver": [(1, "chaos-p0s0", 2), (7, "chaos-p0s1", 1)]},
        )
        .checkin("p0s0#2", 6.1, 6.11, grant=1, of="p0s0#1", phase="final")
    )
    report = h.check()
    assert report.ok, render(report, h.history())
    assert any("unknown outcome" in w.message for w in report.warnings)


def test_a_checkout_that_never_completed_is_an_unknown_outcome() -> None:
    h = (
        _two_sessions()
        .checkout("p0s0#1", 1.0, 1.01, grant=1, count=2)
        .checkout("p0s1#1", 1.5, None)
    )
    report = h.check()
    assert "no-over-allocation" not in _broken(report)
    assert any("never completed" in w.message for w in report.warnings)


def test_a_lapsed_lease_ends_the_hold() -> None:
    # on_lost told session 0 its seats were no longer safe; the triad then gave them to
    # session 1. Not an over-allocation, and the later checkin being denied is no loss.
    h = (
        _two_sessions()
        .checkout("p0s0#1", 1.0, 1.01, grant=1, count=2)
        .lost(5.0, 0, 0, (1, "solver", 2, "p0s0#1"))
        .checkout("p0s1#1", 5.5, 5.51, grant=2, count=2)
        .checkin(
            "p0s0#2", 5.6, 5.61, "denied", grant=1, of="p0s0#1", after_lost=True, reason="not_held"
        )
        .final(7.0, {"solver": [(2, "chaos-p0s1", 2)]})
        .checkin("p0s1#2", 7.1, 7.11, grant=2, of="p0s1#1", phase="final")
    )
    report = h.check()
    assert report.ok, render(report, h.history())
    holds = {x.checkout.id: x for x in hold_intervals(h.history())}
    assert holds["p0s0#1"].end == 5.0 and holds["p0s0#1"].ended_by == "lost"


# --------------------------------------------------------------------------- lost grants


def test_a_held_grant_missing_from_the_final_ledger_is_a_lost_grant() -> None:
    h = (
        _two_sessions()
        .checkout("p0s0#1", 1.0, 1.01, grant=1)
        .checkout("p0s1#1", 1.1, 1.11, grant=2)
        .final(5.0, {"solver": [(2, "chaos-p0s1", 1)]})
        .checkin(
            "p0s0#2", 5.1, 5.11, "denied", grant=1, of="p0s0#1", phase="final", reason="not_held"
        )
        .checkin("p0s1#2", 5.1, 5.11, grant=2, of="p0s1#1", phase="final")
    )
    report = h.check()
    lost = [v for v in report.violations if v.invariant == "no-lost-grant"]
    assert len(lost) == 2  # not on the ledger, and its final checkin was denied
    assert all(any("p0s0#1" in w for w in v.where) for v in lost)


def test_a_grant_on_the_ledger_under_another_session_is_a_lost_grant() -> None:
    h = (
        _two_sessions()
        .checkout("p0s0#1", 1.0, 1.01, grant=1)
        .final(5.0, {"solver": [(1, "chaos-p0s1", 1)]})
        .checkin("p0s0#2", 5.1, 5.11, grant=1, of="p0s0#1", phase="final")
    )
    assert "no-lost-grant" in _broken(h.check())


def test_a_checkin_denied_while_the_grant_was_held_is_a_lost_grant() -> None:
    h = (
        _two_sessions()
        .checkout("p0s0#1", 1.0, 1.01, grant=1)
        .checkin("p0s0#2", 2.0, 2.01, "denied", grant=1, of="p0s0#1", reason="not_held")
    )
    report = h.check()
    assert _broken(report) == ["no-lost-grant", "convergence"]  # convergence: no final status
    assert report.violations[0].where == (
        "p0s0#1 (checkout, line 4/5)",
        "p0s0#2 (checkin, line 6/7)",
    )


def test_no_final_status_means_held_grants_are_unconfirmed() -> None:
    h = _two_sessions().checkout("p0s0#1", 1.0, 1.01, grant=1)
    broken = _broken(h.check())
    assert "no-lost-grant" in broken and "convergence" in broken


# --------------------------------------------------------------------------- exactly once


def test_one_grant_id_acknowledged_twice_is_a_double_effect() -> None:
    h = (
        _two_sessions()
        .checkout("p0s0#1", 1.0, 1.01, grant=5)
        .checkin("p0s0#2", 1.5, 1.51, grant=5, of="p0s0#1")
        .checkout("p0s1#1", 2.0, 2.01, grant=5)
    )
    report = h.check()
    assert "exactly-once" in _broken(report)
    finding = next(v for v in report.violations if v.invariant == "exactly-once")
    assert "grant id 5" in finding.message and len(finding.where) == 2


def test_one_request_id_with_two_answers_is_a_double_effect() -> None:
    h = (
        _two_sessions()
        .checkout("p0s0#1", 1.0, 1.01, grant=1, sid="abc", req=7)
        .checkout("p0s0#2", 1.2, 1.21, grant=2, sid="abc", req=7)  # the retry: a new seat
    )
    report = h.check()
    finding = next(v for v in report.violations if v.invariant == "exactly-once")
    assert "request 7 of session abc" in finding.message


def test_a_seat_no_operation_accounts_for_is_a_double_effect() -> None:
    # Session 1 was told "unavailable" (nothing changed), yet the ledger holds a grant
    # of it: the request took effect after all.
    h = (
        _two_sessions()
        .checkout("p0s1#1", 1.0, 1.5, "unavailable", feature="cad", count=2)
        .final(5.0, {"cad": [(9, "chaos-p0s1", 2)]})
    )
    report = h.check()
    finding = next(v for v in report.violations if v.invariant == "exactly-once")
    assert "grant 9" in finding.message and finding.where == ("p0s1#1 (checkout, line 4/5)",)


def test_a_checkin_answered_ok_whose_grant_stays_is_a_double_effect() -> None:
    h = (
        _two_sessions()
        .checkout("p0s0#1", 1.0, 1.01, grant=1)
        .checkin("p0s0#2", 2.0, 2.01, grant=1, of="p0s0#1")
        .final(5.0, {"solver": [(1, "chaos-p0s0", 1)]})
    )
    assert "exactly-once" in _broken(h.check())


def test_an_unknown_checkin_whose_grant_stays_is_only_a_warning() -> None:
    h = (
        _two_sessions()
        .checkout("p0s0#1", 1.0, 1.01, grant=1)
        .checkin("p0s0#2", 2.0, 4.0, "unknown", grant=1, of="p0s0#1")
        .final(5.0, {"solver": [(1, "chaos-p0s0", 1)]})
    )
    report = h.check()
    assert report.ok, render(report, h.history())
    assert report.warnings


# --------------------------------------------------------------------------- convergence


def test_nodes_that_disagree_do_not_converge() -> None:
    h = _two_sessions().checkout("p0s0#1", 1.0, 1.01, grant=1)
    h.final(
        5.0,
        {"solver": [(1, "chaos-p0s0", 1)]},
        commits={"gamma": 97},
        overrides={"beta": None},
    )
    h.checkin("p0s0#2", 5.1, 5.11, grant=1, of="p0s0#1", phase="final")
    report = h.check()
    messages = [v.message for v in report.violations if v.invariant == "convergence"]
    assert any("beta did not answer" in m for m in messages)
    assert any("commit" in m and "gamma 97" in m for m in messages)


def test_a_backup_missing_a_grant_does_not_converge() -> None:
    h = _two_sessions().checkout("p0s0#1", 1.0, 1.01, grant=1)
    h.final(5.0, {"solver": [(1, "chaos-p0s0", 1)]})
    h.records[-2]["nodes"]["gamma"]["features"]["solver"]["holders"] = []
    h.checkin("p0s0#2", 5.1, 5.11, grant=1, of="p0s0#1", phase="final")
    report = h.check()
    finding = next(v for v in report.violations if v.invariant == "convergence")
    assert "gamma" in finding.message and "missing [1]" in finding.message


# --------------------------------------------------------------------------- availability


def _kill(h: H, fault: int, t: float, node: str = "alpha", healed: bool = True) -> H:
    h.add("fault", t, fault=fault, kind="kill-primary", phase="start")
    h.add("action", t, fault=fault, action="kill", node=node, role="primary")
    h.add("action", t + 1.0, fault=fault, action="start", node=node, role="down")
    return h.add("fault", t + 2.0, fault=fault, phase="end", healed=healed, detail="", nodes=[node])


def test_failover_time_runs_from_the_kill_to_the_next_ok_checkout_invoked_after_it() -> None:
    h = _two_sessions().checkout("p0s0#1", 0.9, 1.0, feature="cad", grant=1)
    _kill(h, 1, 1.05)
    h.checkout("p0s1#1", 1.0, 1.2, feature="cad", grant=2)  # invoked before the kill
    h.checkout("p0s0#2", 1.1, 1.5, feature="cad", grant=3)
    h.checkout("p0s0#3", 1.2, 1.45, feature="cad", grant=4)
    report = h.check()
    assert [round(f.seconds or 0, 3) for f in report.failovers] == [0.4]
    assert report.failovers[0].op == "p0s0#3"
    assert "liveness" not in _broken(report)
    assert any(w.start == 1.0 and w.end == 1.2 for w in report.windows) is False  # < 0.25 s
    assert report.windows and "kill-primary #1" in report.windows[0].causes[0]


def test_a_slow_failover_breaks_liveness() -> None:
    h = _two_sessions().checkout("p0s0#1", 0.9, 1.0, feature="cad", grant=1)
    _kill(h, 1, 1.05)
    h.checkout("p0s0#2", 1.1, 2.6, feature="cad", grant=2)
    report = h.check()
    assert "liveness" in _broken(report)
    assert h.check(liveness_limit=2.0).ok is False  # no final status: still not clean
    assert "liveness" not in _broken(h.check(liveness_limit=2.0))


def test_a_fault_that_did_not_heal_breaks_liveness() -> None:
    h = _two_sessions()
    _kill(h, 1, 1.0, healed=False)
    h.checkout("p0s0#1", 1.1, 1.3, feature="cad", grant=1)
    assert "liveness" in _broken(h.check())


def test_recovery_is_measured_from_the_second_node_coming_back() -> None:
    h = _two_sessions()
    h.add("fault", 1.0, fault=1, kind="kill-two", phase="start")
    h.add("action", 1.0, fault=1, action="kill", node="alpha", role="primary")
    h.add("action", 1.0, fault=1, action="kill", node="beta", role="backup")
    h.checkout("p0s0#1", 1.1, 3.1, "unavailable", feature="cad")
    h.add("action", 3.0, fault=1, action="start", node="alpha", role="down")
    h.checkout("p0s0#2", 3.2, 3.9, feature="cad", grant=1)
    h.add("action", 4.0, fault=1, action="start", node="beta", role="down")
    h.add("fault", 5.0, fault=1, phase="end", healed=True, detail="", nodes=["alpha", "beta"])
    report = h.check()
    assert report.failovers == []  # killing the primary left one node: no failover due
    assert [round(r.seconds or 0, 3) for r in report.recoveries] == [0.9]


# --------------------------------------------------------------------------- history


def test_a_damaged_history_is_a_failed_check() -> None:
    orphan = {"type": "complete", "t": 1.0, "id": "x", "status": "ok"}
    lines = [*_two_sessions().lines(), "{not json", json.dumps(orphan)]
    report = check(read_history(lines))
    assert _broken(report).count("history") == 2


def test_recorder_and_merge_round_trip(tmp_path: Path) -> None:
    with Recorder(tmp_path / "a.jsonl") as a, Recorder(tmp_path / "b.jsonl") as b:
        a.write("phase", t=2.0, phase="load")
        b.write("phase", t=1.0, phase="hold")
        a.write("phase", t=3.0, phase="end")
        with pytest.raises(ValueError):
            a.write("bogus")
    count = merge_files([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "h.jsonl")
    assert count == 3
    history = read_history(tmp_path / "h.jsonl")
    assert [p for _, p in history.phases] == ["hold", "load", "end"]


# --------------------------------------------------------------------------- schedule


def test_the_same_seed_gives_the_same_schedule() -> None:
    first = list(itertools.islice(schedule(42), 50))
    again = list(itertools.islice(schedule(42), 50))
    other = list(itertools.islice(schedule(43), 50))
    assert first == again
    assert first != other


def test_a_schedule_goes_through_every_kind_first_then_mostly_kills() -> None:
    steps = list(schedule(7, count=300))
    assert {s.kind for s in steps[: len(ALL_KINDS)]} == set(ALL_KINDS)
    kinds = [s.kind for s in steps]
    assert kinds.count(FaultKind.KILL_PRIMARY) > kinds.count(FaultKind.PAUSE_PRIMARY) > 0
    pauses = [s for s in steps if s.kind is FaultKind.PAUSE_PRIMARY]
    assert all(s.dwell > 0.5 for s in pauses)  # past peer_timeout
    assert len(list(schedule(1, count=5))) == 5


def test_fault_names_parse() -> None:
    assert parse_kinds("all") == ALL_KINDS
    assert parse_kinds("kill-primary, wipe,kill-primary") == (
        FaultKind.KILL_PRIMARY,
        FaultKind.WIPE,
    )
    with pytest.raises(ValueError, match="unknown fault 'nope'"):
        parse_kinds("kill-primary,nope")


def test_the_timeline_is_drawn(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from zbroker.clients.testing.chaos.plot import plot_timeline

    h = _two_sessions().checkout("p0s0#1", 0.9, 1.0, feature="cad", grant=1)
    _kill(h, 1, 1.05)
    for i, t in enumerate([0.5, 1.0, 1.5, 2.0, 2.5]):
        roles = {n: "backup" for n in NODES}
        h.add("sample", t, primary=None if i == 2 else "alpha", roles=roles, in_use={"cad": 1})
    h.checkout("p0s0#2", 1.1, 1.5, feature="cad", grant=3)
    history = h.history()
    path = plot_timeline(history, check(history), tmp_path / "t.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_workload_spec_survives_its_trip_to_the_client_process() -> None:
    from zbroker.clients.testing.chaos.workload import WorkloadSpec

    spec = WorkloadSpec(
        process=1, sessions=3, endpoints=["tcp://127.0.0.1:1"], history="h", seed=5, deadline=9.5
    )
    assert WorkloadSpec.from_json(spec.to_json()) == spec


def test_the_load_contends_on_the_smallest_features_and_probes_the_largest() -> None:
    from zbroker.clients.testing.chaos.workload import default_mix

    mix, probe = default_mix({"cad": 15, "solver": 2, "viewer": 50})
    assert mix == {"solver": (0.35, 1), "cad": (0.45, 4), "viewer": (0.2, 1)}
    assert probe == "viewer"
    assert default_mix({"only": 3}) == ({"only": (0.35, 1)}, "only")
    with pytest.raises(ValueError, match="no seats"):
        default_mix({"gone": 0})


def test_an_interrupted_run_is_judged_only_as_far_as_it_went() -> None:
    h = _two_sessions().checkout("p0s0#1", 0.9, 1.0, feature="cad", grant=1)
    h.add("fault", 1.05, fault=1, kind="pause-primary", phase="start")
    h.add("action", 1.05, fault=1, action="pause", node="alpha", role="primary")
    h.add("phase", 1.2, phase="interrupted")  # Ctrl-C: the nodes got it too
    h.add("fault", 1.3, fault=1, phase="end", healed=False, detail="interrupted", nodes=["alpha"])
    report = h.check()
    assert report.ok, render(report, h.history())
    assert any("interrupted" in w.message for w in report.warnings)
    # What happened before the interruption is still judged.
    h.checkout("p0s1#1", 1.01, 1.02, feature="cad", count=15, grant=2)
    assert "no-over-allocation" in _broken(h.check())
