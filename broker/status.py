"""``zbroker status``: ask every node for its own view and render what lmstat -a would.

Each node answers ``status`` for itself (role, term, last and committed delta, peers it
hears); the features and holders come from the primary's answer, or from the most
up-to-date node when there is no primary. A node that does not answer within the
timeout is shown as ``down``. Each node also says its security ``mode`` (``curve`` or
``plain``). Holders come a page at a time (docs/protocol.md): ``HolderPages`` reads
them all from that one node.

``ask`` is the one way the commands talk to nodes: one request to each, over CURVE
when a node's key is known (``ClientCurve``), answers collected until a deadline.
``zbroker down`` uses it for its ``admin`` requests.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Collection
from typing import Any

import zmq

from zbroker.broker.lmstat import clean
from zbroker.clients.curve import ClientCurve, process_keypair
from zbroker.clients.licpath import server_keys
from zbroker.clients.wire import Reply, decode_reply, encode_request


def default_curve(endpoints: list[str]) -> ClientCurve | None:
    """CURVE for endpoints whose keys ``ZBROKER_SERVER_KEYS`` knows; None if it knows none."""
    keys = server_keys(endpoints)
    return ClientCurve(process_keypair(), keys) if any(e in keys for e in endpoints) else None


def ask(
    endpoints: list[tuple[str, str]],
    request: dict[str, Any],
    *,
    timeout: float,
    curve: ClientCurve | None = None,
) -> dict[str, dict[str, Any]]:
    """Each node's reply (a map with ``status``) to ``request``; silent nodes are left out."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    answers: dict[str, dict[str, Any]] = {}
    sockets: dict[zmq.Socket[bytes], str] = {}
    poller = zmq.Poller()
    try:
        for name, endpoint in endpoints:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if curve is not None:
                curve.apply(sock, endpoint)
            sock.connect(endpoint)
            sock.send(encode_request({"req": 1, **request}))
            sockets[sock] = name
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while len(answers) < len(sockets):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for sock, _ in poller.poll(int(left * 1000) + 1):
                reply = decode_reply(sock.recv())
                answers[sockets[sock]] = {"status": reply.status, **reply.body}
    finally:
        for sock in sockets:
            sock.close(linger=0)
    return answers


def query_nodes(
    endpoints: list[tuple[str, str]],
    timeout: float = 1.0,
    curve: ClientCurve | None = None,
    *,
    holders: bool = True,
    feature: str | None = None,
    silent: Collection[str] = (),
) -> dict[str, Any]:
    """Status of a triad: ``{"nodes": [...], "features": [...], "primary": name|None}``.

    With ``holders`` (of ``feature`` only, if given), each feature listed also has its
    ``holders``, read page by page from the node whose features are shown; if they
    could not all be read, or the ledger kept changing while they were, ``holders_partial``
    says why. Without ``curve``, the keys come from ``ZBROKER_SERVER_KEYS`` (plain TCP if
    none). ``silent``: nodes known not to answer (a caller that stopped them): not asked,
    and shown down at once rather than after ``timeout``.
    """
    if curve is None:
        curve = default_curve([e for _, e in endpoints])
    asked = [(name, endpoint) for name, endpoint in endpoints if name not in silent]
    replies = ask(asked, {"op": "status"}, timeout=timeout, curve=curve)
    answers = {
        name: dict(reply["report"])
        for name, reply in replies.items()
        if reply["status"] == "ok" and isinstance(reply.get("report"), dict)
    }
    status = merge(endpoints, answers)
    source = _source(answers)
    if holders and source is not None:
        # From the node whose features are shown, over a connection of its own: a node
        # answers only a few page requests a cycle, and says "ask again" past that.
        request = {"op": "status", "holders": True} | ({"feature": feature} if feature else {})
        pages = HolderPages(dict(endpoints)[source], request, timeout=timeout, curve=curve)
        try:
            found, last, partial = pages.read()
        finally:
            pages.close()
        status["features"] = _with_holders((last or answers[source])["features"], found, feature)
        if partial:
            status["holders_partial"] = partial
    return status


PAGE_TRIES = 3  # reads of every page before the holders are shown as partial
PAGE_RETRY = 0.02  # seconds before asking again for a page the node was too busy to build


