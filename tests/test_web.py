"""The status page's model, its HTML and its poller, from a synthetic status (no triad)."""

from __future__ import annotations

import datetime
import json
from html.parser import HTMLParser
from typing import Any

import pytest

from zbroker.broker.web.app import NO_REPORT_LOG
from zbroker.broker.web.model import (
    EXPIRY_WARNING_DAYS,
    HOLDERS_SHOWN,
    STALE_AFTER,
    build_page,
    duration,
)
from zbroker.broker.web.poller import POLL_EVERY, SLOW_SHARE, StatusPoller, pause_after
from zbroker.broker.web.render import render_page

pytestmark = pytest.mark.unit

UTC = datetime.UTC
NOW = datetime.datetime(2026, 11, 30, 9, 0, tzinfo=UTC).timestamp()
HOSTILE = "<script>document.title='owned'</script>"


def _day(days: int) -> str:
    return (datetime.date(2026, 11, 30) + datetime.timedelta(days=days)).isoformat()


def _holder(grant: int, user: str, count: int = 1, ago: float = 600.0, **more: Any) -> Any:
    return {
        "grant": grant,
        "feature": more.pop("feature", "cad"),
        "user": user,
        "host": more.pop("host", "ws1"),
        "display": more.pop("display", ":0"),
        "count": count,
        "version": "2.0",
        "since": NOW - ago,
    }


def _status(**over: Any) -> dict[str, Any]:
    """What zbroker.broker.status.query_nodes returns for a triad whose gamma is down."""
    status: dict[str, Any] = {
        "primary": "alpha",
        "mode": "curve",
        "nodes": [
            {
                "name": "alpha",
                "endpoint": "tcp://127.0.0.1:27001",
                "role": "primary",
                "term": 3,
                "last": 41,
                "commit": 41,
                "peers": ["beta"],
                "serving": True,
                "mode": "curve",
                "lag": 0,
            },
            {
                "name": "beta",
                "endpoint": "tcp://127.0.0.1:27002",
                "role": "backup",
                "term": 3,
                "last": 41,
                "commit": 40,
                "peers": ["alpha"],
                "serving": False,
                "mode": "curve",
                "lag": 1,
            },
            {"name": "gamma", "endpoint": "tcp://127.0.0.1:27003", "role": "down", "term": None},
        ],
        "features": [
            {
                "name": "cad",
                "total": 5,
                "in_use": 2,
                "queued": 1,
                "versions": [
                    {
                        "version": "2.0",
                        "total": 3,
                        "in_use": 2,
                        "expires": _day(EXPIRY_WARNING_DAYS),
                    },
                    {"version": "2.1", "total": 2, "in_use": 0, "expires": _day(29)},
                ],
                "holders": [
                    _holder(7, HOSTILE, host="<b>h</b>", display="&amp;", ago=7500),
                    _holder(3, "ann", ago=60),
                ],
            },
            {
                "name": "solver",
                "total": 2,
                "in_use": 2,
                "queued": 0,
                "versions": [{"version": "1.5", "total": 2, "in_use": 2, "expires": None}],
                "holders": [_holder(9, "bob", count=2, feature="solver")],
            },
            {
                "name": "old",
                "total": 0,
                "in_use": 0,
                "queued": 0,
                "versions": [{"version": "1.0", "total": 0, "in_use": 0, "expires": _day(-2)}],
                "holders": [],
            },
        ],
    }
    return status | over


def _page(status: dict[str, Any] | None = None, **kw: Any) -> Any:
    kw.setdefault("read_at", NOW - 1)
    return build_page(_status() if status is None else status, now=NOW, tz=UTC, **kw)


