"""The status page's model: what a person sees, built from one status answer.

Input is what ``zbroker.broker.status.query_nodes`` returns (docs/protocol.md, "The status
report", merged over the triad), the Unix time it was read, and why the last poll failed
if it did. Output is a frozen ``Page``: nodes with their roles, terms and deltas; each
feature's use against its count, its lines' expiry in days, its holders and its queue;
and the problems a person should see first (no primary, a failed poll, holders read
only in part). The HTML page renders it and the JSON endpoint returns it as is, so the
two never disagree.

Pure: the time is an argument, and so is the zone dates are shown in.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Any

EXPIRY_WARNING_DAYS = 30  # a line expiring sooner than this is highlighted
HOLDERS_SHOWN = 500  # holders listed per feature; a count says how many more there are
STALE_AFTER = 10.0  # seconds after which the answer shown is called old


@dataclass(frozen=True)
class NodeView:
    name: str
    endpoint: str
    role: str  # primary, backup, candidate, recovering or down
    term: int | None
    last: int | None
    commit: int | None
    lag: int | None  # deltas behind the primary's commit; None without a primary
    peers: tuple[str, ...] | None  # the nodes it hears; None when it did not answer
    serving: bool
    recovering: str | None  # why it does not vote yet, in its own words
    license: str | None = None  # why its license files are not the triad's, if they are not


@dataclass(frozen=True)
class LineView:
    """One pool of a feature (docs/protocol.md: its lines of one version)."""

    version: str
    total: int
    in_use: int
    expires: str | None  # ISO date some of its seats lapse next; None: permanent
    days_left: int | None
    expiring: bool  # fewer than EXPIRY_WARNING_DAYS days left (or expired)


@dataclass(frozen=True)
class ReservationView:
    """A RESERVE line of the options file: seats kept for a principal, and unused."""

    kind: str  # USER, HOST, GROUP, ...
    name: str
    count: int
    unused: int


@dataclass(frozen=True)
class HolderView:
    user: str
    host: str
    display: str
    count: int
    version: str
    grant: int
    since: str  # local date and time, for a person
    held_for: str  # "2 h 5 min"
    since_unix: float
    hold: str | None = None  # "lingering" or "borrowed": held past its checkin
    sharers: tuple[int, ...] = ()  # the other grants of its DUP_GROUP, sharing its seats
    until: str | None = None  # when the hold ends, local time


@dataclass(frozen=True)
class ChartView:
    """One feature's last 24 hours of use, as an SVG the page draws inline: paths in a
    ``width`` x ``height`` box, seats 0 at the bottom and ``top`` at the top."""

    width: int
    height: int
    top: int  # seats at the top of the box
    count_y: float  # where the feature's count is
    average: str  # SVG path data: the average seats in use per bucket (gaps: no record)
    peak: str  # the peak seats in use per bucket
    points: int  # buckets with a value
    start: str  # the window's ends, local time for a person
    end: str
    quiet: bool  # nothing changed in the window: drawn flat at the seats in use now


@dataclass(frozen=True)
class FeatureView:
    name: str
    total: int
    in_use: int
    queued: int  # checkouts waiting in the primary's queue
    percent: int  # in_use of total, 0 to 100 (over 100 after a reread lowered the count)
    full: bool
    lines: tuple[LineView, ...]
    holders: tuple[HolderView, ...]
    holders_hidden: int  # holders past HOLDERS_SHOWN, counted but not listed
    lingering: int = 0  # seats held on after their checkin (LINGER), in use
    borrowed: int = 0  # seats lent out until their borrow ends (BORROW), in use
    reservations: tuple[ReservationView, ...] = ()
    # The last 24 hours of use from the nodes' report log (broker/web/history.py); None
    # when there is none to read, and the page says why where the chart goes.
    history: ChartView | None = None


@dataclass(frozen=True)
class Page:
    as_of: str | None  # when the status shown was read; None before the first answer
    age: float | None  # seconds since then
    mode: str | None  # curve or plain
    primary: str | None
    nodes: tuple[NodeView, ...]
    features: tuple[FeatureView, ...]
    problems: tuple[str, ...]  # for a person, most important first
    history_note: str | None = None  # why no chart of the last 24 hours is drawn, if none

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_page(
    status: dict[str, Any] | None,
    *,
    read_at: float | None,
    now: float,
    error: str | None = None,
    tz: datetime.tzinfo | None = None,
    history: dict[str, Any] | None = None,
    history_note: str | None = None,
) -> Page:
    """The page for ``status`` (None before any answer) read at ``read_at``, seen at ``now``.

    ``error`` is why the last poll failed, if it did: the page then shows the last
    status it had, and says how old it is. ``tz`` is the zone of the times shown (the
    server's local zone when None). ``history`` is the last 24 hours of use
    (``zbroker.broker.web.history.History.to_map``), None when there is none; then
    ``history_note`` says why.
    """
    problems: list[str] = []
    if error is not None:
        problems.append(f"the last poll failed: {error}")
    if status is None or read_at is None:
        if error is None:
            problems.append("waiting for the first answer from the triad")
        return Page(None, None, None, None, (), (), tuple(problems), history_note)
    age = max(0.0, now - read_at)
    if age > STALE_AFTER:
        problems.append(f"this status is {age:.0f} s old")
    if status.get("primary") is None:
        if all(n.get("role") == "down" for n in status.get("nodes", ())):
            problems.append("no node answers: is the triad running, and are these its ports?")
        else:
            problems.append("no primary: checkouts are unavailable")
    if status.get("holders_partial"):
        problems.append(f"holders shown in part: {status['holders_partial']}")
    problems += [
        f"node {n['name']}: {n['license']}" for n in status.get("nodes", ()) if n.get("license")
    ]
    today = _local(now, tz).date()
    return Page(
        as_of=_local(read_at, tz).strftime("%Y-%m-%d %H:%M:%S %Z").strip(),
        age=age,
        mode=status.get("mode"),
        primary=status.get("primary"),
        nodes=tuple(_node(n) for n in status.get("nodes", ())),
        features=tuple(
            _feature(f, today, now, tz, _chart(history, f, tz)) for f in status.get("features", ())
        ),
        problems=tuple(problems),
        history_note=history_note,
    )


def _node(n: dict[str, Any]) -> NodeView:
    peers = n.get("peers")
    return NodeView(
        name=str(n["name"]),
        endpoint=str(n.get("endpoint", "")),
        role=str(n.get("role", "down")),
        term=n.get("term"),
        last=n.get("last"),
        commit=n.get("commit"),
        lag=n.get("lag"),
        peers=tuple(str(p) for p in peers) if peers is not None else None,
        serving=bool(n.get("serving", False)),
        recovering=n.get("recovering"),
        license=n.get("license"),
    )


def _feature(
    f: dict[str, Any],
    today: datetime.date,
    now: float,
    tz: datetime.tzinfo | None,
    chart: ChartView | None = None,
) -> FeatureView:
    total, in_use = int(f["total"]), int(f["in_use"])
    holders = sorted(f.get("holders", ()), key=lambda h: (h["since"], h["grant"]))
    return FeatureView(
        name=str(f["name"]),
        total=total,
        in_use=in_use,
        queued=int(f.get("queued", 0)),
        percent=min(100, round(100 * in_use / total)) if total else (100 if in_use else 0),
        full=in_use >= total,
        lines=tuple(_line(v, today) for v in f.get("versions", ())),
        holders=tuple(_holder(h, now, tz) for h in holders[:HOLDERS_SHOWN]),
        holders_hidden=max(0, len(holders) - HOLDERS_SHOWN),
        lingering=int(f.get("lingering", 0)),
        borrowed=int(f.get("borrowed", 0)),
        reservations=tuple(
            ReservationView(str(r["kind"]), str(r["name"]), int(r["count"]), int(r["unused"]))
            for r in f.get("reservations", ())
        ),
        history=chart,
    )


def _line(v: dict[str, Any], today: datetime.date) -> LineView:
    expires = v.get("expires")
    days = (datetime.date.fromisoformat(expires) - today).days if expires else None
    return LineView(
        version=str(v["version"]),
        total=int(v["total"]),
        in_use=int(v["in_use"]),
        expires=expires,
        days_left=days,
        expiring=days is not None and days < EXPIRY_WARNING_DAYS,
    )


def _holder(h: dict[str, Any], now: float, tz: datetime.tzinfo | None) -> HolderView:
    since = float(h["since"])
    return HolderView(
        user=str(h["user"]),
        host=str(h["host"]),
        display=str(h["display"]),
        count=int(h["count"]),
        version=str(h["version"]),
        grant=int(h["grant"]),
        since=_local(since, tz).strftime("%Y-%m-%d %H:%M"),
        held_for=duration(now - since),
        since_unix=since,
        hold=_HOLDS.get(str(h["hold"]), str(h["hold"])) if h.get("hold") else None,
        sharers=tuple(int(g) for g in h.get("sharers", ()) if g != h["grant"]),
        until=_local(float(h["until"]), tz).strftime("%Y-%m-%d %H:%M") if h.get("hold") else None,
    )


_HOLDS = {"linger": "lingering", "borrow": "borrowed"}
CHART_WIDTH, CHART_HEIGHT = 720, 120  # the chart's box; the page scales it to its width


def _chart(
    history: dict[str, Any] | None, f: dict[str, Any], tz: datetime.tzinfo | None
) -> ChartView | None:
    """The feature's chart from ``history``; a flat line at its use now when nothing
    changed in the window; None without a history."""
    if history is None:
        return None
    use = history["features"].get(f["name"])
    quiet = bool(history["quiet"]) or use is None
    average: list[float | None] = [float(f["in_use"])] * 2 if quiet else use["average"]
    peak: list[int | None] = [int(f["in_use"])] * 2 if quiet else use["peak"]
    total = int(f["total"]) if quiet else max(int(use["total"]), int(f["total"]))
    top = max([total, 1, *(p for p in peak if p is not None)])

    def y(seats: float) -> float:
        return round(CHART_HEIGHT * (1 - seats / top), 1)

    def path(values: list[Any]) -> str:
        step = CHART_WIDTH / max(1, len(values) - 1)
        out, pen = [], "M"
        for k, v in enumerate(values):
            if v is None:
                pen = "M"  # no record covers it: the line breaks
                continue
            out.append(f"{pen}{round(k * step, 1)} {y(v)}")
            pen = "L"
        return " ".join(out)

    return ChartView(
        width=CHART_WIDTH,
        height=CHART_HEIGHT,
        top=top,
        count_y=y(total),
        average=path(average),
        peak=path(peak),
        points=sum(v is not None for v in average),
        start=_local(float(history["start"]), tz).strftime("%a %H:%M"),
        end=_local(float(history["end"]), tz).strftime("%a %H:%M"),
        quiet=quiet,
    )


def _local(unix: float, tz: datetime.tzinfo | None) -> datetime.datetime:
    moment = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return moment.astimezone(tz)  # tz None: the server's local zone


def duration(seconds: float) -> str:
    """``seconds`` for a person, to the minute: "under a minute", "7 min", "2 h 5 min"."""
    minutes = int(max(0.0, seconds) // 60)
    if minutes == 0:
        return "under a minute"
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"