class HolderPages:
    """Reads every page of holders from one node over one connection (docs/protocol.md).

    A page is read as the node was in one loop cycle; pages read in several cycles agree
    with each other only if the node's log did not move in between, so the read starts
    again (``PAGE_TRIES`` times in all) when it did.
    """

    def __init__(
        self,
        endpoint: str,
        request: dict[str, Any],
        *,
        timeout: float,
        curve: ClientCurve | None,
    ) -> None:
        self.request = request
        self.timeout = timeout
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self.sock, endpoint)
        self.sock.connect(endpoint)
        self.req = 1

    def read(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None, str | None]:
        """(holders, the report of the last page read, why they are partial or None)."""
        found: list[dict[str, Any]] = []
        last: dict[str, Any] | None = None
        for _ in range(PAGE_TRIES):
            report = self._page(0)
            if report is None:
                return found, last, self._late
            first = report
            found = list(report.get("holders", []))
            while report.get("next") is not None:
                page = self._page(report["next"])
                if page is None:
                    return found, report, self._late
                report = page
                found += report.get("holders", [])
            last = report
            if _position(report) == _position(first):
                return found, report, None
        why = f"the ledger changed while its holders were read, {PAGE_TRIES} times"
        return found, last, why

    @property
    def _late(self) -> str:
        return f"a page of holders did not come within {self.timeout:g} s"

    def _page(self, after: int) -> dict[str, Any] | None:
        """The report with the page after ``after``; None if none came within the timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            self.req += 1
            self.sock.send(encode_request({**self.request, "req": self.req, "after": after}))
            reply = self._reply(deadline)
            if reply is None:
                return None
            report = reply.body.get("report")
            if reply.status == "ok" and isinstance(report, dict):
                return dict(report)
            if reply.body.get("code") != "limit" or time.monotonic() + PAGE_RETRY >= deadline:
                return None
            time.sleep(PAGE_RETRY)  # the node builds a few pages a cycle and said: ask again

    def _reply(self, deadline: float) -> Reply | None:
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                return None
            reply = decode_reply(self.sock.recv())
            if reply.req == self.req:
                return reply  # not the answer to an earlier try
        return None

    def close(self) -> None:
        self.sock.close(linger=0)


def _position(report: dict[str, Any]) -> tuple[Any, Any]:
    own = _own_entry(report)
    return own.get("last"), own.get("commit")


def _with_holders(
    features: list[dict[str, Any]], found: list[dict[str, Any]], only: str | None
) -> list[dict[str, Any]]:
    if not found and any("holders" in f for f in features):
        return features  # a node of an earlier version lists every holder in its features
    by_feature: dict[str, list[dict[str, Any]]] = {}
    for h in found:
        by_feature.setdefault(str(h.get("feature")), []).append(h)
    return [
        f | {"holders": by_feature.get(f["name"], [])} if only in (None, f["name"]) else dict(f)
        for f in features
    ]


def merge(endpoints: list[tuple[str, str]], answers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = []
    for name, endpoint in endpoints:
        own = answers.get(name)
        if own is None:
            nodes.append({"name": name, "endpoint": endpoint, "role": "down", "term": None})
            continue
        nodes.append(_own_entry(own) | {"endpoint": endpoint, "mode": own.get("mode")})
    primary = _primary(nodes)
    chosen = _source(answers)
    source = answers[chosen] if chosen is not None else None
    if primary is not None:
        head = _own_entry(answers[primary])["commit"]
        for node in nodes:
            if node["role"] != "down":
                node["lag"] = max(0, head - node["commit"])
    return {
        "primary": primary,
        "mode": source["mode"] if source else None,
        "nodes": nodes,
        "features": source["features"] if source else [],
    }


def _primary(nodes: list[dict[str, Any]]) -> str | None:
    primaries = [n for n in nodes if n["role"] == "primary"]
    return str(max(primaries, key=lambda n: n["term"])["name"]) if primaries else None


def _source(answers: dict[str, dict[str, Any]]) -> str | None:
    """The node whose features status shows: the primary, else the most up-to-date one."""
    if not answers:
        return None
    primary = _primary([_own_entry(a) | {"name": name} for name, a in answers.items()])
    if primary is not None:
        return primary
    return max(answers, key=lambda n: (_own_entry(answers[n])["term"], _position(answers[n])[1]))


def _own_entry(report: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = report["nodes"][0]
    return entry


_MODES = {
    "curve": "curve (CURVE: encrypted, node keys checked)",
    "plain": "plain (NOT encrypted nor authenticated: trials only)",
}


def _due(days: int) -> str:
    """When a dated line expires, ``days`` from today (broker/expiry.py: 0 is tonight)."""
    if days < 0:
        return "expired: grants nothing new"
    if days <= 1:
        return ("today", "tomorrow")[days]
    return f"in {days} days"


def _shown(note: Any) -> str:
    """A node's note as printed: words kept, a control character (from a file's or a
    client's text quoted in it) as ``?``, so nothing in it can drive the terminal."""
    return "".join(c if c.isprintable() else "?" for c in str(note))