def test_the_model_shows_nodes_use_lines_and_holders() -> None:
    page = _page()
    assert page.problems == ()
    assert page.as_of == "2026-11-30 08:59:59 UTC"
    assert [(n.name, n.role, n.term, n.lag) for n in page.nodes] == [
        ("alpha", "primary", 3, 0),
        ("beta", "backup", 3, 1),
        ("gamma", "down", None, None),
    ]
    assert page.nodes[2].peers is None  # it did not answer: not "hears nobody"
    cad, solver, old = page.features
    assert (cad.in_use, cad.total, cad.percent, cad.full, cad.queued) == (2, 5, 40, False, 1)
    assert (solver.percent, solver.full) == (100, True)
    assert (old.percent, old.full) == (0, True)
    # Under EXPIRY_WARNING_DAYS days is highlighted; that many is not; an expired line is.
    assert [(x.days_left, x.expiring) for x in cad.lines] == [(30, False), (29, True)]
    assert [(x.days_left, x.expiring) for x in old.lines] == [(-2, True)]
    assert [(x.days_left, x.expiring) for x in solver.lines] == [(None, False)]
    # Longest held first, with the local time and the time held.
    assert [(h.user, h.since, h.held_for) for h in cad.holders] == [
        (HOSTILE, "2026-11-30 06:55", "2 h 5 min"),
        ("ann", "2026-11-30 08:59", "1 min"),
    ]
    assert cad.history is None  # the page does not read the report log yet


def test_the_problems_a_person_should_see_first() -> None:
    nobody = _status(primary=None, mode=None, features=[])
    nobody["nodes"] = [
        {"name": n, "endpoint": f"tcp://127.0.0.1:2700{i}", "role": "down", "term": None}
        for i, n in enumerate(("alpha", "beta", "gamma"))
    ]
    assert _page(nobody).problems == (
        "no node answers: is the triad running, and are these its ports?",
    )
    no_primary = _status(primary=None, holders_partial="a page of holders did not come")
    assert _page(no_primary).problems == (
        "no primary: checkouts are unavailable",
        "holders shown in part: a page of holders did not come",
    )
    old = _page(read_at=NOW - STALE_AFTER - 5, error="no reply")
    assert old.problems == ("the last poll failed: no reply", "this status is 15 s old")
    assert old.features  # the last status known is still shown
    assert build_page(None, read_at=None, now=NOW).problems == (
        "waiting for the first answer from the triad",
    )
    assert build_page(None, read_at=None, now=NOW, error="boom").problems == (
        "the last poll failed: boom",
    )


def test_a_long_list_of_holders_is_cut_and_counted() -> None:
    status = _status()
    many = [_holder(i, f"u{i}", ago=i) for i in range(1, HOLDERS_SHOWN + 8)]
    status["features"][0] = status["features"][0] | {"holders": many, "in_use": len(many)}
    cad = _page(status).features[0]
    assert (len(cad.holders), cad.holders_hidden) == (HOLDERS_SHOWN, 7)
    assert cad.holders[0].user == f"u{HOLDERS_SHOWN + 7}"  # the longest held come first
    assert cad.percent == 100  # a reread that lowered the count: the bar stops full


def test_the_json_is_the_page_model() -> None:
    page = _page()
    data = json.loads(json.dumps(page.to_json()))
    assert data["primary"] == "alpha"
    assert data["features"][0]["holders"][0]["user"] == HOSTILE
    assert data["features"][0]["lines"][1] == {
        "version": "2.1",
        "total": 2,
        "in_use": 0,
        "expires": _day(29),
        "days_left": 29,
        "expiring": True,
    }