def render(status: dict[str, Any]) -> str:
    mode = status.get("mode")
    lines = [f"Nodes (security: {_MODES.get(mode, mode) if mode else 'unknown'}):"]
    for n in status["nodes"]:
        if n["role"] == "down":
            lines.append(f"  {n['name']:<8} down      {n['endpoint']}")
            continue
        odd = f"  [mode {n['mode']}]" if n.get("mode") != mode else ""
        lines.append(
            f"  {n['name']:<8} {n['role']:<9} term {n['term']:<4} last {n['last']:<7} "
            f"commit {n['commit']:<7} lag {n.get('lag', '?'):<5} "
            f"peers {','.join(n['peers']) or '-'}  {n['endpoint']}{odd}"
        )
        if n.get("recovering"):  # why it does not vote yet (a new, wiped or damaged disk)
            lines.append(f"           recovering: {n['recovering']}")
        if n.get("license"):  # its files are not the triad's (broker/served.py)
            lines.append(f"           {n['license']}")
        if n.get("clock"):  # its clock disagrees with a peer's (broker/core.py, judge_clocks)
            offsets = ", ".join(f"{p} {o:+.1f} s" for p, o in sorted(n.get("clocks", {}).items()))
            lines.append(f"           clock: {_shown(n['clock'])} (offsets: {offsets})")
        if n.get("not_standing") and n["not_standing"] not in (n.get("clock"), n.get("license")):
            lines.append(f"           not standing for election: {_shown(n['not_standing'])}")
        for note in n.get("settings", ()):  # its config and a peer's differ (Config.contract)
            lines.append(f"           settings: {_shown(note)}")
        if n.get("restart"):  # SERVER lines a reread cannot change (broker/config.py)
            lines.append(f"           restart: {_shown(n['restart'])}")
        for line in n.get("refused", ()):  # lines of its license file it does not serve
            lines.append(f"           refused: {_shown(line)}")
    if status["primary"] is None:
        lines.append("  no primary: checkouts are unavailable")
    lines.append("")
    lines.append("Features:")
    for f in status["features"]:
        held = "".join(f", {f[kind]} {kind}" for kind in ("lingering", "borrowed") if f.get(kind))
        lines.append(
            f"  {f['name']}: {f['in_use']} of {f['total']} seats in use{held}, {f['queued']} queued"
        )
        for v in f.get("versions", ()):  # each dated line's days to expiry (broker/expiry.py)
            for ln in v.get("lines", ()):
                if ln.get("days") is not None:
                    count = ln["count"]
                    seats = f"{count} seat{'s' if count != 1 else ''}"
                    lines.append(
                        f"    v{v['version']} line {ln['source']}: {seats} "
                        f"expire{'s' if count == 1 else ''} {ln['expires']} ({_due(ln['days'])})"
                    )
        for r in f.get("reservations", ()):
            lines.append(
                f"    reserved for {r['kind']} {r['name']}: {r['count']} seat(s), "
                f"{r['unused']} unused"
            )
        for h in f.get("holders", ()):
            # what a client chose to call itself: no escape sequence reaches the terminal
            who = " ".join(clean(h[k]) for k in ("user", "host", "display"))
            lines.append(
                f"    {who} v{h['version']}, "
                f"{h['count']} seat(s), grant {h['grant']}, since {_local(h['since'])}"
                + _held_on(h)
            )
    if status.get("holders_partial"):
        lines.append(f"  (holders partial: {status['holders_partial']})")
    return "\n".join(lines)


_HOLDS = {"linger": "lingering", "borrow": "borrowed"}


def _held_on(h: dict[str, Any]) -> str:
    """A holder's hold (LINGER, BORROW) and the grants of its DUP_GROUP, if any."""
    out = (
        f", {_HOLDS.get(h['hold'], h['hold'])} until {_local(h['until'])}" if h.get("hold") else ""
    )
    others = [str(g) for g in h.get("sharers", ()) if g != h["grant"]]
    return out + (f", sharing its seat with grant(s) {', '.join(others)}" if others else "")


def _local(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix).strftime("%Y-%m-%d %H:%M:%S")