class Tables(HTMLParser):
    """Every table's rows as lists of cell texts, by the table's id; and every tag seen."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: list[str] = []
        self.classes: list[tuple[str, str]] = []  # (class, text of the element)
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] = []
        self._marked: list[tuple[str, list[str]]] = []
        self.text: list[str] = []
        self.charts: list[dict[str, str | None]] = []  # each chart's figure's attributes
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        found = dict(attrs)
        if tag == "table":
            self._table = found.get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        if tag == "span" and found.get("class"):
            self._marked.append((str(found["class"]), []))
        if tag == "figure" and found.get("class") == "chart":
            self.charts.append(found)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append(self._row)
        elif tag == "table":
            self._table = None
        elif tag == "span" and self._marked:
            cls, text = self._marked.pop()
            self.classes.append((cls, " ".join("".join(text).split())))

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        for _, text in self._marked:
            text.append(data)


def test_the_html_shows_the_model_and_escapes_what_clients_sent() -> None:
    html = render_page(_page(), refresh=5)
    seen = Tables(html)
    assert "script" not in seen.tags and "b" not in seen.tags  # no markup came through
    holders = seen.tables["holders"]
    assert holders[0] == [
        "feature",
        "user",
        "host",
        "display",
        "seats",
        "version",
        "since",
        "held for",
    ]
    assert holders[1] == [
        "cad",
        HOSTILE,
        "<b>h</b>",
        "&amp;",
        "1",
        "2.0",
        "2026-11-30 06:55",
        "2 h 5 min",
    ]
    assert [row[1] for row in holders[2:]] == ["ann", "bob"]
    nodes = seen.tables["nodes"]
    assert [row[:3] for row in nodes[1:]] == [
        ["alpha", "primary", "3"],
        ["beta", "backup", "3"],
        ["gamma", "down", "\u2013"],  # an en dash: no term
    ]
    features = {row[0]: row for row in seen.tables["features"][1:]}
    assert features["cad"][1:3] == ["2 / 5", "1"]
    assert features["solver"][1] == "2 / 2"
    assert "expires " + _day(29) + " (29 days left)" in features["cad"][3]
    assert "permanent" in features["solver"][3]
    assert ("expiring", "(29 days left)") in seen.classes
    assert ("muted", "(30 days left)") in seen.classes
    assert ("expiring", f"expired {_day(-2)}") in seen.classes
    assert seen.tables["queue"][1:] == [["cad", "1"]]
    assert '<meta http-equiv="refresh" content="5">' in html
    assert "<figure" not in html  # no history given: no chart
    noted = " ".join("".join(Tables(render_page(_page(history_note=NO_REPORT_LOG))).text).split())
    assert "No chart of the last 24 hours: it is drawn from the nodes' report logs" in noted


def test_the_html_of_a_triad_that_does_not_answer_yet() -> None:
    seen = Tables(render_page(build_page(None, read_at=None, now=NOW), refresh=3))
    text = " ".join("".join(seen.text).split())
    assert "waiting for the first answer from the triad" in text
    assert "no answer yet" in text
    assert seen.tables["queue"][1:] == [["no checkout is waiting"]]
    assert seen.tables["holders"][1:] == [["no seat is checked out"]]


def test_the_poller_keeps_the_last_status_when_a_poll_fails() -> None:
    answers: list[Any] = [_status(), RuntimeError("reply not readable"), _status(primary=None)]
    clock = iter([100.0, 200.0])

    def fetch() -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    poller = StatusPoller(fetch, wall_clock=lambda: next(clock))
    assert poller.latest.status is None
    first = poller.poll_once()
    assert (first.read_at, first.error, first.status and first.status["primary"]) == (
        100.0,
        None,
        "alpha",
    )
    failed = poller.poll_once()
    assert (failed.status, failed.read_at, failed.error) == (
        first.status,
        100.0,
        "reply not readable",
    )
    again = poller.poll_once()
    assert (again.read_at, again.error) == (200.0, None)


def test_the_poller_asks_less_often_when_asking_takes_long() -> None:
    assert pause_after(0.1) == pytest.approx(POLL_EVERY - 0.1)
    assert pause_after(1.0) == pytest.approx((SLOW_SHARE - 1) * 1.0)
    assert pause_after(3.0) == pytest.approx((SLOW_SHARE - 1) * 3.0)


def test_durations_for_a_person() -> None:
    assert [duration(s) for s in (-5, 59, 60, 3599, 3600 + 300, 86400 * 2 + 3600 * 5)] == [
        "under a minute",
        "under a minute",
        "1 min",
        "59 min",
        "1 h 5 min",
        "2 d 5 h",
    ]


def _history(quiet: bool = False) -> dict[str, Any]:
    """A reading of the report logs: cad 1 seat for 3 buckets, a gap, then 3 (peak 4)."""
    start = NOW - 24 * 3600
    cad = {"average": [1.0, 1.0, 1.0, None, 3.0], "peak": [1, 1, 2, None, 4], "total": 5}
    return {"start": start, "end": NOW, "bucket": 300.0, "quiet": quiet, "files": 2,
            "features": {} if quiet else {"cad": cad}}  # fmt: skip


def test_the_last_day_is_drawn_per_feature_with_its_gaps() -> None:
    page = _page(history=_history())
    charts = {f.name: f.history for f in page.features}
    cad = charts["cad"]
    assert cad is not None and cad.points == 4 and cad.top == 5 and not cad.quiet
    assert cad.average == "M0.0 96.0 L180.0 96.0 L360.0 96.0 M720.0 48.0"  # the gap breaks it
    assert cad.count_y == 0.0 and cad.peak.endswith("M720.0 24.0")
    assert (cad.start, cad.end) == ("Sun 09:00", "Mon 09:00")
    # No record of solver in the window: flat at its use now (2 of 2).
    solver = charts["solver"]
    assert solver is not None and solver.quiet and solver.average == "M0.0 0.0 L720.0 0.0"
    html = render_page(page)
    seen = Tables(html)
    assert html.count("<figure") == 3 and 'data-feature="cad" data-points="4"' in html
    assert 'd="M0.0 96.0 L180.0 96.0 L360.0 96.0 M720.0 48.0"' in html
    assert "nothing changed, 2 in use all along" in " ".join("".join(seen.text).split())


def test_a_quiet_day_draws_every_feature_flat_at_its_use_now() -> None:
    page = _page(history=_history(quiet=True))
    assert [(f.name, f.history.quiet, f.history.average) for f in page.features if f.history] == [
        ("cad", True, "M0.0 72.0 L720.0 72.0"),
        ("solver", True, "M0.0 0.0 L720.0 0.0"),
        ("old", True, "M0.0 120.0 L720.0 120.0"),
    ]


def test_a_node_whose_license_is_not_the_triad_s_is_a_problem() -> None:
    status = _status()
    status["nodes"][1]["license"] = "license differs from the triad's: cad 2.0 has 5 seats"
    page = _page(status)
    assert page.nodes[1].license is not None
    assert "node beta: license differs from the triad's: cad 2.0 has 5 seats" in page.problems


def test_reservations_and_held_seats_are_shown() -> None:
    status = _status()
    cad = status["features"][0]
    lab = {"count": 2, "kind": "HOST_GROUP", "name": "lab", "unused": 1}
    cad |= {"lingering": 1, "borrowed": 0, "reservations": [lab]}
    cad["holders"][1] |= {"hold": "linger", "until": NOW + 600}
    status["features"][1]["holders"][0] |= {"sharers": [9, 12, 15]}  # a DUP_GROUP's
    page = _page(status)
    (reservation,) = page.features[0].reservations
    assert (reservation.kind, reservation.name, reservation.count, reservation.unused) == (
        "HOST_GROUP", "lab", 2, 1)  # fmt: skip
    ann = next(h for h in page.features[0].holders if h.user == "ann")
    assert (ann.hold, ann.until) == ("lingering", "2026-11-30 09:10")
    seen = Tables(render_page(page))
    features = {row[0]: row for row in seen.tables["features"][1:]}
    assert features["cad"][4] == "1 lingering 2 reserved for host group lab, 1 unused"
    assert features["solver"][4] == "\u2013"
    holders = {row[1]: row for row in seen.tables["holders"][1:]}
    assert holders["ann"][-1] == "1 min lingering until 2026-11-30 09:10"
    assert holders["bob"][-1] == "10 min shares its seat with grants 12, 15"
